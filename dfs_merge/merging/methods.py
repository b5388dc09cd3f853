"""Parameter-space merge methods on one tensor, with the semantics of mergekit's methods of the same names.

- `linear`: sum_i w_i x_i, divided by sum_i w_i when `normalize` (mergekit's default for linear).
- `task_arithmetic`: base + lambda * sum_i w_i (x_i - base), divided by sum_i w_i when `normalize`.
- `ties`: the deltas x_i - base pruned to their `density` largest magnitudes, weighted, the majority sign
  elected on the weighted sum; only deltas agreeing with it are summed, divided by the agreeing weights'
  sum when `normalize` (default).
- `dare_linear`, `dare_ties`: as task arithmetic and TIES, with a random (Bernoulli) mask of probability
  `density` on each delta, rescaled to keep its L1 norm (mergekit's `rescale`, on by default).

What comes from a library and what is written here: the sign election is PEFT's
`calculate_majority_sign_mask(..., "total")` and the weight broadcast PEFT's `reshape_weight_task_tensors`
(`peft.utils.merge_utils`). PEFT's composite `ties` / `dare_*` do not match mergekit (one density for all
sources, the disjoint mean divided by a count rather than by the weights, the DARE rescale 1/density rather
than mergekit's L1 norm), and mergekit is not a runtime dependency, so the pruning (magnitude top-k keeping
at least one value, mergekit's rule; the Bernoulli mask drawn from a seeded generator per tensor) and the
weighted sum and its divisor are written here, checked against `mergekit-yaml` in the tests.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and peft are imported where tensors are merged: reading a recipe needs neither
    import torch


@dataclass(frozen=True)
class Method:
    """One merge method: whether it needs a base, prunes (`magnitude` / `random`), elects signs, and its
    mergekit defaults for `normalize` and `rescale`."""

    name: str
    needs_base: bool
    sparsify: str | None = None
    consensus: bool = False
    normalize: bool = False
    rescale: bool = False

    @property
    def has_density(self) -> bool:
        return self.sparsify is not None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("linear", needs_base=False, normalize=True),
    Method("task_arithmetic", needs_base=True),
    Method("ties", needs_base=True, sparsify="magnitude", consensus=True, normalize=True),
    Method("dare_linear", needs_base=True, sparsify="random", rescale=True),
    Method("dare_ties", needs_base=True, sparsify="random", consensus=True, rescale=True),
)}


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of largest magnitudes (at least one value), zero the rest (mergekit's rule).

    The k-th largest magnitude is found with a selection (`kthvalue`, linear time) rather than mergekit's full
    sort; where several values tie at that magnitude (so that a threshold would keep more than k), the sort
    decides, as in mergekit."""
    import torch

    if density >= 1:
        return delta
    n = delta.numel()
    k = max(1, int(density * n))
    magnitude = delta.abs().reshape(-1).float()
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    keep = magnitude >= threshold
    if int(keep.sum()) != k:  # ties at the threshold
        keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
        keep[torch.argsort(magnitude, descending=True)[:k]] = True
    return delta * keep.reshape_as(delta).to(delta.dtype)


def random_prune(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """Keep each value with probability `density` (DARE); with `rescale`, restore the delta's L1 norm."""
    import torch

    if density >= 1:
        return delta
    work = delta.float()
    mask = torch.bernoulli(torch.full_like(work, density), generator=generator)
    kept = work * mask
    if rescale:
        before, after = work.abs().sum(), kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            kept = kept * (before / after)
    return kept.to(delta.dtype)


def tensor_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The random generator of DARE's mask for one tensor: a function of the recipe's seed and the tensor's
    name only, so that a tensor's merge is the same whatever else was merged before it."""
    import torch

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little"))
    return gen


def merge_tensor(
    method: Method,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    densities: Sequence[float] | None = None,
    normalize: bool | None = None,
    lam: float = 1.0,
    rescale: bool | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge `tensors` (the non-base sources' for a method with a base; every source's for `linear`) with one
    weight (and density) each; the result has the dtype of the first input."""
    import torch
    from peft.utils.merge_utils import calculate_majority_sign_mask, reshape_weight_task_tensors

    normalize = method.normalize if normalize is None else normalize
    rescale = method.rescale if rescale is None else rescale
    first = tensors[0] if base is None else base
    if method.name == "linear":
        work = torch.float64 if first.dtype == torch.float64 else torch.float32
        w = torch.tensor(list(weights), dtype=work, device=first.device)
        out = torch.zeros_like(first, dtype=work)
        for t, c in zip(tensors, w, strict=True):
            out.add_(t.to(work) * c)
        if normalize:
            out.div_(w.sum())
        return out.to(first.dtype)
    if base is None:
        raise ValueError(f"{method.name} needs a base tensor")
    if not tensors:
        return base.clone()
    if method.sparsify is None and not method.consensus:  # task arithmetic: no stacked deltas needed
        divisor = math.fsum(weights) if normalize else 1.0
        scale = lam / (divisor if abs(divisor) >= 1e-8 else 1.0)
        out = base.clone()
        for t, w in zip(tensors, weights, strict=True):
            out.add_(t - base, alpha=w * scale)
        return out
    deltas = torch.stack([t - base for t in tensors])
    if method.sparsify is not None:
        assert densities is not None
        for i, d in enumerate(densities):
            deltas[i] = (magnitude_prune(deltas[i], d) if method.sparsify == "magnitude"
                         else random_prune(deltas[i], d, rescale, generator or torch.Generator()))
    w = reshape_weight_task_tensors(deltas, torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device))
    deltas.mul_(w)
    if method.consensus:
        mask = calculate_majority_sign_mask(deltas, method="total").to(deltas.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (base + mixed).to(base.dtype)
