"""Kinds of source besides a model file: the loader's one hook for sources another package defines.

A source path is a model folder, a GGUF file, a packaged or Hub name or `BASE+ADAPTER` (`sources`), or a path
that a registered `SourceKind` recognises: it says where the source's config and tokenizer are, fingerprints
it, and builds the loaded source. `dfs_merge.merging` registers the parameter-space recipe file (a hybrid's
source) when it is imported, which the `dfs_merge` package does first in every process, so `models/` loads a
recipe source without importing anything from `merging/`. Importing this module imports neither torch nor
transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from dfs_merge.models.sources import Source

__all__ = ["SourceKind", "register_source_kind", "source_kind"]


class SourceKind(Protocol):
    """A kind of source the loader does not know by itself."""

    name: str

    def recognises(self, path: str) -> bool:
        """Whether `path`, as written in a source list, is a source of this kind."""

    def locate(self, path: str) -> Path:
        """The local Hugging Face folder whose config and tokenizer the source has (its layer count too)."""

    def fingerprint(self, path: str) -> str | None:
        """A content fingerprint of the source (see `metadata.fingerprint`); None when nothing can be read yet."""

    def load(self, path: str, device: str, dtype: str, trust_remote_code: bool) -> Source:
        """The loaded source named `path`, on `device` in `dtype`."""


_KINDS: dict[str, SourceKind] = {}


def register_source_kind(kind: SourceKind) -> SourceKind:
    """Make the loader recognise `kind`'s sources; registering a kind of the same name again replaces it."""
    _KINDS[kind.name] = kind
    return kind


def source_kind(path: str) -> SourceKind | None:
    """The registered kind that recognises `path`, or None for a model file or name the loader reads itself."""
    return next((k for k in _KINDS.values() if k.recognises(path)), None)
