"""A candidate: a route stitched over the loaded sources, or a recipe's merge, scored on the fitness tasks.

`CandidateScorer` is the one path from a route or a parameter-space recipe to its `Evaluation`, used by the
search's workers, the held-out and validation scoring, the study, the baselines' comparison and the demo.
"""

from __future__ import annotations

from typing import Any

from dfs_merge.evaluation import Evaluation
from dfs_merge.genome import Route


class CandidateScorer:
    """Stitches routes over `pool` (sharing `activation_cache`, if any), or writes recipes' merges into one
    resident model (`blender`, made on the first recipe), and scores them with `fitness`."""

    def __init__(self, pool: Any, fitness: Any, activation_cache: Any = None, blender: Any = None):
        self.pool = pool
        self.fitness = fitness
        self.activation_cache = activation_cache
        self.blender = blender

    def model(self, route: Route) -> Any:
        """The stitched model of `route` (no weight copied)."""
        from dfs_merge.stitch import stitch

        return stitch(self.pool, route, activation_cache=self.activation_cache)

    def __call__(self, route: Route, docs: tuple[float, float] | None = None) -> Evaluation:
        """Score `route` (on a race window `docs`, see `Fitness.score`); a candidate that fails gets a failed
        Evaluation, never an exception."""
        return self.fitness.score(self.model(route), self.pool.tokenizer, hops=len(route), docs=docs)

    def genome(self, genome: Any, docs: tuple[float, float] | None = None) -> Evaluation:
        """Score a DFS genome (its checked route, tokenized by its `tokenizer_source`'s tokenizer) or a
        parameter-space recipe (merged in the resident model)."""
        from dfs_merge.merging.recipe import Recipe

        if not isinstance(genome, Recipe):
            if not genome.tokenizer_source:
                return self(genome.check(), docs)
            route = genome.check()
            tokenizer = self.pool.tokenizer_for(genome.tokenizer_source)
            return self.fitness.score(self.model(route), tokenizer, hops=len(route), docs=docs)
        if self.blender is None:
            from dfs_merge.merging.blend import Blender

            self.blender = Blender(self.pool)
        model = self.blender.apply(genome)
        return self.fitness.score(model, self.pool.tokenizer, hops=genome.layers, docs=docs)

    def with_fitness(self, fitness: Any) -> CandidateScorer:
        """The same sources, activation cache and resident model, scored on other tasks (another split)."""
        return CandidateScorer(self.pool, fitness, self.activation_cache, self.blender)
