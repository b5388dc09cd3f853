"""Fixtures of the export tests."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _single_threaded(one_thread):
    """Every export test module runs torch on one thread (`one_thread`)."""
    yield
