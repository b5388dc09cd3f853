"""The loaded sources an export writes from: checked against the genome, merged first for a recipe."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dfs_merge.errors import SourceError
from dfs_merge.export.progress import Progress
from dfs_merge.merging.blend import merged_pool
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.metadata import check_same_sources
from dfs_merge.models.sources import SourcePool

if TYPE_CHECKING:
    from dfs_merge.genome_files import CandidateGenome

__all__ = ["check_layers", "check_pool", "written_pool"]


def check_pool(pool: SourcePool, genome: CandidateGenome) -> None:
    """The pool must hold the genome's sources: same number, same layer counts, the same weights; the sources its
    settings take the embeddings, head and tokenizer from must have the base's vocabulary (`VocabMap.check_settings`)."""
    check_layers(pool.layers_per_source, genome)
    check_same_sources(genome.sources, genome.fingerprints, pool.paths)
    pool.vocab.check_settings(genome.settings())


def check_layers(have: tuple[int, ...], genome: CandidateGenome) -> None:
    """The sources' layer counts (`have`) must be the genome's: a SourceError naming both otherwise."""
    want = genome.source_layers
    if have != want:
        raise SourceError(
            f"the loaded sources ({len(have)} with layers {list(have)}) are not the genome's "
            f"({len(want)} with layers {list(want)}: {', '.join(genome.sources)})"
        )


def written_pool(pool: SourcePool, genome: CandidateGenome, show: Progress) -> SourcePool:
    """The pool whose route is written: the sources themselves, or for a recipe its merge as the one source."""
    if not isinstance(genome, Recipe):
        return pool
    with show.stage(f"merging ({genome.method}, {genome.layer_groups} layer groups)", "merged"):
        return merged_pool(genome, pool)
