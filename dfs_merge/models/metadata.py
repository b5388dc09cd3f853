"""What a model folder says about itself, read from its small files without loading the model.

`layer_counts` reads each source's decoder layer count from its config.json; `source_license`
finds a source's licence (a packaged model's, or its model card's front matter); `fingerprint` hashes a
source's weights, so that a run or a genome can tell when a source changed under it. Importing this
module imports neither torch nor transformers, so the search driver can use it cheaply.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

from dfs_merge.errors import SourceError
from dfs_merge.inputs import parse_yaml, read_bytes
from dfs_merge.models.adapters import split_source


def layer_counts(paths: Sequence[str]) -> tuple[int, ...]:
    """Decoder layers per source, read from each source's config; no weights (and, for a plain HF folder,
    not even transformers) are loaded. The workers check the sources fully when they load them.

    A path that is not a plain HF folder with a readable layer count (a GGUF file, a packaged model
    name, a config that nests it unusually) goes through `read_config(locate(path))`.
    """
    counts = []
    for p in paths:
        config_file = Path(split_source(p)[0]).expanduser() / "config.json"  # an adapter keeps its base's layers
        n = None
        if config_file.is_file():
            try:
                data = json.loads(config_file.read_text())
                n = data.get("num_hidden_layers") or (data.get("text_config") or {}).get("num_hidden_layers")
            except (OSError, ValueError, AttributeError):
                n = None
        if not isinstance(n, int) or n < 1:
            from dfs_merge.models.sources import locate, read_config

            config, _ = read_config(locate(p))
            n = int(config.num_hidden_layers)
        counts.append(n)
    return tuple(counts)


def card_license(folder: Path) -> str | None:
    """The `license:` of the YAML front matter of `folder`'s README.md (a Hugging Face model card), or None."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    try:  # a model card is the source's, not ours: unreadable, it simply names no licence
        m = re.match(r"---\n(.*?)\n---", read_bytes(card, SourceError).decode(errors="replace"), re.S)
        front = parse_yaml(m.group(1), SourceError) if m else None
    except SourceError:
        return None
    if isinstance(front, dict) and front.get("license"):
        return str(front["license"])
    return None


def source_license(path: str, folder: Path | None) -> str | None:
    """The licence of the source named `path` and loaded from `folder`: a packaged model's (by name, or
    by the package a converted folder records), else the folder's model card's, else None."""
    from dfs_merge.models.store import packaged_license

    lic = packaged_license(path, folder)
    if lic is not None:
        return lic
    return card_license(folder) if folder is not None else None


WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def fingerprint(path: str) -> str | None:
    """A content fingerprint of a source: blake2b over its config.json and weight files (names and bytes).

    `path` as a source is written: a model folder, a .gguf file, or a packaged name (its converted folder,
    once converted). None when there is nothing to read yet (a packaged model not converted). Recorded by a
    run and in the genomes it writes, so that a resume or an eval on changed weights is refused instead of
    mixing two models. Reading 0.5 GB takes about a second; a file unchanged in size and mtime is not read
    again in this process.
    """
    base, adapter = split_source(path)
    if adapter is not None:
        of_base, of_adapter = fingerprint(base), fingerprint(str(adapter))
        return None if of_base is None or of_adapter is None else f"{of_base}+{of_adapter.split(':', 1)[1]}"
    from dfs_merge.merging.recipe import is_recipe_file, load_recipe_source

    if is_recipe_file(path):  # a recipe as a source: its file and its own sources' weights
        inner = [fingerprint(s) for s in load_recipe_source(path).sources]
        if any(f is None for f in inner):
            return None
        h = hashlib.blake2b(digest_size=16)
        h.update(read_bytes(Path(path).expanduser(), SourceError) + "".join(map(str, inner)).encode())
        return "blake2b:" + h.hexdigest()
    p = Path(path).expanduser()
    if p.is_dir():
        files = [f for f in sorted(p.iterdir())
                 if f.is_file() and (f.name in ("config.json", "adapter_config.json") or f.suffix in WEIGHT_SUFFIXES)]
    elif p.is_file():
        files = [p]
    else:
        from dfs_merge.models.store import is_complete, models_dir

        converted = models_dir() / path
        if "/" in path or not is_complete(converted):
            return None
        return fingerprint(str(converted))
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(f.name.encode() + b"\0" + _file_digest(str(f.resolve()), *_signature(f)).encode())
    return "blake2b:" + h.hexdigest()


def _signature(f: Path) -> tuple[int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_same_sources(genome_sources: Sequence[str], genome_fingerprints: Sequence[str | None],
                       paths: Sequence[str], what: str = "the genome") -> list[str | None]:
    """Refuse to run what was made on `genome_sources` (a genome, a run) over `paths` unless each is its own
    source: the same folder or name with unchanged weights (where a fingerprint was recorded), or another
    copy of the same weights. Returns the fingerprints of `paths` now."""
    from dfs_merge.errors import SourceError

    if len(genome_sources) != len(paths):
        raise SourceError(f"{what} has {len(genome_sources)} sources, not {len(paths)}: {', '.join(genome_sources)}")
    now = [fingerprint(p) for p in paths]
    for i, (own, path) in enumerate(zip(genome_sources, paths, strict=True)):
        recorded = genome_fingerprints[i] if i < len(genome_fingerprints) else None
        if own == path or Path(own).expanduser().resolve() == Path(path).expanduser().resolve():
            if recorded and now[i] and now[i] != recorded:
                raise SourceError(f"source {i} ({path}): its weights changed since {what} was made (fingerprint "
                                  f"{recorded}, now {now[i]})")
            continue
        want = recorded or fingerprint(own)
        if want is None or now[i] is None or want != now[i]:
            raise SourceError(f"source {i}: {what} was made on {own}, not {path} (other weights); "
                              "use a config whose sources are the genome's")
    return now
