"""Writes that a crash cannot leave half done: a file or folder is complete under its name, or absent.

Files: `atomic_file` and `write_atomic` (text), the JSON-lines logs (`read_jsonl`, `append_jsonl`). Folders: `Staging`,
the one way a folder (an export, a converted model) is written into a hidden sibling, fsynced and
renamed into place, with the leftovers of killed writers removed by the next one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dfs_merge.errors import DfsMergeError
from dfs_merge.inputs import MAX_LOG_BYTES, parse_json, read_bytes

log = logging.getLogger(__name__)

NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
"""The errors of a full disk (or quota): a writer says "no space left on DIR" in one line for them."""


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a hidden temporary sibling of `path` (`.<name>.<pid>.<random>.tmp`) for writing; when the block
    ends it is flushed to disk and renamed over `path`, and when it raises it is removed. A reader sees either
    the old file or the new one, never half.

    The file gets the permissions a plain `open()` would give it: those of the file it replaces, else
    0o666 less the umask (not mkstemp's private 0o600). The temporaries that killed writers of `path` left
    (their process is gone) are removed first."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """`atomic_file` for a writer that opens the file by name (and a check that reads it back): yields the
    path of the hidden temporary sibling, created empty with plain permissions; when the block ends the file
    there is flushed to disk and renamed over `path`, and when it raises it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _plain_mode(path))
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _temporary_pattern(path: Path) -> re.Pattern[str]:
    """The names of `atomic_file`'s temporaries of `path`, the writer's pid in group 1."""
    return re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[A-Za-z0-9_]+\.tmp")


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries of `path` that writers killed mid-write left beside it; a temporary of a
    process that still runs is kept (it may still be writing)."""
    pattern, prefix = _temporary_pattern(path), f".{path.name}."
    try:
        names = [e.name for e in os.scandir(path.parent) if e.name.startswith(prefix)]
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m and not pid_alive(int(m.group(1))):
            log.info("removing %s, left by an interrupted write", path.parent / name)
            (path.parent / name).unlink(missing_ok=True)


def _read_umask() -> int | None:
    """The umask from /proc/self/status (Linux), which reading does not change; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_once() -> int:
    """The umask read the portable way, by setting it and back (once, at import: setting it races with
    other threads creating files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_once() if _read_umask() is None else None


def umask() -> int:
    """The process's umask (read without changing it where the platform allows)."""
    mask = _read_umask()
    return mask if mask is not None else (_IMPORT_UMASK if _IMPORT_UMASK is not None else 0o022)


def _plain_mode(path: Path) -> int:
    """The permission bits `open(path, "w")` would leave: the existing file's, else 0o666 less the umask."""
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        return st.st_mode & 0o777
    return 0o666 & ~umask()


def write_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically (see `atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform allows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush one written file's data to disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_tree(folder: Path) -> None:
    """Flush a folder's files and the folder itself, so that renaming it publishes durable data."""
    for path in folder.iterdir():
        if path.is_file():
            fsync_file(path)
    fsync_dir(folder)


def read_jsonl(path: Path, error: type[DfsMergeError] = DfsMergeError) -> list[dict[str, Any]]:
    """Every complete line of a JSON-lines log that is a JSON object; a truncated last line (a killed write) is
    cut off the file, so that the next append starts on a line of its own. Other lines that are not (invalid
    JSON, NaN, nested too deeply) are left out with a warning. A log that is a pipe or a device, unreadable or
    over `MAX_LOG_BYTES` is `error` with one line (see `dfs_merge.inputs`)."""
    if not os.path.lexists(path):
        return []
    data = read_bytes(path, error, limit=MAX_LOG_BYTES)
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a truncated last line (%d bytes)", path, len(data) - end)
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    records = []
    for n, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = parse_json(line, DfsMergeError, f"line {n}", finite=True)
        except DfsMergeError as err:
            log.warning("%s: %s; ignored", path, err)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            log.warning("%s: line %d is not a JSON object; ignored", path, n)
    return records


def append_jsonl(f: IO[str], record: dict[str, Any]) -> None:
    """Append one record as a JSON line to an open log, flushed and fsynced before returning."""
    f.write(json.dumps(record, allow_nan=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


# --------------------------------------------------------------------------- folders


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Staging:
    """How one kind of folder is published atomically, and how its leftovers are named.

    A folder `out` is written into `.<out name>.<tag>-<pid>-<8 hex>` beside it and renamed
    to `out` when complete; a replaced `out` is first renamed to `.<out name>.<old_tag>-<pid>-<8 hex>`
    and deleted after the swap. A killed writer leaves only such hidden siblings, which
    `remove_leftovers` deletes; `what` names the writer in the log ("export", "conversion").
    """

    tag: str
    old_tag: str
    what: str

    def _sibling(self, out: Path, tag: str) -> Path:
        return out.parent / f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"

    def remove_leftovers(self, out: Path, *, keep_live: bool = True) -> None:
        """Delete the staging and replaced folders that earlier writers of `out` left beside it.

        With `keep_live`, those of a process that still runs are kept (it may still be writing);
        without, all are deleted: for a caller that holds a lock that excludes every other writer.
        """
        if not out.parent.is_dir():
            return
        pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:{re.escape(self.tag)}|{re.escape(self.old_tag)})-(\d+)-[0-9a-f]+")
        for p in out.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and not (keep_live and pid_alive(int(m.group(1)))):
                log.info("removing %s, left by an interrupted %s", p, self.what)
                _remove(p)

    @contextmanager
    def scratch(self, out: Path) -> Iterator[Path]:
        """A fresh, empty folder beside `out` (same file system), always removed afterwards."""
        out.parent.mkdir(parents=True, exist_ok=True)
        # mkdir, not tempfile.mkdtemp: the folder may become `out`, so it keeps the umask's
        # permissions rather than mkdtemp's private 0o700.
        path = self._sibling(out, self.tag)
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @contextmanager
    def folder(
        self, out: Path, *, replace: bool, refuse: Callable[[Path], BaseException] = FileExistsError
    ) -> Iterator[Path]:
        """A fresh folder to write `out` into; when the block ends without an exception it is fsynced
        and renamed to `out`. An exception removes it and leaves `out` as it was.

        An `out` that exists at the rename is replaced with `replace`; without, `refuse(out)` is raised.
        """
        with self.scratch(out) as staging:
            yield staging
            fsync_tree(staging)
            self._publish(staging, out, replace, refuse)

    def _publish(self, staging: Path, out: Path, replace: bool, refuse: Callable[[Path], BaseException]) -> None:
        """Rename `staging` to `out`; an old `out` is moved away first (and back if the rename fails), then deleted."""
        old = None
        if out.exists() or out.is_symlink():
            if not replace:
                raise refuse(out)
            old = self._sibling(out, self.old_tag)
            os.rename(out, old)
        try:
            os.rename(staging, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
        fsync_dir(out.parent)
        if old is not None:
            _remove(old)
