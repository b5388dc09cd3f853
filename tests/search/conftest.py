"""Fixtures shared by the search tests."""

from __future__ import annotations

import pytest
from synthetic import write_fake_sources


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[str]:
    """Fake source folders (config.json only) for the synthetic fitnesses, one set per test module."""
    return write_fake_sources(tmp_path_factory.mktemp("fake_sources"))
