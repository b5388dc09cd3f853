"""What a user hands us, read safely: every file the project reads from a user goes through here.

`read_text` (and `read_lines`, for a long JSON-lines file read only as far as needed) turns a missing
file, a folder, a pipe or device (which could block or never end), an unreadable or oversized file and
bytes that are not UTF-8 into one line naming the file, raised as the caller's `DfsMergeError` subclass.
`read_yaml` and `read_json` build on it: `read_yaml` loads safely (no Python objects), refuses YAML aliases
before any object is built, so a "billion laughs" file is refused at once instead of filling memory, and
refuses a key given twice in one mapping (YAML would keep the last silently); `read_json` reads one JSON value
with `parse_json`, which refuses nesting deeper than `MAX_DEPTH`, as the YAML reader does, and for the files the
project writes itself (`finite`) NaN, infinities and numbers beyond a float.
`describe_validation_error` is the one line of a mapping that its pydantic model refused (a config, a genome).

`NoAliasDumper` is the counterpart for what the project writes: YAML without anchors or aliases, so
that every file it writes, `read_yaml` reads back.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dfs_merge.errors import ConfigError, DfsMergeError, one_line

if TYPE_CHECKING:
    from pydantic import ValidationError

MAX_BYTES = 16 * 2**20
"""The largest file `read_text` reads (16 MB): configs and genomes are a few kB, checkpoints a few MB."""

MAX_LOG_BYTES = 2**30
"""The largest JSON-lines log (evals.jsonl, docs.jsonl) a run reads back (1 GiB: a long run's log is some MB)."""
MAX_DEPTH = 200
"""The deepest nesting of brackets `parse_json` reads (a config, a checkpoint or a log line nests a few levels)."""

_ErrorClass = type[DfsMergeError]


def file_label(path: Path, what: str | None) -> str:
    """The file as named in a message: quoted when its name holds a newline or another unprintable character."""
    text = str(path) if str(path).isprintable() else repr(str(path))
    return f"{what} {text}" if what else text


def _size_text(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n} bytes"


def _open(path: Path, error: _ErrorClass, what: str | None) -> Any:
    """The file opened for binary reading, or `error` with one line saying why it cannot be."""
    label = file_label(path, what)
    try:
        st = os.stat(path)  # before open(): opening a pipe with no writer blocks
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise error(f"{label}: is not a regular file (a pipe, device or socket); refusing to read it")
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        raise error(f"{label}: no such file") from None
    except IsADirectoryError:
        raise error(f"{label}: is a folder, not a file") from None
    except NotADirectoryError:
        raise error(f"{label}: no such file (a parent of it is a file)") from None
    except OSError as err:  # a name too long, no permission, ...
        raise error(f"{label}: cannot read it ({err.strerror or err})") from None
    except ValueError:  # a NUL byte in the name
        raise error(f"{label}: no such file (not a valid file name)") from None


def _decode(data: bytes, label: str, error: _ErrorClass, offset: int = 0) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{label}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {offset + err.start})") from None
    return text[1:] if offset == 0 and text.startswith("\ufeff") else text  # a byte-order mark is not content


def read_bytes(path: str | Path, error: _ErrorClass = ConfigError, *, what: str | None = None,
               limit: int = MAX_BYTES) -> bytes:
    """A file's bytes; missing, a folder, unreadable or larger than `limit` is `error` with one line."""
    path = Path(path)
    label = file_label(path, what)
    with _open(path, error, what) as f:
        try:
            if os.path.isdir(path):  # open() of a folder succeeds on some platforms
                raise error(f"{label}: is a folder, not a file")
            data = f.read(limit + 1)  # not st_size: a pipe or a device has none
        except OSError as err:
            raise error(f"{label}: cannot read it ({err.strerror or err})") from None
    if len(data) > limit:
        raise error(f"{label}: larger than {_size_text(limit)}; refusing to read it")
    return data


def read_text(path: str | Path, error: _ErrorClass = ConfigError, *, what: str | None = None,
              limit: int = MAX_BYTES) -> str:
    """A UTF-8 text file (see `read_bytes`); bytes that are not UTF-8 are `error` naming the first one."""
    path = Path(path)
    return _decode(read_bytes(path, error, what=what, limit=limit), file_label(path, what), error)


def read_lines(path: str | Path, error: _ErrorClass = ConfigError, *, what: str | None = None,
               limit: int = MAX_BYTES) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 text file, read only as far as the caller iterates;
    a line longer than `limit` or bytes that are not UTF-8 are `error` with one line."""
    path = Path(path)
    label = file_label(path, what)
    with _open(path, error, what) as f:
        offset = 0
        for n in itertools.count(1):
            try:
                raw = f.readline(limit + 1)
            except OSError as err:
                raise error(f"{label}: cannot read it ({err.strerror or err})") from None
            if not raw:
                return
            if len(raw) > limit:
                raise error(f"{label}: line {n} is longer than {_size_text(limit)}; refusing to read it")
            yield n, _decode(raw, label, error, offset).rstrip("\r\n")
            offset += len(raw)


class _NoAliasLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses an alias (`*name`) before it is expanded into objects."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


class _AliasRefused(Exception):
    def __init__(self, anchor: str, line: int):
        super().__init__(anchor, line)
        self.anchor, self.line = anchor, line


class NoAliasDumper(yaml.SafeDumper):
    """`yaml.SafeDumper` that writes a repeated object out again instead of as an anchor and alias,
    so that what the project writes, `read_yaml` reads back."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def parse_yaml(text: str, error: _ErrorClass = ConfigError, label: str = "<text>") -> Any:
    """Load YAML text safely (plain data only) as `read_yaml` does, without requiring a mapping."""
    loader = None
    try:
        loader = _NoAliasLoader(text)  # checks that every character is printable
        return loader.get_single_data()
    except _AliasRefused as exc:
        raise error(f"{label}: YAML aliases are not accepted (*{exc.anchor}, line {exc.line}); "
                    "write the value out instead") from None
    except _DuplicateKey as exc:
        raise error(f"{label}: the key {_loc_part(str(exc.key))} is given twice in one mapping (line {exc.line}); "
                    "keep one") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise error(f"{label}: not valid YAML (character #x{exc.character:04x} on line {line} is not allowed)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise error(f"{label}: not valid YAML{where}") from None
    except RecursionError:
        raise error(f"{label}: not valid YAML (nested too deeply)") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a tagged or date-like value yaml cannot build
        raise error(f"{label}: not valid YAML ({one_line(exc, 120)})") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | Path, error: _ErrorClass = ConfigError, *, what: str | None = None) -> dict[str, Any]:
    """Read a YAML mapping safely, raising `error` with one line when the file is missing, unreadable,
    not UTF-8, not valid YAML, uses aliases (refused before they are expanded), or is not a mapping."""
    path = Path(path)
    label = file_label(path, what)
    data = parse_yaml(read_text(path, error, what=what), error, label)
    if not isinstance(data, dict):
        raise error(f"{label}: expected a YAML mapping, got {type(data).__name__}")
    return data


def read_json(path: str | Path, error: _ErrorClass = ConfigError, *, what: str | None = None,
              finite: bool = False) -> Any:
    """Read one JSON value, raising `error` with one line when the file is missing, unreadable,
    not UTF-8 or not valid JSON (see `parse_json`; `finite`: what the project wrote, so no NaN either)."""
    path = Path(path)
    return parse_json(read_text(path, error, what=what), error, file_label(path, what), finite=finite)


class _NotFinite(ValueError):
    pass


def _constant(name: str) -> float:
    raise _NotFinite(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise _NotFinite(f"{text[:20]} is beyond the largest float")
    return x


def nesting_depth(text: str | bytes, limit: int = MAX_DEPTH) -> int:
    """How deep the brackets (`[`, `{`) of JSON text nest, outside strings; counting stops past `limit`."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if data.count(b"[") + data.count(b"{") <= limit:  # the common case: too few brackets to nest too deep
        return min(limit, data.count(b"[") + data.count(b"{"))
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_json(text: str | bytes, error: _ErrorClass = ConfigError, label: str = "<text>", *,
               finite: bool = False) -> Any:
    """One JSON value; nesting deeper than `MAX_DEPTH` and invalid JSON are `error` with one line. With
    `finite` (a file the project wrote with `allow_nan=False`: a checkpoint, a run's log), so are NaN,
    Infinity and a number beyond a float, which Python's `json` would read (a model's config.json may hold them)."""
    if nesting_depth(text) > MAX_DEPTH:
        raise error(f"{label}: not valid JSON (nested more than {MAX_DEPTH} deep)")
    strict: dict[str, Any] = {"parse_constant": _constant, "parse_float": _finite_float} if finite else {}
    try:
        return json.loads(text, **strict)
    except json.JSONDecodeError as exc:
        raise error(f"{label}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    except _NotFinite as exc:
        raise error(f"{label}: not valid JSON ({exc})") from None
    except RecursionError:
        raise error(f"{label}: not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:  # bytes that are not UTF-8, an integer of too many digits
        raise error(f"{label}: not valid JSON ({one_line(exc, 120)})") from None


def describe_validation_error(err: ValidationError) -> str:
    """One line naming the first offending field and what is wrong with it."""
    first = err.errors()[0]
    where = ".".join(_loc_part(p) for p in first["loc"]) or "(top level)"
    extra = f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    msg = " ".join(first["msg"].split())
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{where}: {msg}{extra}"


def _loc_part(p: int | str) -> str:
    """A key as named in a message: quoted when it is unprintable (a newline would break the line), cut when long."""
    text = str(p) if str(p).isprintable() and str(p) else repr(p)
    return text if len(text) <= 60 else text[:57] + "..."
