"""Hugging Face Hub names (`org/name`, `org/name@revision`) as sources, found in the local Hub cache.

Published merge recipes name their models as they are on the Hub. `resolve` turns such a name into its
snapshot folder in the local cache (huggingface_hub with `local_files_only`), in the folder `HF_HUB_CACHE`
names (else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), read when the name is resolved. Nothing goes
over the network unless downloads are allowed: `allow_downloads()` (the CLI's `--allow-download`, a run
config's `allow_download: true`), which sets `DFS_MERGE_ALLOW_DOWNLOAD=1` so that worker processes inherit
it. A download fetches only what a model needs (configs, safetensors, tokenizer files; never pickles) and
respects `HF_HUB_OFFLINE`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dfs_merge.errors import SourceError, one_line

ENV = "DFS_MERGE_ALLOW_DOWNLOAD"
"""The environment variable that allows downloads (`1`, `true`, `yes` or `on`)."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9][A-Za-z0-9._/-]{0,99})?")
PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja")
"""The files a download fetches: configs, safetensors weights, tokenizer and chat template files."""
_TRUE = ("1", "true", "yes", "on")


def is_hub_name(text: str) -> bool:
    """Whether `text` has the form of a Hub model id, `org/name` with an optional `@revision`."""
    repo = text.partition("@")[0]
    return bool(_NAME.fullmatch(text)) and ".." not in repo and "--" not in repo


def cache_dir() -> Path:
    """The local Hub cache, as huggingface_hub finds it, from the environment as it is now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def downloads_allowed() -> bool:
    """Whether a name missing from the cache may be downloaded (`DFS_MERGE_ALLOW_DOWNLOAD`)."""
    return os.environ.get(ENV, "").strip().lower() in _TRUE


def allow_downloads(on: bool = True) -> None:
    """Allow (or forbid) downloads for this process and the workers it starts."""
    if on:
        os.environ[ENV] = "1"
    else:
        os.environ.pop(ENV, None)


def resolve(name: str) -> Path:
    """The snapshot folder of the Hub model `name`: from the local cache, else downloaded if allowed; a
    SourceError saying where it looked otherwise."""
    from huggingface_hub import snapshot_download

    repo, _, revision = name.partition("@")
    cache = cache_dir()
    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError) or an unreadable cache: try on
        pass
    where = f"{name}: no such folder, and not in the Hugging Face cache ({cache}, from HF_HUB_CACHE or HF_HOME)"
    if not downloads_allowed():
        raise SourceError(f"{where}; pass --allow-download (allow_download: true in a run config) to download it, "
                          "or name a local folder")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        raise SourceError(f"{where}, and HF_HUB_OFFLINE is set, so it cannot be downloaded")
    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache, allow_patterns=list(PATTERNS)))
    except Exception as err:  # noqa: BLE001 - any Hub failure (no such repo, gated, network) is one line
        raise SourceError(f"{where}, and downloading it failed ({one_line(err)})") from None
