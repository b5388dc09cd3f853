"""What `dfs-merge export` shows while it works: stage lines and a bar on stderr; library calls stay silent."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """Short stage lines on stderr (`export: loading 2 sources ...`, then `export: loaded 2 sources (3.1 s)`)
    and a bar over the tensors being written, when `on`; silent otherwise (library calls, tests)."""

    def __init__(self, on: bool = False):
        self.on = on

    @classmethod
    def of(cls, progress: bool | Progress) -> Progress:
        """A writer's `progress` argument as a display: itself, or a new one shown when it is true."""
        return progress if isinstance(progress, Progress) else cls(bool(progress))

    def say(self, text: str) -> None:
        """One line `export: TEXT`, when on."""
        if self.on:
            print(f"export: {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, doing: str, done: str) -> Iterator[None]:
        """`doing ...` before the block, `done (seconds)` after it (nothing when it raises)."""
        self.say(f"{doing} ...")
        t0 = time.perf_counter()
        yield
        self.say(f"{done} ({time.perf_counter() - t0:.1f} s)")

    @staticmethod
    def sources(n: int) -> str:
        """`1 source`, `2 sources`."""
        return f"{n} source{'s' if n != 1 else ''}"

    def loading(self, n: int, device: str, dtype: str) -> contextlib.AbstractContextManager[None]:
        """The stage of loading `n` sources on `device` in `dtype`."""
        return self.stage(f"loading {self.sources(n)} on {device} ({dtype})", f"loaded {self.sources(n)}")

    def bar(self, total: int, unit: str) -> tqdm:
        """A tqdm bar over `total` `unit`s being written (disabled when off)."""
        from tqdm import tqdm

        return tqdm(total=total, desc="writing", unit=unit, disable=not self.on, leave=False, file=sys.stderr,
                    dynamic_ncols=True)
