"""Work an export runs beside its writing: a call in a background thread, and the shards flushed to disk.

The writing (casts and file writes, one tensor at a time) and the tensor check keep one core busy, and torch's
kernels and the file system release the GIL while they work: so where another core is free (`spare_core`) the
stitched model's side of the logit check (loading the sources, its forward) runs in a `Background` thread while
the tensors stream to disk; on a busy machine it runs when it is asked for, in the caller's thread (a second
thread there only takes turns with the first, and hands the GIL over slowly). Each written shard is fsynced in
the background (`Flusher`), which costs no CPU, while the checks read it back. Nothing outlives its `with`
block: leaving one waits for its threads, so that nothing runs on after an export has returned or failed. The
memory a background load adds is kept apart from the writing's and the check's largest tensors by a
`MemoryGate`, so that the export peaks at the larger of the two, not their sum.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from dfs_merge.atomic import fsync_file

__all__ = ["Background", "Flusher", "MemoryGate", "spare_core"]

T = TypeVar("T")


def spare_core() -> bool:
    """Whether a core is free for a background thread: there are several CPUs this process may use, and the
    1-minute load average leaves at least half of one idle (a machine running only this export, or a bench of
    exports one after the other, stays below that; one that other work keeps busy does not). Where the load
    cannot be read, whether there are several CPUs."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cpus > 1
    return cpus > 1 and cpus - load >= 0.5


class Background(Generic[T]):
    """`fn()` called in a thread of its own, started at once (`beside`, the default), or else in the caller's
    thread when `result()` asks for it. `result()` hands over its value (keeping no reference to it, so that
    the caller decides when it is freed) or raises its exception; `beside` says where it ran and `seconds` how
    long. Leaving the `with` block waits for the thread; an exception that `result()` was never asked for is
    dropped there (the block's own error, or none, is the one that counts)."""

    def __init__(self, fn: Callable[[], T], name: str = "dfs-merge-background", *, beside: bool = True):
        self._fn: Callable[[], T] | None = fn
        self._value: T | None = None
        self._error: BaseException | None = None
        self.beside = beside
        self.seconds = 0.0  # how long `fn` ran, once it has returned
        self._thread = threading.Thread(target=self._run, name=name, daemon=True) if beside else None
        if self._thread is not None:
            self._thread.start()

    def _run(self) -> None:
        fn, self._fn = self._fn, None
        if fn is None:
            return
        t0 = time.perf_counter()
        try:
            self._value = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller by result()
            self._error = err
        finally:
            self.seconds = time.perf_counter() - t0

    def __enter__(self) -> Background[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._thread.join()

    def result(self) -> T:
        """`fn`'s value, once it has returned (asked for once); its exception, re-raised here, if it raised one."""
        if self._thread is not None:
            self._thread.join()
        else:
            self._run()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        value, self._value = self._value, None
        return value  # type: ignore[return-value]


class Flusher:
    """Files fsynced in background threads (`flush`), so that the disk writes them while the export checks them;
    `wait()` waits for every one and raises the first fsync's error (a full disk: the OSError it is). Leaving the
    `with` block waits for them too."""

    def __init__(self) -> None:
        self._pending: list[Background[None]] = []

    def flush(self, path: Path) -> None:
        """Start writing `path`'s data to disk."""
        self._pending.append(Background(lambda: fsync_file(path), name="dfs-merge-fsync"))

    def wait(self) -> None:
        """Every flush started so far, done; the first error among them raised."""
        pending, self._pending = self._pending, []
        errors: list[BaseException] = []
        for job in pending:
            try:
                job.result()
            except OSError as err:
                errors.append(err)
        if errors:
            raise errors[0]

    def __enter__(self) -> Flusher:
        return self

    def __exit__(self, *exc: object) -> None:
        for job in self._pending:
            job.__exit__()
        self._pending = []


class MemoryGate:
    """Keeps two threads' large allocations apart. A background load of the sources waits until the writer has
    passed the large tensors it starts with (`open`, when it reaches the first layer), then holds the gate
    while it runs (`loading`); the writer and the tensor check hold it for each tensor larger than `limit` bytes
    (`tensor`). So a large tensor (the embeddings, an untied head) is never in memory while the sources load,
    and the export peaks at the larger of the two, not their sum."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._open = threading.Event()

    def big(self, nbytes: int) -> bool:
        """Whether a tensor of `nbytes` must hold the gate."""
        return nbytes > self.limit

    def tensor(self, nbytes: int) -> contextlib.AbstractContextManager[object]:
        """Held while a tensor of `nbytes` is read, written or compared: the gate where it is big, else nothing."""
        return self._lock if self.big(nbytes) else contextlib.nullcontext()

    def open(self) -> None:
        """Let the load start (the writer has passed its leading large tensors, or has stopped)."""
        self._open.set()

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Held while the sources load, once the gate is open."""
        self._open.wait()
        with self._lock:
            yield


