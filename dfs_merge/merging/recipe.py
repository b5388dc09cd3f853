"""The parameter-space genome: a merge recipe (method, base, per-source per-layer-group weights and densities).

The decoder layers are cut into `layer_groups` contiguous groups (mergekit-evolve's `layer_granularity`:
group g holds the layers l with l * groups // layers == g); each merged source has one weight per group,
and one density per group where the method prunes. The embeddings take group 0's values and the final
norm and LM head the last group's, as mergekit does for the first and last slice.

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
from dfs_merge.merging.methods import METHODS, Method
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
    """The indices of the sources that carry weights: every one for a method without a base (`linear`), all but
    the base otherwise."""
    return tuple(i for i in range(n) if not METHODS[method].needs_base or i != base)


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
    seed: int = 0  # DARE's random masks
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
        want = len(self.merged)
        for name, rows in (("weights", self.weights), ("densities", self.densities)):
            if name == "densities" and not self.spec.has_density:
                if rows:
                    raise GenomeError(f"densities: method {self.method} takes no densities")
                continue
            if len(rows) != want:
                raise GenomeError(f"{name}: expected one row for each of the {want} merged sources "
                                  f"({', '.join(map(str, self.merged))}), got {len(rows)}")
            for s, row in zip(self.merged, rows, strict=True):
                if len(row) != self.layer_groups:
                    raise GenomeError(f"{name}[{s}]: expected {self.layer_groups} values (one per layer group), "
                                      f"got {len(row)}")
                for g, x in enumerate(row):
                    check_magnitude(f"{name}[{s}][{g}]", x)
                    if name == "densities" and not 0 < x <= 1:
                        raise GenomeError(f"densities[{s}][{g}]: {x!r} is outside (0, 1]")
        check_magnitude("lambda", self.lam)
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

    def group_range(self, g: int) -> tuple[int, int]:
        """[first, end) layers of group g."""
        first = next(i for i in range(self.layers) if self.group(i) == g)
        end = next((i for i in range(first, self.layers) if self.group(i) != g), self.layers)
        return first, end

    def params(self, g: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(weights, densities) of group g, one per merged source (densities empty if the method has none)."""
        return (tuple(row[g] for row in self.weights),
                tuple(row[g] for row in self.densities) if self.densities else ())

    def text(self) -> str:
        """One line: method, base and the weights (and densities) per source, e.g.
        `task_arithmetic over 0: 1 w[0.5 0.7] 2 w[1 0.2]`."""
        parts = [f"{self.method}" + (f" over {self.base}" if self.base is not None else "") + ":"]
        for i, s in enumerate(self.merged):
            part = f"{s} w[{' '.join(f'{x:.3g}' for x in self.weights[i])}]"
            if self.densities:
                part += f" d[{' '.join(f'{x:.3g}' for x in self.densities[i])}]"
            parts.append(part)
        return " ".join(parts)

    @property
    def source_layers(self) -> tuple[int, ...]:
        """Decoder layers of each source (all alike)."""
        return (self.layers,) * len(self.sources)

    def table(self) -> list[str]:
        """The recipe as lines for `dfs-merge show`: one row per merged source, one column per layer group."""
        spans = [self.group_range(g) for g in range(self.layer_groups)]
        head = "".join(f"{f'{a}-{b - 1}':>9}" for a, b in spans)
        lines = [f"{'source':<8}{'value':<9}{head}"]
        for i, s in enumerate(self.merged):
            lines.append(f"{s:<8}{'weight':<9}" + "".join(f"{x:>9.4f}" for x in self.weights[i]))
            if self.densities:
                lines.append(f"{'':<8}{'density':<9}" + "".join(f"{x:>9.4f}" for x in self.densities[i]))
        return lines

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
        """The genes: all weights (source by source), then all densities."""
        return tuple(x for row in self.weights for x in row) + tuple(x for row in self.densities for x in row)

    def with_bits(self, bits: Sequence[int] = (), scales: Sequence[float] | None = None) -> Recipe:
        """The recipe of other gene values (`bits` is ignored: a recipe has none); scores dropped."""
        values = list(self.scales if scales is None else scales)
        n, g = len(self.merged), self.layer_groups
        if len(values) != len(self.scales):
            raise GenomeError(f"recipe genes: expected {len(self.scales)} values, got {len(values)}")
        rows = [tuple(float(x) for x in values[i * g:(i + 1) * g]) for i in range(2 * n if self.densities else n)]
        return replace(self, weights=tuple(rows[:n]), densities=tuple(rows[n:]), scores={})

    def bounds(self, weight_range: tuple[float, float], density_range: tuple[float, float]) -> list[tuple[float, float]]:
        """(low, high) of each gene, for the search's clipping."""
        n = len(self.merged) * self.layer_groups
        return [weight_range] * n + [density_range] * (n if self.densities else 0)

    def decode(self) -> Route:
        """The merged model's hops: the base structure's layers in order, scale 1."""
        return Route(tuple(Hop(0, i) for i in range(self.layers)))

    def check(self) -> Route:
        """The route (a recipe was validated when it was made)."""
        return self.decode()

    def key(self) -> str:
        """Canonical key: equal for recipes that build the same merge."""
        spec = self.spec
        text = "|".join([
            self.method, str(self.base), str(self.layer_groups),
            str(self.normalize), f"{self.lam:.6g}",
            str(self.rescale if spec.sparsify == "random" else None), str(self.seed if spec.sparsify == "random" else 0),
            ",".join(f"{x:.6g}" for x in self.scales),
        ])
        return "ps-" + hashlib.sha1(text.encode()).hexdigest()[:13]

    def seeds(self, routes: Sequence[str] = ()) -> list[Recipe]:
        """Generation-0 seeds: this recipe, then each merged source alone (weight 1, density 1, others 0)."""
        if routes:
            raise GenomeError("seed_routes are data-flow routes; a parameter-space search takes none")
        out = [self]
        g = self.layer_groups
        for i in range(len(self.merged)):
            weights = tuple(tuple(1.0 if j == i else 0.0 for _ in range(g)) for j in range(len(self.merged)))
            dens = tuple(tuple(1.0 for _ in range(g)) for _ in self.densities)
            out.append(replace(self, weights=weights, densities=dens, scores={}))
        unique = {r.key(): r for r in reversed(out)}
        return [r for r in out if unique.get(r.key()) is r]


def initial_recipe(sources: Sequence[str], layers: int, method: str, base: int | None, layer_groups: int,
                   weight: float | None = None, density: float = 1.0, **options: Any) -> Recipe:
    """A recipe with one weight (default 1/n over the n merged sources) and one density everywhere."""
    spec = METHODS.get(method)  # an unknown method: Recipe names it
    n = len(merged_sources(len(sources), method, base)) if spec else 0
    w = 1.0 / max(1, n) if weight is None else weight
    rows = tuple((float(w),) * layer_groups for _ in range(n))
    dens = tuple((float(density),) * layer_groups for _ in range(n)) if spec and spec.has_density else ()
    return Recipe(tuple(sources), layers, method, base, layer_groups, rows, dens, **options)
