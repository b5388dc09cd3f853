"""The TIES / DARE deltas and magnitude ranks the resident model keeps between candidates: every candidate's
merge the same bit for bit as merging it alone and as mergekit's own `merge_group`, ties in magnitude at the
pruning threshold included; the sign election is PEFT's."""

from __future__ import annotations

import pytest
import torch

from dfs_merge.merging.blend import Blender
from dfs_merge.merging.methods import METHODS, Delta, majority_sign_mask, merge_deltas, merge_tensor
from dfs_merge.merging.recipe import initial_recipe
from dfs_merge.models.sources import SourcePool

pytestmark = pytest.mark.usefixtures("one_thread")
TIED = "model.layers.2.mlp.up_proj.weight"  # source 1's delta there takes two magnitudes only


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, the sign of a zero included (`torch.equal` takes -0.0 for 0.0)."""
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def tied(base: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A base on a dyadic grid (-0.0 in places) and a source 1/64 or 2/64 away from it everywhere: its delta is
    exact and has two magnitudes, so that every density's threshold falls inside a tie."""
    grid = torch.round(base * 256) / 256
    grid[torch.rand(grid.shape, generator=gen) < 0.1] = -0.0
    step = torch.randint(1, 3, grid.shape, generator=gen) * (torch.randint(0, 2, grid.shape, generator=gen) * 2 - 1)
    return grid, grid + step / 64


@pytest.fixture
def pool(tiny_source_dirs, tiny_trained_dir) -> SourcePool:
    """Three tiny sources (two merged over source 0), with ties in magnitude in source 1's delta at `TIED`."""
    pool = SourcePool.load([str(tiny_source_dirs[0]), str(tiny_source_dirs[1]), str(tiny_trained_dir)])
    params = [dict(s.model.named_parameters()) for s in pool.sources]
    base, other = tied(params[0][TIED].detach(), torch.Generator().manual_seed(5))
    with torch.no_grad():
        params[0][TIED].copy_(base)
        params[1][TIED].copy_(other)
    return pool


def state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_kept_deltas_merge_every_candidate_bit_for_bit_as_alone(method, pool):
    template = initial_recipe(pool.paths, len(pool.base.layers), method, 0, 2, 1.0)
    kept, alone = Blender(pool), Blender(pool, keep=0)
    partly = Blender(pool, keep=sum(p.numel() for p in pool.base.model.parameters()) * 4 // 2)  # ranks for some
    gen = torch.Generator().manual_seed(0)
    candidates = []
    for c in range(4):  # weights in [0, 1.5), densities in [0.1, 1); one density 1
        values = (torch.rand(8, generator=gen) * torch.tensor([1.5] * 4 + [0.9] * 4) + torch.tensor([0.0] * 4 + [0.1] * 4))
        values[4 + c] = 1.0 if c == 2 else values[4 + c]
        candidates.append(template.with_bits((), [float(v) for v in values]))
    moved = list(candidates[-1].scales)
    moved[4 + 1] = 0.35 if moved[4 + 1] != 0.35 else 0.45  # source 1's density, layer group 1 (holds TIED)
    candidates.append(candidates[-1].with_bits((), moved))
    merges = []
    for recipe in candidates:
        ours, theirs, some = state(kept.apply(recipe)), state(alone.apply(recipe)), state(partly.apply(recipe))
        assert all(same_bits(ours[n], theirs[n]) and same_bits(some[n], theirs[n]) for n in ours), recipe
        merges.append(ours)
    assert kept.recomputed < len(kept.tensors)  # the last candidate moved one group's values only
    assert not torch.equal(merges[-2][TIED], merges[-1][TIED])  # that density moves the merge
    assert (kept.kept_bytes > 0) == (method == "ties") and alone.kept_bytes == 0  # DARE keeps no rank
    assert partly.kept_bytes <= partly.keep and (method != "ties" or 0 < partly.kept_bytes < kept.kept_bytes)
    if method == "ties":  # the tensor with ties: every candidate's density put its threshold inside a tie
        magnitude = (pool.sources[1].model.get_parameter(TIED) - pool.sources[0].model.get_parameter(TIED)).abs()
        for recipe in candidates:
            density = recipe.params(1)[1][0]
            k = max(1, int(density * magnitude.numel()))
            kth = torch.kthvalue(magnitude.reshape(-1), magnitude.numel() - k + 1).values
            assert density == 1 or int((magnitude >= kth).sum()) > k


def deltas_with_ties(m: int, gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base, first = tied(torch.randn(24, 20, generator=gen) * 0.1, gen)
    return base, [first] + [base + torch.randn(24, 20, generator=gen) * 0.02 for _ in range(m - 1)]


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_merge_is_mergekits_merge_group_bit_for_bit(method, m):
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    from mergekit.merge_methods.base import TensorGroup

    gen = torch.Generator().manual_seed(m)
    base, sources = deltas_with_ties(m, gen)
    group = TensorGroup.from_tensors([base, *sources], base_index=0)
    kept = [Delta(t, base, ranked=True) for t in sources]
    for density in (0.3, 0.71, 0.5):
        weights, densities = [0.4 + 0.3 * i for i in range(m)], [density - 0.05 * i for i in range(m)]
        torch.manual_seed(7)  # mergekit's DARE draws from the global generator
        want = registry.get(method).merge_group(
            group, weight=dict(enumerate(weights, 1)), density=dict(enumerate(densities, 1)),
            normalize=METHODS[method].normalize, rescale=METHODS[method].rescale, int8_mask=False, **{"lambda": 1.0})
        alone = merge_tensor(METHODS[method], sources, weights, base=base, densities=densities,
                             generator=torch.Generator().manual_seed(7))
        reused = merge_deltas(METHODS[method], kept, weights, base, densities, generator=torch.Generator().manual_seed(7))
        assert same_bits(alone, want) and same_bits(reused, want), density


def test_sign_election_is_peft_majority_sign_mask():
    from peft.utils.merge_utils import calculate_majority_sign_mask

    gen = torch.Generator().manual_seed(1)
    for m in (1, 2, 3):
        stack = torch.randint(-2, 3, (m, 50, 7), generator=gen).float() * 0.5  # zeros, and columns summing to 0
        stack[:, 0, 0] = torch.tensor([-0.0] * m)
        mask = majority_sign_mask(stack)
        assert mask.dtype == stack.dtype and torch.equal(mask.bool(), calculate_majority_sign_mask(stack, "total"))
