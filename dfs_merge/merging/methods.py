"""Parameter-space merge methods on one tensor, with the semantics of mergekit's methods of the same names.

- `linear`: sum_i w_i x_i, divided by sum_i w_i when `normalize` (mergekit's default for linear).
- `task_arithmetic`: base + lambda * sum_i w_i (x_i - base), divided by sum_i w_i when `normalize`.
- `ties`: the deltas x_i - base pruned to their `density` largest magnitudes, weighted, the majority sign
  elected on the weighted sum; only deltas agreeing with it are summed, divided by the agreeing weights'
  sum when `normalize` (default).
- `dare_linear`, `dare_ties`: as task arithmetic and TIES, with a random (Bernoulli) mask of probability
  `density` on each delta, rescaled to keep its L1 norm (mergekit's `rescale`, on by default).
- `breadcrumbs`, `breadcrumbs_ties`: as task arithmetic and TIES, each delta keeping the `density` fraction of
  its magnitudes just below the largest `gamma` fraction (the outliers, dropped as well as the smallest).
- `della`, `della_linear`: as TIES and task arithmetic, each delta masked at random with a probability that
  grows with the value's magnitude rank in its row (`density` +- `epsilon`), then rescaled (L1).
- `slerp`: spherical interpolation at `t` between the base (t = 0) and one other model (t = 1), over each
  whole tensor; linear where the two are (anti)parallel.
- `nuslerp`: the same between two models' tensors (or, with a base, their deltas), at t = w_2 / (w_1 + w_2),
  over each whole tensor (`nuslerp_flatten`, default) or its rows (or columns: `nuslerp_row_wise`).
- `model_stock`: the base moved towards the models' average by a factor of the mean cosine between their
  deltas (`filter_wise`: per row); no weights.

What comes from a library and what is written here: the weight broadcast is PEFT's
`reshape_weight_task_tensors` (`peft.utils.merge_utils`). PEFT's composite `ties` / `dare_*` do not match
mergekit (one density for all sources, the disjoint mean divided by a count rather than by the weights, the
DARE rescale 1/density rather than mergekit's L1 norm), and mergekit is not a runtime dependency, so the
pruning (magnitude top-k keeping at least one value, mergekit's rule; the Bernoulli mask drawn from a seeded
generator per tensor), the weighted sum and its divisor are written here, checked against `mergekit-yaml`
in the tests; the sign election is PEFT's `calculate_majority_sign_mask(..., "total")` written with the deltas'
dtype (the same mask, tested against it, without its int64 and boolean intermediates, which on the CPU cost
more than the rest of a TIES merge with kept ranks). The interpolations and model stock follow mergekit
0.1.5's `merge_methods/slerp.py`, `nuslerp.py` and `model_stock.py` (the same formulas and working dtypes).

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and peft are imported where tensors are merged: reading a recipe needs neither
    import torch


Option = tuple[str, "bool | float"]
"""A method's other mergekit parameter and its default (`Method.options`)."""
GTA = ("normalize", "lambda", "rescale")
"""The shared parameters of mergekit's generalized task arithmetic, held by a recipe's own fields."""


@dataclass(frozen=True)
class Method:
    """One merge method: whether it needs a base (or takes one if given: `uses_base`), prunes (`magnitude`,
    `random`, `outliers`, `della`), elects signs, and its mergekit defaults for `normalize` and `rescale`.

    Its recipe: `weight` names the mergekit parameter of each merged source's searchable value (None: the
    method has none), one value for the whole merge when `shared_weight` (slerp's `t`), within
    `weight_bounds` when set; `merged` the (fewest, most) merged sources; `params` which of the recipe's
    `normalize`, `lambda`, `rescale` mergekit reads for it; `options` its other parameters and their
    defaults (one value for the whole merge). Its `merge` is the built-in one (`merge_tensor`), which these
    flags configure; a method of other arithmetic is a subclass that overrides `merge`."""

    name: str
    needs_base: bool
    sparsify: str | None = None
    consensus: bool = False
    normalize: bool = False
    rescale: bool = False
    uses_base: bool = False
    weight: str | None = "weight"
    shared_weight: bool = False
    weight_bounds: tuple[float, float] | None = None
    merged: tuple[int, int | None] = (1, None)
    params: tuple[str, ...] = GTA
    options: tuple[Option, ...] = ()
    default_weight: float | None = None

    @property
    def has_density(self) -> bool:
        return self.sparsify is not None

    @property
    def takes_base(self) -> bool:
        """Whether a recipe's base is merged as the base (not weighted): required, or optional and given."""
        return self.needs_base or self.uses_base

    @property
    def random(self) -> bool:
        """Whether its pruning draws random masks (from the recipe's `seed`)."""
        return self.sparsify in ("random", "della")

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
        options: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """One tensor's merge: `tensors` are the merged sources' (all but the base's for a method with a base),
        one weight (and density) each; the result has the dtype of the first input (`merge_tensor`)."""
        return merge_tensor(self, tensors, weights, base, densities, normalize, lam, rescale, generator, options)


class Slerp(Method):
    """mergekit's `slerp`: the base and one other model at `t` (the one merged source's weight)."""

    def merge(self, tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None,
              **_: Any) -> torch.Tensor:
        assert base is not None and len(tensors) == len(weights) == 1
        return slerp(weights[0], base, tensors[0])


class Nuslerp(Method):
    """mergekit's `nuslerp`: two models (or their deltas from a base) at t = w_2 / (w_1 + w_2)."""

    def merge(self, tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None,
              options: Mapping[str, Any] | None = None, **_: Any) -> torch.Tensor:
        assert len(tensors) == len(weights) == 2
        o = dict(self.options) | dict(options or {})
        total = math.fsum(weights)
        t = 0.5 if abs(total) < 1e-6 else weights[1] / total
        dim, flatten = (0 if o["nuslerp_row_wise"] else -1), bool(o["nuslerp_flatten"])
        if base is None:
            return nuslerp(t, tensors[0], tensors[1], dim, flatten)
        return base + nuslerp(t, tensors[0] - base, tensors[1] - base, dim, flatten)


class ModelStock(Method):
    """mergekit's `model_stock`: no weights; the base moved towards the models' average."""

    def merge(self, tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None,
              options: Mapping[str, Any] | None = None, **_: Any) -> torch.Tensor:
        assert base is not None
        return model_stock(base, tensors, bool((dict(self.options) | dict(options or {}))["filter_wise"]))


_NONE: tuple[str, ...] = ()
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("linear", needs_base=False, normalize=True, params=("normalize",)),
    Method("task_arithmetic", needs_base=True),
    Method("ties", needs_base=True, sparsify="magnitude", consensus=True, normalize=True),
    Method("dare_linear", needs_base=True, sparsify="random", rescale=True),
    Method("dare_ties", needs_base=True, sparsify="random", consensus=True, rescale=True),
    Method("breadcrumbs", needs_base=True, sparsify="outliers", options=(("gamma", 0.01),)),
    Method("breadcrumbs_ties", needs_base=True, sparsify="outliers", consensus=True, options=(("gamma", 0.01),)),
    Method("della", needs_base=True, sparsify="della", consensus=True, normalize=True, rescale=True,
           options=(("epsilon", 0.15),)),
    Method("della_linear", needs_base=True, sparsify="della", rescale=True, options=(("epsilon", 0.15),)),
    Slerp("slerp", needs_base=True, weight="t", shared_weight=True, weight_bounds=(0.0, 1.0), merged=(1, 1),
          params=_NONE, default_weight=0.5),
    Nuslerp("nuslerp", needs_base=False, uses_base=True, merged=(2, 2), params=_NONE,
            options=(("nuslerp_flatten", True), ("nuslerp_row_wise", False))),
    ModelStock("model_stock", needs_base=True, weight=None, merged=(2, None), params=_NONE,
               options=(("filter_wise", False),)),
)}
"""The merge methods by name (the built-in ones, mergekit's, and those `register_method` adds)."""


def register_method(method: Method) -> Method:
    """Make `method` available to recipes, the run config (`merge.method`) and the CLI under its name."""
    METHODS[method.name] = method
    return method


def unknown_method(name: object) -> str:
    """The message for a method name that is not registered."""
    return f"unknown merge method {name!r}; supported: {', '.join(METHODS)}"


def magnitude_rank(delta: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """Each value's position (int32, 0 = largest) in mergekit's order of magnitudes, `argsort(|delta|,
    descending=True)`: the values magnitude pruning keeps at any density are `rank < k`, ties at the k-th
    magnitude broken as mergekit's sort breaks them (torch's sort is not stable: only the sort itself can).
    `descending=False`: the position in breadcrumbs' ascending sort (0 = smallest)."""
    import torch

    n = delta.numel()
    order = torch.sort(delta.abs().reshape(-1).float(), descending=descending).indices
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


def l1_rescaled(kept: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """`kept` (a masked delta) scaled to the L1 norm `before` of the delta it masks, as mergekit's
    `rescaled_masked_tensor` does (unchanged when either norm is below 1e-7)."""
    after = kept.abs().sum()
    return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept


def outliers_bounds(n: int, density: float, gamma: float) -> tuple[int, int]:
    """[first, end) positions, in ascending magnitude order, of the values breadcrumbs keeps of `n`: the
    `density` fraction just below the largest `gamma` fraction (fewer outliers dropped where needed)."""
    target = int(density * n)
    bottom = max(0, n - target - int(gamma * n))
    return bottom, bottom + target


def outliers_prune(delta: torch.Tensor, density: float, gamma: float, rescale: bool,
                   rank: torch.Tensor | None = None) -> torch.Tensor:
    """Breadcrumbs' pruning (mergekit's `magnitude_outliers`): the smallest magnitudes and the largest `gamma`
    fraction zeroed, `density` of the values kept; with `rank` (`magnitude_rank(delta, descending=False)`)
    two comparisons instead of a sort; with `rescale`, the delta's L1 norm restored."""
    import torch

    if density >= 1:
        return delta
    first, end = outliers_bounds(delta.numel(), density, gamma)
    if rank is None:
        order = torch.sort(delta.abs().reshape(-1).float(), descending=False).indices
        mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
        mask[order[first:end]] = 1
        mask = mask.reshape_as(delta)
    else:
        mask = ((rank >= first) & (rank < end)).to(delta.dtype)
    kept = delta * mask
    return l1_rescaled(kept, delta.abs().sum()) if rescale else kept


def della_rank(delta: torch.Tensor) -> torch.Tensor:
    """Each value's magnitude rank within its row (a 1-D tensor is one row), scaled to [0, 1], in DELLA's
    working dtype (the delta's for bfloat16, else float32 on the CPU), as mergekit's `della_magprune` ranks."""
    import torch

    work = delta.dtype if delta.device.type != "cpu" or delta.dtype == torch.bfloat16 else torch.float32
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    return ((ranks - low) / (high - low)).clamp(0, 1)


def della_prune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator,
                rank: torch.Tensor | None = None) -> torch.Tensor:
    """DELLA's pruning (mergekit's `della_magprune`): each value kept with probability density - epsilon +
    2 epsilon x its row rank (`della_rank`, given or computed), drawn from `generator`; with `rescale`, the
    delta's L1 norm restored."""
    import torch

    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    check_della(density, epsilon)
    rank = della_rank(delta) if rank is None else rank
    rows = (delta if delta.dim() >= 2 else delta.unsqueeze(0)).to(rank.dtype)
    mask = torch.bernoulli((density - epsilon) + rank * (2 * epsilon), generator=generator).to(rank.dtype)
    kept = rows * mask
    if rescale:
        kept = l1_rescaled(kept, rows.abs().sum())
    return kept.to(delta.dtype).reshape(delta.shape)


def check_della(density: float, epsilon: float) -> None:
    """Refuse a DELLA density (below 1) whose keep probabilities density +- epsilon leave (0, 1), as mergekit does."""
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise ValueError(f"density {density:g} with epsilon {epsilon:g}: DELLA needs density +- epsilon within "
                         "(0, 1) (or density 1)")


RANKED = ("magnitude", "outliers", "della")
"""The pruning kinds whose per-value order a `Delta` can keep between candidates (4 bytes a value)."""


class Delta:
    """One source's tensor against the base's for one tensor name, and what pruning their delta at any density
    needs that no candidate changes, computed on first use and kept for the next candidates: the delta's L1
    norm (DARE's rescale, a scalar) and, when `ranked`, each value's rank in the pruning's order (TIES's
    descending magnitude rank, breadcrumbs' ascending one, DELLA's row rank in [0, 1]: 4 bytes a value).
    The delta itself is not kept: it is one pass to recompute and would cost as much again."""

    __slots__ = ("_l1", "_rank", "base", "ranked", "tensor")

    def __init__(self, tensor: torch.Tensor, base: torch.Tensor, ranked: bool = False):
        self.tensor, self.base, self.ranked = tensor, base, ranked
        self._rank: torch.Tensor | None = None
        self._l1: torch.Tensor | None = None

    def _ranks(self, delta: torch.Tensor, kind: str) -> torch.Tensor | None:
        """The kept rank of the pruning `kind` (made now if `ranked`); None when not kept."""
        if self.ranked and self._rank is None:
            self._rank = (della_rank(delta) if kind == "della"
                          else magnitude_rank(delta, descending=kind == "magnitude"))
        return self._rank

    def prune_into(self, out: torch.Tensor, method: Method, density: float, rescale: bool,
                   generator: torch.Generator | None, scratch: Scratch | None = None,
                   options: Mapping[str, Any] | None = None) -> None:
        """Write the delta pruned as `method` prunes at `density` (DARE's and DELLA's masks drawn from
        `generator`; breadcrumbs' `gamma` and DELLA's `epsilon` from `options`, else the method's defaults)
        into `out` (TIES's mask into `scratch`'s buffer)."""
        import torch

        delta = torch.sub(self.tensor, self.base, out=out)
        kind = method.sparsify
        if density >= 1 or kind is None:
            return
        o = dict(method.options) | dict(options or {})
        if kind == "magnitude":
            keep = (scratch or Scratch()).take("keep", delta.shape, delta)
            delta.mul_(magnitude_mask(delta, density, self._ranks(delta, kind), keep))
        elif kind == "outliers":
            delta.copy_(outliers_prune(delta, density, float(o["gamma"]), rescale, self._ranks(delta, kind)))
        elif kind == "della":
            delta.copy_(della_prune(delta, density, float(o["epsilon"]), rescale, generator or torch.Generator(),
                                    self._ranks(delta, kind)))
        else:
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
    options: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Merge `tensors` (the non-base sources' for a method with a base; every source's for `linear`) with one
    weight (and density) each, the method's other parameters in `options`; the result has the dtype of the
    first input."""
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
                        rescale, generator, options=options)


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
    options: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """A method with a base that prunes or elects signs (TIES, DARE) over the merged sources' `deltas`: each
    pruned at its density, weighted, summed (over the agreeing signs for TIES), divided by mergekit's divisor,
    added to `base` (into `out` when given: a resident model's buffer; the intermediates into `scratch`'s);
    `options`: the method's other parameters (breadcrumbs' `gamma`, DELLA's `epsilon`).
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
        d.prune_into(stack[i], method, densities[i] if densities is not None else 1.0, rescale, generator, scratch,
                     options)
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


# ---- interpolations and model stock (mergekit 0.1.5's formulas and working dtypes) ---------------------------
def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors at `t` (0: v0, 1: v1), in float32 (float64 for float64
    inputs); linear where |cos| > `dot_threshold`; a norm below `eps` counts as 1. v0's dtype."""
    import torch

    work = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1).to(work), v1.reshape(-1).to(work)
    tt = torch.tensor(t, dtype=work, device=a.device)
    if not a.numel():
        return v0.clone()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na, nb = torch.where(na > eps, na, 1), torch.where(nb > eps, nb, 1)
    dot = torch.dot(a / na, b / nb).clamp(-1, 1)
    if dot.abs() > dot_threshold:
        ca, cb = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        ca, cb = torch.sin((1 - tt) * theta) / sin_theta, torch.sin(tt * theta) / sin_theta
    return (ca * a + cb * b).to(v0.dtype).reshape(v0.shape)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = True,
            eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation at `t` over the whole tensors (`flatten`) or along `dim` (each row of the other
    dimension its own), in the inputs' dtype; linear where the two are (anti)parallel."""
    import torch

    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model stock: the base moved to the models' average by t = k cos / (1 + (k - 1) cos), cos the mean cosine
    between the k models' deltas (per row with `filter_wise`); the base where 1 + (k - 1) cos is near 0."""
    import torch

    if filter_wise:
        w0, ws = (base.unsqueeze(0), [w.unsqueeze(0) for w in tensors]) if base.dim() == 1 else (base, list(tensors))
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in tensors]
    offsets = [w - w0 for w in ws]
    cosines = [((a * b).sum(dim=-1) / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
               for i, a in enumerate(offsets) for b in offsets[i + 1:]]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (k * cos) / torch.where(singular, 1, denominator))
    return (t * (sum(ws) / k) + (1 - t) * w0).reshape(base.shape)
