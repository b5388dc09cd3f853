"""What a model folder says about itself, read from its small files without loading the model.

`layer_counts` reads each source's decoder layer count from its config.json; `source_license`
finds a source's licence (a packaged model's, or its model card's front matter). Importing this
module imports neither torch nor transformers, so the search driver can use it cheaply.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path


def layer_counts(paths: Sequence[str]) -> tuple[int, ...]:
    """Decoder layers per source, read from each source's config; no weights (and, for a plain HF folder,
    not even transformers) are loaded. The workers check the sources fully when they load them.

    A path that is not a plain HF folder with a readable layer count (a GGUF file, a packaged model
    name, a config that nests it unusually) goes through `read_config(locate(path))`.
    """
    counts = []
    for p in paths:
        config_file = Path(p).expanduser() / "config.json"
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
    m = re.match(r"---\n(.*?)\n---", card.read_text(errors="replace"), re.S)
    if not m:
        return None
    import yaml

    try:
        front = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
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
