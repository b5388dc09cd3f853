"""Parameter-space merge methods on one tensor, with the semantics of mergekit's methods of the same names.

- `linear`: sum_i w_i x_i, divided by sum_i w_i when `normalize` (mergekit's default for linear).
- `task_arithmetic`: base + lambda * sum_i w_i (x_i - base), divided by sum_i w_i when `normalize`.
- `ties`: the deltas x_i - base pruned to their `density` largest magnitudes, weighted, the majority sign
  elected on the weighted sum; only deltas agreeing with it are summed, divided by the agreeing weights'
  sum when `normalize` (default).
- `dare_linear`, `dare_ties`: as task arithmetic and TIES, with a random (Bernoulli) mask of probability
  `density` on each delta, rescaled to keep its L1 norm (mergekit's `rescale`, on by default).

What comes from a library and what is written here: the weight broadcast is PEFT's
`reshape_weight_task_tensors` (`peft.utils.merge_utils`). PEFT's composite `ties` / `dare_*` do not match
mergekit (one density for all sources, the disjoint mean divided by a count rather than by the weights, the
DARE rescale 1/density rather than mergekit's L1 norm), and mergekit is not a runtime dependency, so the
pruning (magnitude top-k keeping at least one value, mergekit's rule; the Bernoulli mask drawn from a seeded
generator per tensor), the weighted sum and its divisor are written here, checked against `mergekit-yaml`
in the tests; the sign election is PEFT's `calculate_majority_sign_mask(..., "total")` written with the deltas'
dtype (the same mask, tested against it, without its int64 and boolean intermediates, which on the CPU cost
more than the rest of a TIES merge with kept ranks).

`METHODS` is the registry of methods by name, which recipes, the run config and the CLI read: a new method is
a `Method` (its flags; a subclass overriding `merge` for new arithmetic) passed to `register_method`.

A search merges the same deltas for every candidate with new weights and densities only: a `Delta` kept
between candidates keeps what none of them changes, and, made with `ranked=True`, each value's rank in
mergekit's magnitude order (`magnitude_rank`), so that a density's top-k is one comparison instead of a
selection or a sort.
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
    mergekit defaults for `normalize` and `rescale`. Its `merge` is the built-in one (`merge_tensor`), which
    these flags configure; a method of other arithmetic is a subclass that overrides `merge`."""

    name: str
    needs_base: bool
    sparsify: str | None = None
    consensus: bool = False
    normalize: bool = False
    rescale: bool = False

    @property
    def has_density(self) -> bool:
        return self.sparsify is not None

    @property
    def keeps_deltas(self) -> bool:
        """Whether a resident model merges it from deltas kept between candidates (`merge_deltas`): the built-in
        merge of a method with a base that prunes or elects signs."""
        return (self.needs_base and (self.sparsify is not None or self.consensus)
                and type(self).merge is Method.merge)

    def merge(
        self,
        tensors: Sequence[torch.Tensor],
        weights: Sequence[float],
        base: torch.Tensor | None = None,
        densities: Sequence[float] | None = None,
        normalize: bool | None = None,
        lam: float = 1.0,
        rescale: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One tensor's merge: `tensors` are the merged sources' (all but the base's for a method with a base),
        one weight (and density) each; the result has the dtype of the first input (`merge_tensor`)."""
        return merge_tensor(self, tensors, weights, base, densities, normalize, lam, rescale, generator)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("linear", needs_base=False, normalize=True),
    Method("task_arithmetic", needs_base=True),
    Method("ties", needs_base=True, sparsify="magnitude", consensus=True, normalize=True),
    Method("dare_linear", needs_base=True, sparsify="random", rescale=True),
    Method("dare_ties", needs_base=True, sparsify="random", consensus=True, rescale=True),
)}
"""The merge methods by name (the built-in ones, mergekit's, and those `register_method` adds)."""


def register_method(method: Method) -> Method:
    """Make `method` available to recipes, the run config (`merge.method`) and the CLI under its name."""
    METHODS[method.name] = method
    return method


def unknown_method(name: object) -> str:
    """The message for a method name that is not registered."""
    return f"unknown merge method {name!r}; supported: {', '.join(METHODS)}"


def magnitude_rank(delta: torch.Tensor) -> torch.Tensor:
    """Each value's position (int32, 0 = largest) in mergekit's order of magnitudes, `argsort(|delta|,
    descending=True)`: the values magnitude pruning keeps at any density are `rank < k`, ties at the k-th
    magnitude broken as mergekit's sort breaks them (torch's sort is not stable: only the sort itself can)."""
    import torch

    n = delta.numel()
    order = torch.argsort(delta.abs().reshape(-1).float(), descending=True)
    rank = torch.empty(n, dtype=torch.int32, device=delta.device)
    rank[order] = torch.arange(n, dtype=torch.int32, device=delta.device)
    return rank.reshape_as(delta)


def magnitude_mask(delta: torch.Tensor, density: float, rank: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """1 where magnitude pruning at `density` (< 1) keeps a value (the largest magnitudes, at least one: mergekit's
    rule), 0 elsewhere, in the delta's dtype (into `out` when given).

    With `rank` (`magnitude_rank(delta)`, computed once for many densities) it is one comparison. Without, the
    k-th largest magnitude is found with a selection (`kthvalue`, linear time) rather than mergekit's full
    sort; where several values tie at that magnitude (so that a threshold would keep more than k), the sort
    decides, as in mergekit."""
    import torch

    out = torch.empty_like(delta) if out is None else out
    if density <= 0:
        return out.zero_()
    n = delta.numel()
    k = max(1, int(density * n))
    if rank is None:
        magnitude = delta.abs().reshape(-1).float()
        keep = magnitude >= torch.kthvalue(magnitude, n - k + 1).values
        if int(keep.sum()) == k:
            return out.copy_(keep.reshape_as(delta))
        rank = magnitude_rank(delta)  # ties at the threshold
    return torch.lt(rank, k, out=out)


def magnitude_prune(delta: torch.Tensor, density: float, rank: torch.Tensor | None = None) -> torch.Tensor:
    """The delta with all but its `density` fraction of largest magnitudes zeroed (`magnitude_mask`)."""
    return delta if density >= 1 else delta * magnitude_mask(delta, density, rank)


def random_prune(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator,
                 l1: torch.Tensor | None = None) -> torch.Tensor:
    """Keep each value with probability `density` (DARE); with `rescale`, restore the delta's L1 norm (`l1`
    when given: it is the same for every density)."""
    import torch

    if density >= 1:
        return delta
    work = delta.float()
    mask = torch.bernoulli(torch.full_like(work, density), generator=generator)
    kept = work * mask
    if rescale:
        before, after = work.abs().sum() if l1 is None else l1, kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            kept = kept * (before / after)
    return kept.to(delta.dtype)


class Delta:
    """One source's tensor against the base's for one tensor name, and what pruning their delta at any density
    needs that no candidate changes, computed on first use and kept for the next candidates: the delta's L1
    norm (DARE's rescale, a scalar) and, when `ranked`, each value's magnitude rank (TIES: 4 bytes a value).
    The delta itself is not kept: it is one pass to recompute and would cost as much again."""

    __slots__ = ("_l1", "_rank", "base", "ranked", "tensor")

    def __init__(self, tensor: torch.Tensor, base: torch.Tensor, ranked: bool = False):
        self.tensor, self.base, self.ranked = tensor, base, ranked
        self._rank: torch.Tensor | None = None
        self._l1: torch.Tensor | None = None

    def prune_into(self, out: torch.Tensor, method: Method, density: float, rescale: bool,
                   generator: torch.Generator | None, scratch: Scratch | None = None) -> None:
        """Write the delta pruned as `method` prunes at `density` (DARE's mask drawn from `generator`) into `out`
        (TIES's mask into `scratch`'s buffer)."""
        import torch

        delta = torch.sub(self.tensor, self.base, out=out)
        if density >= 1 or method.sparsify is None:
            return
        if method.sparsify == "magnitude":
            if self.ranked and self._rank is None:
                self._rank = magnitude_rank(delta)
            keep = (scratch or Scratch()).take("keep", delta.shape, delta)
            delta.mul_(magnitude_mask(delta, density, self._rank, keep))
            return
        if rescale and self._l1 is None:
            self._l1 = delta.float().abs().sum()
        delta.copy_(random_prune(delta, density, rescale, generator or torch.Generator(), self._l1))

    @property
    def nbytes(self) -> int:
        """The bytes it keeps: the rank, once computed."""
        return 0 if self._rank is None else self._rank.numel() * self._rank.element_size()


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

    normalize = method.normalize if normalize is None else normalize
    rescale = method.rescale if rescale is None else rescale
    first = tensors[0] if base is None else base
    if not method.needs_base:  # linear
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
    return merge_deltas(method, [Delta(t, base) for t in tensors], weights, base, densities, normalize, lam,
                        rescale, generator)


class Scratch:
    """The buffers `merge_deltas` writes its intermediates into, one per role, grown to the largest tensor
    merged and reused: on the CPU a fresh tensor of megabytes costs its page faults, which cost more than the
    pass that fills it (a resident model merging hundreds of tensors a candidate keeps one)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, role: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of `shape` with `like`'s dtype and device: `role`'s buffer (its last contents
        are overwritten)."""
        import torch

        n, key = math.prod(shape), (role, like.dtype, like.device)
        if key not in self._buffers or self._buffers[key].numel() < n:
            self._buffers[key] = torch.empty(n, dtype=like.dtype, device=like.device)
        return self._buffers[key][:n].view(*shape)


def sum_stacked(stacked: torch.Tensor, out: torch.Tensor, zero_sign: bool = True) -> torch.Tensor:
    """`stacked.sum(dim=0)` into `out`. Where one tensor is stacked (two sources: a base and one other), the
    same bits without the sum's fill and pass: that tensor + 0.0 (as in the sum, -0.0 becomes 0.0), or, with
    `zero_sign=False` (where the sign of a zero cannot matter), the tensor itself."""
    import torch

    if len(stacked) > 1:
        return torch.sum(stacked, dim=0, out=out)
    return torch.add(stacked[0], 0.0, out=out) if zero_sign else stacked[0]


def majority_sign_mask(deltas: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
    """TIES's sign election on weighted deltas stacked on dimension 0: 1 where a value has the sign of its
    column's sum (+ where the sum is >= 0), 0 elsewhere and for zeros, in the deltas' dtype. PEFT's
    `calculate_majority_sign_mask(deltas, "total")` with its int64 majority and boolean result replaced by the
    deltas' dtype: on the CPU those conversions cost more than the rest of a merge whose deltas are kept."""
    import torch

    scratch = scratch or Scratch()
    shape = deltas.shape[1:]
    total = sum_stacked(deltas, scratch.take("total", shape, deltas), zero_sign=False)  # only compared with 0
    majority = torch.ge(total, 0, out=scratch.take("majority", shape, deltas)).mul_(2).sub_(1)
    return torch.sign(deltas, out=scratch.take("agree", deltas.shape, deltas)).eq_(majority)


def merge_deltas(
    method: Method,
    deltas: Sequence[Delta],
    weights: Sequence[float],
    base: torch.Tensor,
    densities: Sequence[float] | None = None,
    normalize: bool | None = None,
    lam: float = 1.0,
    rescale: bool | None = None,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """A method with a base that prunes or elects signs (TIES, DARE) over the merged sources' `deltas`: each
    pruned at its density, weighted, summed (over the agreeing signs for TIES), divided by mergekit's divisor,
    added to `base` (into `out` when given: a resident model's buffer; the intermediates into `scratch`'s).
    `merge_tensor`'s path, and the resident model's with deltas it keeps between candidates."""
    import torch
    from peft.utils.merge_utils import reshape_weight_task_tensors

    normalize = method.normalize if normalize is None else normalize
    rescale = method.rescale if rescale is None else rescale
    if not deltas:
        return base.clone() if out is None else out.copy_(base)
    if method.sparsify is not None and densities is None:
        raise ValueError(f"{method.name} needs one density per merged source")
    scratch = scratch or Scratch()
    stack = scratch.take("stack", (len(deltas), *base.shape), base)
    for i, d in enumerate(deltas):
        d.prune_into(stack[i], method, densities[i] if densities is not None else 1.0, rescale, generator, scratch)
    w = reshape_weight_task_tensors(stack, torch.tensor(list(weights), dtype=stack.dtype, device=stack.device))
    stack.mul_(w)
    mixed_out = scratch.take("mixed", base.shape, base)
    if method.consensus:
        mask = majority_sign_mask(stack, scratch)
        mixed = sum_stacked(stack.mul_(mask), mixed_out)
        divisor = sum_stacked(mask.mul_(w), scratch.take("divisor", base.shape, base), zero_sign=False)
        divisor.add_(torch.eq(divisor, 0, out=scratch.take("zero", base.shape, base)))  # 0 -> 1, as mergekit
    else:
        mixed = sum_stacked(stack, mixed_out)
        divisor = w.sum(dim=0)
        divisor.masked_fill_(divisor.abs() < 1e-8, 1)
    if normalize:
        mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    return torch.add(mixed, base, out=torch.empty_like(base) if out is None else out)
