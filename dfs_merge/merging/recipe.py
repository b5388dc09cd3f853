"""The parameter-space genome: a merge recipe (method, base, per-source per-layer-group weights and densities).

The decoder layers are cut into `layer_groups` contiguous groups (mergekit-evolve's `layer_granularity`:
group g holds the layers l with l * groups // layers == g); each merged source has one weight per group
(slerp: its `t`; model stock: none), and one density per group where the method prunes. The embeddings take
group 0's values and the final norm and LM head the last group's, as mergekit does for the first and last
slice; with `ends` they have values of their own: each row then holds `layer_groups + 2` values, the
embeddings' first and the norm and head's last (a mergekit gradient's value at `t = 0` of the first and of the
last slice, which differs from the layers' for most published gradients). `filters` (mergekit's parameter filters, e.g. `self_attn`, `mlp`) give the tensors whose name holds
one of them weights of their own (`filtered`, one block like `weights` per filter, the first matching
filter winning); the other tensors take `weights`. A method's other parameters (`Method.options`: gamma,
epsilon, nuslerp's and model stock's switches) are one value for the whole merge (`options`).

A recipe is a `genome_files.CandidateGenome`, as a DFS genome is: it has no inclusion `bits`, its `scales`
are the flat vector of weights (source by source, group by group) then densities, `with_bits(bits, values)`
gives the recipe of other values, `key()` its canonical key, `decode()` the base's layers (its hops). Its
file format (`dfs-merge/recipe@1`) is read and written by `dfs_merge.genome_files`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dfs_merge.errors import GenomeError
from dfs_merge.merging.methods import METHODS, Method, check_della
from dfs_merge.route import Hop, Route

MAX_MAGNITUDE = 1e4
"""The largest |weight| and |lambda| a recipe takes: beyond it a merged delta overflows half precision (and at
1e38, even float32) into a model of zero or non-finite logits."""


def check_magnitude(name: str, x: float) -> None:
    """Refuse a recipe value (a weight, lambda) that is not finite or beyond `MAX_MAGNITUDE`, naming it."""
    if not (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)):
        raise GenomeError(f"{name}: {x!r} is not a finite number")
    if abs(x) > MAX_MAGNITUDE:
        raise GenomeError(f"{name}: {x!r} is beyond the ±{MAX_MAGNITUDE:g} a merge can represent")


def merged_sources(n: int, method: str, base: int | None) -> tuple[int, ...]:
    """The indices of the sources that carry weights: every one for a method without a base (`linear`, or
    `nuslerp` without one), all but the base otherwise."""
    return tuple(i for i in range(n) if base is None or not METHODS[method].takes_base or i != base)


def merged_count(spec: Method) -> str:
    """How many models a method merges, in words (`exactly 1 model besides the base`, `at least 2 models`)."""
    lo, hi = spec.merged
    words = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
    return f"{words} model{'' if lo == hi == 1 else 's'}" + (" besides the base" if spec.takes_base else "")


def check_merged_count(method: str, n: int, base: int | None) -> None:
    """Refuse `n` sources (base `base`) that a method cannot merge (slerp: the base and exactly one other)."""
    spec = METHODS[method]
    want = len(merged_sources(n, method, base))
    lo, hi = spec.merged
    if not lo <= want <= (hi if hi is not None else want):
        raise GenomeError(f"method {method} merges {merged_count(spec)}; this recipe has {want} ({n} sources"
                          f"{f', base {base}' if spec.takes_base and base is not None else ''})")


Rows = tuple[tuple[float, ...], ...]
"""One row per merged source, one value per layer group."""


@dataclass(frozen=True)
class Recipe:
    """A parameter-space merge of `sources` (all with `layers` decoder layers) by `method`."""

    sources: tuple[str, ...]
    layers: int
    method: str
    base: int | None
    layer_groups: int
    weights: tuple[tuple[float, ...], ...]  # one row per merged source (`merged`), one value per group
    densities: tuple[tuple[float, ...], ...] = ()  # the same shape where the method prunes, else empty
    normalize: bool | None = None  # None: the method's default (mergekit's)
    lam: float = 1.0  # mergekit's `lambda`: the merged delta's scale
    rescale: bool | None = None  # DARE: restore each pruned delta's L1 norm (None: the method's default)
    seed: int = 0  # DARE's and DELLA's random masks
    filters: tuple[str, ...] = ()  # mergekit parameter filters with weights of their own (`filtered`)
    filtered: tuple[Rows, ...] = ()  # one block shaped like `weights` per filter
    options: tuple[tuple[str, bool | float], ...] = ()  # the method's other parameters (defaults made explicit)
    ends: bool = False  # rows hold the embeddings' value first and the final norm and LM head's last
    scores: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    fingerprints: tuple[str | None, ...] = field(default=(), compare=False, hash=False)

    def __post_init__(self) -> None:
        n = len(self.sources)
        if self.method not in METHODS:
            raise GenomeError(f"method: unknown merge method {self.method!r}; supported: {', '.join(METHODS)}")
        if self.base is not None and not 0 <= self.base < n:
            raise GenomeError(f"base: {self.base} is not a source index (0..{n - 1})")
        if self.spec.needs_base and self.base is None:
            raise GenomeError(f"base: method {self.method} needs a base model (base: SOURCE INDEX)")
        if not 1 <= self.layer_groups <= self.layers:
            raise GenomeError(f"layer_groups: {self.layer_groups} is not between 1 and the {self.layers} layers")
        spec, want = self.spec, len(self.merged)
        check_merged_count(self.method, n, self.base)
        if len(self.filtered) != len(self.filters):
            raise GenomeError(f"filters: {len(self.filters)} filters but {len(self.filtered)} blocks of their weights")
        if self.filters and spec.weight is None:
            raise GenomeError(f"filters: method {self.method} has no weights to filter")
        if len(set(self.filters)) != len(self.filters) or not all(isinstance(f, str) and f for f in self.filters):
            raise GenomeError(f"filters: {list(self.filters)} must be distinct non-empty names")
        blocks = [("weights", self.weights), *((f"filters.{f}", b) for f, b in zip(self.filters, self.filtered, strict=True)),
                  ("densities", self.densities)]
        for name, rows in blocks:
            if name == "densities" and not spec.has_density or name == "weights" and spec.weight is None:
                if rows:
                    raise GenomeError(f"{name}: method {self.method} takes no {name}")
                continue
            if len(rows) != want:
                raise GenomeError(f"{name}: expected one row for each of the {want} merged sources "
                                  f"({', '.join(map(str, self.merged))}), got {len(rows)}")
            for s, row in zip(self.merged, rows, strict=True):
                if len(row) != self.width:
                    each = ("one per layer group, plus the embeddings' first and the norm and head's last (ends)"
                            if self.ends else "one per layer group")
                    raise GenomeError(f"{name}[{s}]: expected {self.width} values ({each}), got {len(row)}")
                for g, x in enumerate(row):
                    check_magnitude(f"{name}[{s}][{g}]", x)
                    if name == "densities" and not 0 < x <= 1:
                        raise GenomeError(f"densities[{s}][{g}]: {x!r} is outside (0, 1]")
                    bounds = spec.weight_bounds
                    if name != "densities" and bounds is not None and not bounds[0] <= x <= bounds[1]:
                        raise GenomeError(f"{name}[{s}][{g}]: {spec.weight} {x!r} is outside "
                                          f"[{bounds[0]:g}, {bounds[1]:g}]")
        check_magnitude("lambda", self.lam)
        object.__setattr__(self, "options", method_options(spec, dict(self.options)))
        if spec.sparsify == "della":
            for s, row in zip(self.merged, self.densities, strict=True):
                for g, x in enumerate(row):
                    try:
                        check_della(x, float(self.option("epsilon")))
                    except ValueError as err:
                        raise GenomeError(f"densities[{s}][{g}]: {err}") from None
        # the method's defaults made explicit, so that equal merges compare (and key) equal
        if self.normalize is None:
            object.__setattr__(self, "normalize", self.spec.normalize)
        if self.rescale is None:
            object.__setattr__(self, "rescale", self.spec.rescale)

    # ---- what the recipe means ---------------------------------------------------------------
    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    @property
    def merged(self) -> tuple[int, ...]:
        """The sources that carry weights (see `merged_sources`)."""
        return merged_sources(len(self.sources), self.method, self.base)

    def group(self, layer: int) -> int:
        """The layer group of decoder layer `layer`."""
        return layer * self.layer_groups // self.layers

    @property
    def width(self) -> int:
        """Values per row: one per layer group, and two more with `ends`."""
        return self.layer_groups + 2 * self.ends

    def column(self, layer: int | None, after: bool = False) -> int:
        """The column of a row a tensor takes: its layer's group's; for the embeddings (`layer` None) the first,
        for the final norm and LM head (`layer` None, `after`) the last."""
        if layer is None:
            return self.width - 1 if after else 0
        return self.group(layer) + self.ends

    def group_range(self, g: int) -> tuple[int, int]:
        """[first, end) layers of group g."""
        first = next(i for i in range(self.layers) if self.group(i) == g)
        end = next((i for i in range(first, self.layers) if self.group(i) != g), self.layers)
        return first, end

    def option(self, name: str) -> bool | float:
        """One of the method's other parameters (`options`)."""
        return dict(self.options)[name]

    def weight_class(self, tensor: str) -> int | None:
        """The filter whose weights a tensor takes: the first of `filters` in its name (mergekit's rule); None
        for `weights`."""
        return next((i for i, f in enumerate(self.filters) if f in tensor), None)

    def params(self, g: int, cls: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(weights, densities) of column g (`column`) for the tensors of weight class `cls` (`weight_class`),
        one per merged source (densities empty if the method has none)."""
        rows = self.weights if cls is None else self.filtered[cls]
        return (tuple(row[g] for row in rows),
                tuple(row[g] for row in self.densities) if self.densities else ())

    def blocks(self) -> list[tuple[str, Rows]]:
        """The recipe's value blocks as (label, rows): the weights (labelled by the method's parameter, `t` for
        slerp), each filter's, the densities."""
        w = self.spec.weight or "weight"
        out = [(w, self.weights), *((f"{w}[{f}]", b) for f, b in zip(self.filters, self.filtered, strict=True))]
        return [(label, rows) for label, rows in out if rows] + ([("density", self.densities)] if self.densities else [])

    def text(self) -> str:
        """One line: method, base and the weights (and densities) per source, e.g.
        `task_arithmetic over 0: 1 w[0.5 0.7] 2 w[1 0.2]`."""
        parts = [f"{self.method}" + (f" over {self.base}" if self.base is not None else "") + ":"]
        letters = {"weight": "w", "density": "d"}
        for i, s in enumerate(self.merged):
            cells = [f"{letters.get(label, label)}[{' '.join(f'{x:.3g}' for x in rows[i])}]"
                     for label, rows in self.blocks()]
            parts.append(" ".join([str(s), *cells]))
        return " ".join(parts) + "".join(f" {k}={v}" for k, v in self.options)

    @property
    def source_layers(self) -> tuple[int, ...]:
        """Decoder layers of each source (all alike)."""
        return (self.layers,) * len(self.sources)

    def table(self) -> list[str]:
        """The recipe as lines for `dfs-merge show`: one row per merged source and value, one column per layer
        group."""
        spans = [f"{a}-{b - 1}" for a, b in map(self.group_range, range(self.layer_groups))]
        head = "".join(f"{x:>9}" for x in (["embed", *spans, "head"] if self.ends else spans))
        label_width = max([9, *(len(label) + 1 for label, _ in self.blocks())])
        lines = [f"{'source':<8}{'value':<{label_width}}{head}"] if self.blocks() else [f"{self.method}: no per-source values"]
        for i, s in enumerate(self.merged):
            for k, (label, rows) in enumerate(self.blocks()):
                lines.append(f"{s if k == 0 else '':<8}{label:<{label_width}}" + "".join(f"{x:>9.4f}" for x in rows[i]))
        return lines + [f"{k}: {v}" for k, v in self.options]

    def settings(self) -> dict[str, Any]:
        """None: a recipe's merge has the base's embeddings, head, tokenizer, dtype and chat template."""
        return {}

    # ---- the search's view ---------------------------------------------------------------------
    @property
    def bits(self) -> tuple[int, ...]:
        """No inclusion genes: a recipe's genes are all continuous (`scales`)."""
        return ()

    @property
    def scales(self) -> tuple[float, ...]:
        """The genes: all weights (source by source), each filter's, then all densities."""
        return tuple(x for rows in (self.weights, *self.filtered, self.densities) for row in rows for x in row)

    def with_bits(self, bits: Sequence[int] = (), scales: Sequence[float] | None = None) -> Recipe:
        """The recipe of other gene values (`bits` is ignored: a recipe has none); scores dropped."""
        values = [float(x) for x in (self.scales if scales is None else scales)]
        if len(values) != len(self.scales):
            raise GenomeError(f"recipe genes: expected {len(self.scales)} values, got {len(values)}")
        g, blocks, pos = self.width, [], 0
        for rows in (self.weights, *self.filtered, self.densities):
            blocks.append(tuple(tuple(values[pos + i * g:pos + (i + 1) * g]) for i in range(len(rows))))
            pos += len(rows) * g
        return replace(self, weights=blocks[0], filtered=tuple(blocks[1:-1]), densities=blocks[-1], scores={})

    def bounds(self, weight_range: tuple[float, float], density_range: tuple[float, float]) -> list[tuple[float, float]]:
        """(low, high) of each gene, for the search's clipping: `weight_range` within the method's own bounds
        (slerp's t in [0, 1]); `density_range` within DELLA's (density +- epsilon inside (0, 1))."""
        w, d = list(weight_range), list(density_range)
        if self.spec.weight_bounds is not None:
            w = [max(w[0], self.spec.weight_bounds[0]), min(w[1], self.spec.weight_bounds[1])]
        if self.spec.sparsify == "della":
            eps = float(self.option("epsilon"))
            d = [max(d[0], eps + 1e-6), min(d[1], 1 - eps - 1e-6)]
        for name, (lo, hi) in (("weight_range", w), ("density_range", d)):
            if lo > hi:
                raise GenomeError(f"merge.{name}: {list(weight_range if name == 'weight_range' else density_range)} "
                                  f"leaves no value method {self.method} takes")
        n = len(self.weights) + sum(len(b) for b in self.filtered)
        return [(w[0], w[1])] * (n * self.width) + [(d[0], d[1])] * (len(self.densities) * self.width)

    def decode(self) -> Route:
        """The merged model's hops: the base structure's layers in order, scale 1."""
        return Route(tuple(Hop(0, i) for i in range(self.layers)))

    def check(self) -> Route:
        """The route (a recipe was validated when it was made)."""
        return self.decode()

    def key(self) -> str:
        """Canonical key: equal for recipes that build the same merge."""
        spec = self.spec
        masked = spec.sparsify not in (None, "magnitude")  # its rescale matters (and, when random, its seed)
        text = "|".join([
            self.method, str(self.base), str(self.layer_groups),
            str(self.normalize), f"{self.lam:.6g}",
            str(self.rescale if masked else None), str(self.seed if spec.random else 0),
            ",".join(f"{x:.6g}" for x in self.scales),
        ])
        if self.ends:
            text += "|ends"
        if self.filters:
            text += "|filters:" + ",".join(self.filters)
        if self.options:
            text += "|options:" + ",".join(f"{k}={v:.6g}" if not isinstance(v, bool) else f"{k}={v}"
                                           for k, v in self.options)
        return "ps-" + hashlib.sha1(text.encode()).hexdigest()[:13]

    def seeds(self, routes: Sequence[str] = ()) -> list[Recipe]:
        """Generation-0 seeds: this recipe, then each merged source alone (weight 1, density 1, others 0; for
        every filter too). A method without weights has no others."""
        if routes:
            raise GenomeError("seed_routes are data-flow routes; a parameter-space search takes none")
        out = [self]
        g, n = self.width, len(self.weights)
        for i in range(n):
            weights = tuple(tuple(1.0 if j == i else 0.0 for _ in range(g)) for j in range(n))
            dens = tuple(tuple(1.0 for _ in range(g)) for _ in self.densities)
            out.append(replace(self, weights=weights, filtered=(weights,) * len(self.filters), densities=dens,
                               scores={}))
        unique = {r.key(): r for r in reversed(out)}
        return [r for r in out if unique.get(r.key()) is r]


def method_options(spec: Method, given: dict[str, Any]) -> tuple[tuple[str, bool | float], ...]:
    """A method's other parameters in its order, `given` over its defaults, each checked (one GenomeError line)."""
    defaults = dict(spec.options)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise GenomeError(f"options: {unknown[0]!r} is not a parameter of method {spec.name}"
                          + (f" (its options: {', '.join(defaults)})" if defaults else " (it has none)"))
    out: list[tuple[str, bool | float]] = []
    for name, default in spec.options:
        v = given.get(name, default)
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise GenomeError(f"options.{name}: expected true or false, got {v!r}")
        else:
            check_magnitude(f"options.{name}", v)
            v = float(v)
            if not 0 <= v < 1:
                raise GenomeError(f"options.{name}: {v!r} is outside [0, 1)")
        out.append((name, v))
    return tuple(out)


def initial_recipe(sources: Sequence[str], layers: int, method: str, base: int | None, layer_groups: int,
                   weight: float | None = None, density: float = 1.0, **options: Any) -> Recipe:
    """A recipe with one weight (default: the method's, else 1/n over the n merged sources) and one density
    everywhere; `options` are the recipe's other fields (normalize, lam, rescale, seed, filters, options,
    ends)."""
    spec = METHODS.get(method)  # an unknown method: Recipe names it
    n = len(merged_sources(len(sources), method, base)) if spec else 0
    default = spec.default_weight if spec and spec.default_weight is not None else 1.0 / max(1, n)
    w = default if weight is None else weight
    weighted = spec is None or spec.weight is not None
    width = layer_groups + 2 * bool(options.get("ends"))
    rows = tuple((float(w),) * width for _ in range(n)) if weighted else ()
    dens = tuple((float(density),) * width for _ in range(n)) if spec and spec.has_density else ()
    filtered = (rows,) * len(options.get("filters", ()))
    return Recipe(tuple(sources), layers, method, base, layer_groups, rows, dens,
                  **{"filtered": filtered, **options})
