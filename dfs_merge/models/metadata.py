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
from dfs_merge.models.folders import locate, read_config
from dfs_merge.models.kinds import source_kind


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
    by the package a converted folder records), else the folder's model card's, else its LICENSE file's,
    else None."""
    from dfs_merge.models.store import packaged_license

    lic = packaged_license(path, folder)
    if lic is not None:
        return lic
    if folder is None:
        return None
    return card_license(folder) or file_license(folder)


LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt", "COPYING")
_KNOWN_LICENSES = (  # (pattern in the text, the Hub's identifier); the narrower ones first
    (r"GNU LESSER GENERAL PUBLIC LICENSE\s+Version 3", "lgpl-3.0"),
    (r"GNU GENERAL PUBLIC LICENSE\s+Version 3", "gpl-3.0"),
    (r"GNU GENERAL PUBLIC LICENSE\s+Version 2", "gpl-2.0"),
    (r"Apache License,?\s+Version 2\.0", "apache-2.0"),
    (r"\bMIT License\b|Permission is hereby granted, free of charge", "mit"),
    (r"BSD 3-Clause|Redistribution and use in source and binary forms", "bsd-3-clause"),
    (r"Creative Commons Attribution 4\.0", "cc-by-4.0"),
    (r"LLAMA 2 COMMUNITY LICENSE", "llama2"),
    (r"LLAMA 3\.1 COMMUNITY LICENSE", "llama3.1"),
    (r"LLAMA 3\.2 COMMUNITY LICENSE", "llama3.2"),
    (r"LLAMA 3 COMMUNITY LICENSE", "llama3"),
    (r"Gemma Terms of Use", "gemma"),
)


def file_license(folder: Path) -> str | None:
    """The licence of `folder`'s LICENSE file: a Hub identifier where its text is a well-known licence, else its
    first line (the licence's own title); None without such a file."""
    for name in LICENSE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            with open(path, "rb") as fh:
                text = fh.read(16384).decode(errors="replace")
        except OSError:
            return None
        for pattern, ident in _KNOWN_LICENSES:
            if re.search(pattern, text, re.I):
                return ident
        first = next((line.strip(" #*\t") for line in text.splitlines() if line.strip(" #*\t")), "")
        return first[:80] or None
    return None


def source_name(path: str, folder: Path | None) -> str:
    """How a model card's `base_model:` names a source: its Hub name where it was given as one (the revision
    dropped), else the Hub name recorded for it (a packaged model's, or its config's `_name_or_path` when
    that is one), else its folder's name. A `BASE+ADAPTER` source is named by its base."""
    from dfs_merge.models import hub
    from dfs_merge.models.store import packaged_hub_name

    base = split_source(path)[0]
    if hub.is_hub_name(base) and not Path(base).expanduser().exists():
        return base.partition("@")[0]
    recorded = packaged_hub_name(base, folder)
    if recorded:
        return recorded
    if folder is not None and (folder / "config.json").is_file():
        try:
            named = json.loads((folder / "config.json").read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            named = None
        if isinstance(named, str) and hub.is_hub_name(named) and not Path(named).expanduser().exists():
            return named.partition("@")[0]
    return (folder or Path(base).expanduser()).name or base


WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def fingerprint(path: str) -> str | None:
    """A content fingerprint of a source: blake2b over its config.json and weight files (names and bytes).

    `path` as a source is written: a model folder, a .gguf file, a packaged name (its converted folder, once
    converted), or a registered kind's path (`kinds`: the kind fingerprints it). None when there is nothing to
    read yet (a packaged model not converted). Recorded by a run and in the genomes it writes, so that a resume
    or an eval on changed weights is refused instead of mixing two models. Reading 0.5 GB takes about a second; a file unchanged in size and mtime is not read
    again in this process.
    """
    base, adapter = split_source(path)
    if adapter is not None:
        of_base, of_adapter = fingerprint(base), fingerprint(str(adapter))
        return None if of_base is None or of_adapter is None else f"{of_base}+{of_adapter.split(':', 1)[1]}"
    kind = source_kind(path)
    if kind is not None:
        return kind.fingerprint(path)
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
