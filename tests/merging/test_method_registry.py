"""A new merge method is one definition plus its registration: a toy method defined here, registered, is
accepted by the recipe, its file, the run config, and merged by the resident model and a hybrid's source."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
import torch

from dfs_merge.config import MergeConfig
from dfs_merge.genome_files import load_genome, save_genome
from dfs_merge.merging.blend import recipe_model
from dfs_merge.merging.methods import METHODS, Method, register_method
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.sources import SourcePool

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class WeightedMax(Method):
    """A toy method: each value is the largest of the sources' weighted values."""

    def merge(self, tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None,
              **options: object) -> torch.Tensor:
        return torch.stack([t * w for t, w in zip(tensors, weights, strict=True)]).amax(dim=0)


@pytest.fixture
def weighted_max() -> Iterator[Method]:
    method = register_method(WeightedMax("weighted_max", needs_base=False))
    yield method
    del METHODS[method.name]


def test_a_registered_method_merges_a_recipe(weighted_max, tiny_source_dirs, tmp_path):
    sources = tuple(str(d) for d in tiny_source_dirs[:2])
    recipe = Recipe(sources, 4, "weighted_max", None, 2, ((0.5, 1.0), (1.5, 0.25)))
    save_genome(recipe, tmp_path / "max.recipe.yaml")
    assert load_genome(tmp_path / "max.recipe.yaml") == recipe
    assert MergeConfig(method="weighted_max", base=None).method == "weighted_max"

    pool = SourcePool.load(list(sources))
    merged = dict(recipe_model(recipe, pool).named_parameters())
    states = [dict(s.model.named_parameters()) for s in pool.sources]
    for name, value in merged.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        g = recipe.group(layer) if layer is not None else (0 if "embed" in name else 1)
        a, b = (states[s][name] * recipe.weights[s][g] for s in (0, 1))
        assert torch.equal(value, torch.maximum(a, b)), name

    hybrid = SourcePool.load([str(tmp_path / "max.recipe.yaml")])  # the recipe file as a source
    for name, value in hybrid.sources[0].model.named_parameters():
        assert torch.equal(value, merged[name]), name


def test_an_unregistered_method_is_refused_naming_the_registered_ones(weighted_max):
    with pytest.raises(ValueError, match="unknown merge method 'weighted_min'; supported: .*weighted_max"):
        MergeConfig(method="weighted_min")
