"""The run's own random state, saved in every checkpoint so that a resumed run draws what it would have."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


class RunRandom:
    """The run's own Python and numpy random states, swapped into the global generators only while
    the algorithm draws (DEAP's operators and CMA-ES use the module-level generators), never while a
    candidate is evaluated."""

    def __init__(self, seed: int):
        self.py: Any = random.Random(seed).getstate()
        self.np: Any = np.random.RandomState(seed).get_state()

    @contextmanager
    def active(self) -> Iterator[None]:
        """Draw from the run's state inside the block; the outer global state is put back after it."""
        outer_py, outer_np = random.getstate(), np.random.get_state()
        random.setstate(self.py)
        np.random.set_state(self.np)
        try:
            yield
        finally:
            self.py, self.np = random.getstate(), np.random.get_state()
            random.setstate(outer_py)
            np.random.set_state(outer_np)

    def to_json(self) -> dict[str, Any]:
        """Both states as JSON-safe lists."""
        version, internal, gauss = self.py
        name, keys, pos, has_gauss, cached = self.np
        return {
            "python": [version, list(internal), gauss],
            "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRandom:
        """Inverse of `to_json`."""
        rng = cls(0)
        version, internal, gauss = data["python"]
        rng.py = (version, tuple(internal), gauss)
        name, keys, pos, has_gauss, cached = data["numpy"]
        rng.np = (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)
        return rng
