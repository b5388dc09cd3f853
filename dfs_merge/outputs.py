"""Where a command writes, checked before any work: one refusal, in one line, instead of a failure after it.

`check_output` is called first by every command that writes (export, import-mergekit, show --png, a run's
`out:` folder), and again by the writers themselves (`export_checkpoint`, `write_mergekit_config`), so that a
path is judged in one place whoever writes to it. It refuses a parent that is a file, a folder nobody can
write into, an existing output without `force`, a folder where a file is expected (and the reverse), and an
output that is, contains or lies inside one of the command's inputs: an output never overwrites an input.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from dfs_merge.errors import DfsMergeError
from dfs_merge.inputs import file_label

Kind = Literal["file", "folder"]


def _stat(path: Path) -> os.stat_result | None:
    """`os.stat`, or None when nothing is there (a missing path, or one under a file)."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _resolved(path: str | Path) -> Path | None:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def _existing_inputs(inputs: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """(as named, resolved) of each input that is an existing file or folder; names of models are not paths;
    both parts of a `BASE+ADAPTER` source count."""
    out = []
    for name in [part for given in inputs for part in (given, *_adapter_parts(str(given)))]:
        try:
            there = Path(name).expanduser().exists()
        except (OSError, ValueError):
            there = False
        resolved = _resolved(name) if there else None
        if resolved is not None:
            out.append((str(name), resolved))
    return out


def _adapter_parts(name: str) -> tuple[str, ...]:
    """The base and the adapter folder of a `BASE+ADAPTER` source (the adapters module's rule), else none."""
    from dfs_merge.models.adapters import split_source

    try:
        base, adapter = split_source(name)
    except DfsMergeError:
        return ()
    return (base, str(adapter)) if adapter is not None else ()


def _overlap(out: Path, inputs: Iterable[str | Path]) -> str | None:
    """How `out` meets the first input it is, contains or lies in, as words for the refusal; None if none."""
    target = _resolved(out)
    if target is None:
        return None
    for name, source in _existing_inputs(inputs):
        if target == source:
            return f"is the input {name}; an output never overwrites an input"
        if source in target.parents:
            return f"is inside the input {name}; an output never writes into an input"
        if target in source.parents:
            return f"contains the input {name}; an output never overwrites an input"
    return None


def _probe(folder: Path) -> OSError | None:
    """Create and remove a hidden file in `folder`: the only test of writability that root, read-only
    mounts and virtual file systems all answer truthfully. Returns the error, or None."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".dfs-probe.")
    except OSError as err:
        return err
    os.close(fd)
    Path(name).unlink(missing_ok=True)
    return None


def check_output(
    path: str | Path,
    *,
    kind: Kind,
    force: bool,
    inputs: Iterable[str | Path] = (),
    error: type[DfsMergeError] = DfsMergeError,
    what: str | None = "--out",
    force_hint: str = "--force",
) -> Path:
    """Refuse, with `error` and one line, an output `path` that cannot or must not be written; returns it
    (with `~` expanded). Nothing is created: a writability probe file is made and removed at once.

    `kind` is what will be written there (a `file` replaced atomically, or a `folder` written whole or into);
    an existing `path` is refused unless `force` (the message says to pass `force_hint`), and always when it is
    of the other kind or not a regular file or folder. `inputs` are what the command reads (files, folders;
    names that are not existing paths are ignored): `path` may not be one, contain one or lie inside one.
    `what` names the path in the message (`--out x: ...`; None: the path alone).
    """
    out = Path(path).expanduser()
    label = file_label(out, what)
    try:
        here = _stat(out)
    except (OSError, ValueError) as err:  # a name too long, a NUL byte
        raise error(f"{label}: not a usable path ({getattr(err, 'strerror', None) or err})") from None
    # the nearest folder that exists: every missing one below it will be created in it
    anchor = out.parent
    while True:
        st = _stat(anchor)
        if st is not None:
            if not stat.S_ISDIR(st.st_mode):
                raise error(f"{label}: {anchor} is a file, not a folder")
            break
        if anchor.parent == anchor:
            break
        anchor = anchor.parent
    if here is not None:
        is_dir = stat.S_ISDIR(here.st_mode)
        if kind == "file" and is_dir:
            raise error(f"{label}: is a folder, not a file")
        if kind == "folder" and not is_dir:
            raise error(f"{label}: is a file, not a folder")
        if not (is_dir or stat.S_ISREG(here.st_mode)):
            raise error(f"{label}: is not a regular file (a device, pipe or socket); choose another path")
    overlap = _overlap(out, inputs)
    if overlap:
        raise error(f"{label}: {overlap}")
    if here is not None and not force:
        raise error(f"{label}: already exists; pass {force_hint} to replace it")
    err = _probe(anchor)
    if err is not None:
        raise error(f"{label}: {anchor} is not writable ({err.strerror or err})")
    return out
