"""A candidate: a route stitched over the loaded sources, or a recipe's merge, scored on the fitness tasks.

`CandidateScorer` is the one path from a route or a parameter-space recipe to its `Evaluation`, used by the
search's workers, the held-out and validation scoring, the study, the baselines' comparison and the demo.
Where the base source is a vision-language model, a candidate is scored as that VLM around the stitched or
merged language model, with its processor (`SourcePool.candidate`), so that tasks with images can score it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dfs_merge.errors import FitnessError
from dfs_merge.evaluation import Evaluation
from dfs_merge.merging.recipe import Recipe
from dfs_merge.route import Route

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from dfs_merge.fitness.score import Fitness
    from dfs_merge.genome_files import CandidateGenome
    from dfs_merge.merging.blend import Blender
    from dfs_merge.models.sources import SourcePool
    from dfs_merge.stitch import ActivationCache


class CandidateScorer:
    """Stitches routes over `pool` (sharing `activation_cache`, if any), or writes recipes' merges into one
    resident model (`blender`, made on the first recipe), and scores them with `fitness`."""

    def __init__(self, pool: SourcePool, fitness: Fitness, activation_cache: ActivationCache | None = None,
                 blender: Blender | None = None):
        self.pool = pool
        self.fitness = fitness
        self.activation_cache = activation_cache
        self.blender = blender

    def model(self, route: Route) -> PreTrainedModel:
        """The stitched model of `route` (no weight copied)."""
        from dfs_merge.stitch import stitch

        return stitch(self.pool, route, activation_cache=self.activation_cache)

    def __call__(self, route: Route, docs: tuple[float, float] | None = None) -> Evaluation:
        """Score `route` (on a race window `docs`, see `Fitness.score`); a candidate that fails gets a failed
        Evaluation, never an exception."""
        return self._score(self.model(route), len(route), docs)

    def _score(self, lm: PreTrainedModel, hops: int, docs: tuple[float, float] | None,
               tokenizer_source: int = 0) -> Evaluation:
        model, tokenizer = self.pool.candidate(lm, tokenizer_source)
        return self.fitness.score(model, tokenizer, hops=hops, docs=docs)

    def genome(self, genome: CandidateGenome, docs: tuple[float, float] | None = None) -> Evaluation:
        """Score a DFS genome (its checked route, tokenized by its `tokenizer_source`'s tokenizer) or a
        parameter-space recipe (merged in the resident model)."""
        if isinstance(genome, Recipe):
            if self.blender is None:
                from dfs_merge.merging.blend import Blender

                self.blender = Blender(self.pool)
            return self._score(self.blender.apply(genome), genome.layers, docs)
        route = genome.check()
        return self._score(self.model(route), len(route), docs, genome.settings().get("tokenizer_source", 0))

    def with_fitness(self, fitness: Fitness) -> CandidateScorer:
        """The same sources, activation cache and resident model, scored on other tasks (another split)."""
        return CandidateScorer(self.pool, fitness, self.activation_cache, self.blender)


def check_images(pool: SourcePool, fitness: Fitness) -> None:
    """Refuse, naming them, tasks that show images where the base source is a language model: they need a
    vision-language base (before any candidate is scored, rather than a failed score for each)."""
    image_tasks = fitness.image_tasks()
    if image_tasks and pool.vision is None:
        raise FitnessError(f"tasks {', '.join(image_tasks)} show images: the base source (source 0, {pool.paths[0]}) "
                           f"must be a vision-language model, and it is a {pool.base.config.model_type} language model")
