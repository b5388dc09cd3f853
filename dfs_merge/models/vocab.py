"""The sources' vocabularies: whether they can share one model's embeddings and LM head, and how their rows line up.

Sources share a vocabulary when their tokenizers hold the same tokens at the same ids. They may also differ where
one vocabulary is a prefix of the other's: every token of the shorter has the same id (and string) in the longer,
which only appends tokens (LLaVA-1.6-Mistral adds `<image>` to Mistral's 32000 tokens and pads its language
model's rows to 32064). A route takes only decoder layers from the other sources; its embeddings, final norm
and LM head are the base's (source 0), so such sources need nothing more. A parameter-space merge merges, in
the tensors with a row per token (the embeddings, the LM head: `Family.vocab_weights`), the rows that hold the
same token in every source (`VocabMap.shared`) and keeps the base's other rows as they are (`VocabMap.rows`).
The base may hold the longer vocabulary or the shorter: the shared rows are the same either way, and the merge
has the base's shape. A genome's `embed_source`, `head_source` and `tokenizer_source` must then name a source of
the base's own vocabulary (`VocabMap.check_settings`). Anything else (another tokenizer, a reordered
vocabulary) is refused in one line naming the first token id that differs (`vocab_map`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dfs_merge.errors import GenomeError, IncompatibleSources

if TYPE_CHECKING:
    from dfs_merge.models.families import Family

__all__ = ["SETTING_SOURCES", "VocabMap", "vocab_map"]

SETTING_SOURCES = ("embed_source", "head_source", "tokenizer_source")
"""The genome settings that name a source whose vocabulary the merge then has."""


@dataclass(frozen=True)
class VocabMap:
    """How the sources' vocabulary rows line up with the base's (source 0's): each source's `vocab_size` (`sizes`),
    whether its vocabulary is the base's (`same`: the same tokens at the same ids, as many rows), and the rows
    `[0, shared)` that hold the same token in every source."""

    sizes: tuple[int, ...]
    same: tuple[bool, ...]
    shared: int

    @property
    def uniform(self) -> bool:
        """Whether every source has the base's vocabulary (no row needs mapping)."""
        return all(self.same)

    def rows(self, name: str, family: Family) -> int | None:
        """The rows of the tensor `name` that a merge takes from every source: `shared` for a tensor with a row per
        token where the vocabularies differ (the base's rows past it are kept), None (the whole tensor) otherwise."""
        return None if self.uniform or name not in family.vocab_weights else self.shared

    def check_settings(self, settings: Mapping[str, Any]) -> None:
        """Refuse an `embed_source`, `head_source` or `tokenizer_source` in `settings` that names a source whose
        vocabulary is not the base's (a GenomeError of one line)."""
        for what in SETTING_SOURCES:
            i = settings.get(what)
            if isinstance(i, int) and 0 <= i < len(self.same) and not self.same[i]:
                raise GenomeError(f"{what} {i}: source {i}'s vocabulary ({self.sizes[i]} rows) is not the base's "
                                  f"({self.sizes[0]}); where the sources' vocabularies differ, the embeddings, LM head "
                                  "and tokenizer are the base's (source 0)")


def vocab_map(configs: Sequence[tuple[Any, Family]], tokenizers: Sequence[Any] | None = None) -> VocabMap:
    """The sources' `VocabMap`, or an IncompatibleSources of one line: without `tokenizers`, sources of another
    `vocab_size` than the base's; with them, a tokenizer that is neither the base's nor in a prefix relation with
    it (naming the first token id whose token differs)."""
    sizes = tuple(int(fam.config_value(cfg, "vocab_size")) for cfg, fam in configs)
    if not tokenizers:
        for i, size in enumerate(sizes[1:], start=1):
            if size != sizes[0]:
                raise IncompatibleSources(f"sources 0 and {i} differ in vocab_size: {sizes[0]} vs {size}")
        return VocabMap(sizes, (True,) * len(sizes), sizes[0] if sizes else 0)
    base = tokenizers[0].get_vocab()
    base_ids = {k: t for t, k in base.items()}
    same, shared = [True], sizes[0]
    for i, tok in enumerate(tokenizers[1:], start=1):
        vocab = tok.get_vocab()
        if vocab == base:
            same.append(sizes[i] == sizes[0])
            shared = min(shared, sizes[i])
            continue
        ids = {k: t for t, k in vocab.items()}
        common = min(max(base_ids, default=-1), max(ids, default=-1)) + 1  # the ids both tokenizers reach
        first = next((k for k in range(common) if base_ids.get(k) != ids.get(k)), None)
        if first is not None:
            raise IncompatibleSources(
                f"sources 0 and {i} differ in tokenizer at token id {first}: {base_ids.get(first)!r} vs "
                f"{ids.get(first)!r} ({len(base)} vs {len(vocab)} tokens; one vocabulary must be the other's or a "
                "prefix of it)")
        same.append(False)
        shared = min(shared, sizes[i], common)
    return VocabMap(sizes, tuple(same), shared)
