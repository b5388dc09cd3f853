"""The paper's data-flow genome and decoding it into a `Route` (its file format: `genome_files`).

Layout: the decoder layers of all sources in a fixed order (all of
source 0's layers, then source 1's, ...), repeated `repeats` times, give T = M x r
slots. One inclusion bit per slot; the route is the included slots in slot order.
Scaling is one value per slot (`slot`), the paper's M x M matrix indexed by
(previous layer, this layer) (`transition`), or absent (`none`). Decoding always
yields one scale per hop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dfs_merge.errors import GenomeError
from dfs_merge.route import Hop, Route

Scaling = Literal["slot", "transition", "none"]
MAX_SCALES = 2**20
"""The most scales a genome may hold (a `transition` genome over M layers holds M x M)."""
MAX_SCALE = 1e4
"""The largest scale of a hop: the residual stream times more overflows half precision within a few hops."""
DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""The dtypes a genome's `dtype` / `out_dtype` may name (mergekit's names)."""
CHAT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral", "auto")
"""The `chat_template` names mergekit 0.1.5 knows (its bundled templates, and `auto`: the sources' most common
template); any other value must be Jinja text."""
SETTINGS = ("embed_source", "head_source", "tokenizer_source", "dtype", "out_dtype", "chat_template")
"""The genome fields besides the route: where embeddings, head and tokenizer come from, and mergekit's settings."""


class ConstraintsConfig(BaseModel):
    """Limits on the routes a genome may decode to (config `constraints:`, saved in every genome file)."""

    model_config = ConfigDict(extra="forbid")

    pin_ends: bool = True
    min_hops: int = Field(1, ge=1)
    max_hops: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ConstraintsConfig:
        if self.max_hops is not None and self.max_hops < self.min_hops:
            raise ValueError(f"max_hops ({self.max_hops}) is below min_hops ({self.min_hops})")
        return self


def check_chat_template(value: str) -> None:
    """Refuse a `chat_template` mergekit would refuse: not one of its names and not Jinja text (mergekit's test:
    a name has no newline and no `{`; a template has a `{` and at least 20 characters), or Jinja that does not
    parse."""
    if not isinstance(value, str) or not value.strip():
        raise GenomeError("chat_template: expected a template name or Jinja text, got an empty value")
    if len(value) < 256 and "\n" not in value and "{" not in value:
        if value not in CHAT_TEMPLATE_NAMES:
            shown = value if len(value) <= 40 else value[:37] + "..."
            raise GenomeError(f"chat_template: {shown!r} is neither a mergekit template name "
                              f"({', '.join(CHAT_TEMPLATE_NAMES)}) nor Jinja text")
        return
    if len(value) < 20 or "{" not in value:
        raise GenomeError("chat_template: Jinja text needs at least 20 characters and a '{' (mergekit's rule)")
    import jinja2

    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as err:
        raise GenomeError(f"chat_template: the Jinja text does not parse (line {err.lineno}: {err.message})") from None


def check_scales(scales: Sequence[float], what: str = "scales") -> None:
    """Refuse a scale that is not finite and positive, or beyond `MAX_SCALE`, naming its index."""
    for i, x in enumerate(scales):
        if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0):
            raise GenomeError(f"{what}[{i}]: {x!r} is not a finite positive number (scales must be finite and > 0)")
        if x > MAX_SCALE:
            raise GenomeError(f"{what}[{i}]: {x!r} is beyond the {MAX_SCALE:g} a hop's scale may be")


@dataclass(frozen=True)
class SlotLayout:
    """Where each slot of the genome points: `layers[m]` decoder layers per source, repeated `repeats` times."""

    layers: tuple[int, ...]
    repeats: int = 1

    @property
    def M(self) -> int:  # noqa: N802 - the paper's name
        return sum(self.layers)

    @property
    def T(self) -> int:  # noqa: N802 - the paper's name
        return self.M * self.repeats

    def offset(self, source: int) -> int:
        """Index of `source`'s first layer among all M layers."""
        return sum(self.layers[:source])

    def slot(self, i: int) -> tuple[int, int, int]:
        """(repetition, source, layer) of slot i."""
        rep, g = divmod(i, self.M)
        for source, n in enumerate(self.layers):
            if g < n:
                return rep, source, g
            g -= n
        raise IndexError(i)

    def index(self, rep: int, source: int, layer: int) -> int:
        """Slot index of (repetition, source, layer)."""
        return rep * self.M + self.offset(source) + layer

    def blocks(self) -> list[tuple[int, int, int, int]]:
        """(repetition, source, first slot, length) of each contiguous block of one source's layers."""
        out = []
        for rep in range(self.repeats):
            for source, n in enumerate(self.layers):
                out.append((rep, source, self.index(rep, source, 0), n))
        return out


@dataclass(frozen=True)
class Genome:
    """Inclusion bits and scales over a `SlotLayout`, with the constraints its route must meet."""

    sources: tuple[str, ...]
    layout: SlotLayout
    bits: tuple[int, ...]
    scaling: Scaling = "slot"
    scales: tuple[float, ...] = ()
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    scores: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # content fingerprints of the sources this genome was evolved on (models.metadata.fingerprint), where known
    fingerprints: tuple[str | None, ...] = field(default=(), compare=False, hash=False)
    embed_source: int = 0  # the source whose embed_tokens the model uses
    head_source: int = 0  # the source whose final norm and LM head it uses
    tokenizer_source: int = 0  # the source whose tokenizer it uses
    dtype: str | None = None  # mergekit's `dtype` (what its merge computes in); None: the base's stored dtype
    out_dtype: str | None = None  # the dtype the checkpoint is written in; None: as `dtype`
    chat_template: str | None = None  # a mergekit template name (CHAT_TEMPLATE_NAMES) or Jinja text

    def __post_init__(self) -> None:
        n = len(self.sources)
        for name in ("embed_source", "head_source", "tokenizer_source"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
                raise GenomeError(f"{name}: {value!r} is not a source index (0..{n - 1})")
        for name in ("dtype", "out_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPE_NAMES:
                raise GenomeError(f"{name}: {value!r} is not one of {', '.join(DTYPE_NAMES)}")
        if self.chat_template is not None:
            check_chat_template(self.chat_template)
        if len(self.sources) != len(self.layout.layers):
            raise GenomeError(f"sources: {len(self.sources)} paths but {len(self.layout.layers)} layer counts")
        if len(self.bits) != self.layout.T:
            raise GenomeError(
                f"bits: expected {self.layout.T} ({self.layout.M} layers x {self.layout.repeats} repeats), "
                f"got {len(self.bits)}"
            )
        want = {"slot": self.layout.T, "transition": self.layout.M**2, "none": 0}[self.scaling]
        if len(self.scales) != want:
            raise GenomeError(f"scales: scaling {self.scaling!r} needs {want} values, got {len(self.scales)}")
        check_scales(self.scales)

    # ---- decoding -----------------------------------------------------------------
    def decode(self) -> Route:
        """The route: included slots in order, with the pinned first/last base layers added if missing."""
        lay = self.layout
        picked = [lay.slot(i) for i, b in enumerate(self.bits) if b]
        hops: list[tuple[int, int, float | None]] = [
            (s, layer, self.scales[i] if self.scaling == "slot" else None)
            for i, (_, s, layer) in zip((i for i, b in enumerate(self.bits) if b), picked, strict=True)
        ]
        if self.constraints.pin_ends:
            last = lay.layers[0] - 1
            if not hops or hops[0][:2] != (0, 0):
                hops.insert(0, (0, 0, 1.0))
            if hops[-1][:2] != (0, last):
                hops.append((0, last, 1.0 if self.scaling == "slot" else None))
        out = []
        for k, (s, layer, scale) in enumerate(hops):
            if scale is None:  # transition or none
                if self.scaling == "transition" and k > 0:
                    prev = lay.offset(hops[k - 1][0]) + hops[k - 1][1]
                    scale = self.scales[prev * lay.M + lay.offset(s) + layer]
                else:
                    scale = 1.0
            out.append(Hop(s, layer, float(scale)))
        return Route(tuple(out), self.embed_source, self.head_source)

    def check(self) -> Route:
        """Decode and enforce the hop constraints; raises GenomeError naming the violation."""
        route = self.decode()
        c = self.constraints
        if len(route) == 0:
            raise GenomeError("genome decodes to zero hops (no slot is included)")
        if len(route) < c.min_hops:
            raise GenomeError(f"route has {len(route)} hops, below min_hops {c.min_hops}")
        if c.max_hops is not None and len(route) > c.max_hops:
            raise GenomeError(f"route has {len(route)} hops, above max_hops {c.max_hops}")
        return route

    def key(self) -> str:
        """Canonical key of the decoded route (see `Route.key`)."""
        return self.decode().key()

    @property
    def source_layers(self) -> tuple[int, ...]:
        """Decoder layers of each source."""
        return self.layout.layers

    def text(self) -> str:
        """The decoded route in its readable form."""
        return self.decode().text()

    def seeds(self, routes: Sequence[str] = ()) -> list[Genome]:
        """Generation 0's fixed members over this genome's layout (`seed_genomes`)."""
        return seed_genomes(self, routes)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def empty(
        cls,
        sources: Sequence[str],
        layers: Sequence[int],
        repeats: int = 1,
        scaling: Scaling = "slot",
        constraints: ConstraintsConfig | None = None,
    ) -> Genome:
        """All bits off, all scales 1."""
        layout = SlotLayout(tuple(int(n) for n in layers), int(repeats))
        n_scales = {"slot": layout.T, "transition": layout.M**2, "none": 0}[scaling]
        return cls(
            tuple(str(s) for s in sources),
            layout,
            (0,) * layout.T,
            scaling,
            (1.0,) * n_scales,
            constraints or ConstraintsConfig(),
        )

    def settings(self) -> dict[str, Any]:
        """The fields besides the route (`SETTINGS`) that differ from their defaults."""
        return {name: getattr(self, name) for name in SETTINGS if getattr(self, name) != _DEFAULTS[name]}

    def with_bits(self, bits: Sequence[int], scales: Sequence[float] | None = None) -> Genome:
        """A copy with other bits (and scales), same layout, constraints and settings; scores dropped."""
        return replace(
            self,
            bits=tuple(int(b) for b in bits),
            scales=tuple(float(x) for x in (self.scales if scales is None else scales)),
            scores={},
        )

    @classmethod
    def from_route(
        cls,
        route: Route,
        sources: Sequence[str],
        layers: Sequence[int],
        repeats: int,
        scaling: Scaling = "slot",
        constraints: ConstraintsConfig | None = None,
    ) -> Genome:
        """Encode a route: each hop takes the next slot of its layer; refused if the layout cannot hold it.
        The route's embeddings and head sources become the genome's."""
        g = cls.empty(sources, layers, repeats, scaling, constraints)
        g = replace(g, embed_source=route.embed_source, head_source=route.head_source)
        lay = g.layout
        bits = [0] * lay.T
        scales = list(g.scales)
        pos = -1
        prev: int | None = None
        for k, h in enumerate(route):
            if not 0 <= h.source < len(lay.layers) or not 0 <= h.layer < lay.layers[h.source]:
                raise GenomeError(f"hop {k} ({h.source}:{h.layer}) names no layer of the sources")
            rep = next(
                (r for r in range(lay.repeats) if lay.index(r, h.source, h.layer) > pos), None
            )
            if rep is None:
                raise GenomeError(
                    f"hop {k} ({h.source}:{h.layer}) cannot follow the previous hops with repeats={lay.repeats}"
                )
            pos = lay.index(rep, h.source, h.layer)
            bits[pos] = 1
            this = lay.offset(h.source) + h.layer
            if scaling == "slot":
                scales[pos] = h.scale
            elif scaling == "transition" and prev is not None:
                cell = prev * lay.M + this
                if scales[cell] != 1.0 and scales[cell] != h.scale:
                    raise GenomeError(f"hop {k}: transition {prev}->{this} already has another scale")
                scales[cell] = h.scale
            elif h.scale != 1.0 and not (scaling == "transition" and prev is None):
                raise GenomeError(f"hop {k} has scale {h.scale} but scaling is {scaling!r}")
            prev = this
        out = g.with_bits(bits, scales)
        if out.decode().key() != route.key():
            raise GenomeError(
                f"route {route.text()} cannot be expressed exactly in this layout "
                f"(it decodes to {out.decode().text()}; check pin_ends and the first hop's scale)"
            )
        return out

    @classmethod
    def exact(cls, route: Route, sources: Sequence[str], layers: Sequence[int]) -> Genome:
        """The genome that checks to exactly `route` whatever a run's constraints: the fewest repeats that hold
        it, one scale per slot, no pinned ends or hop limits. For scoring a given route (a heuristic's, the
        naive deepening) through the evaluators, which take genomes."""
        lay = SlotLayout(tuple(int(n) for n in layers))
        order = [lay.offset(h.source) + h.layer for h in route]
        repeats = 1 + sum(b <= a for a, b in pairwise(order))  # a hop at or before the one before: the next repeat
        return cls.from_route(route, sources, layers, repeats, "slot", ConstraintsConfig(pin_ends=False))


_DEFAULTS = {name: Genome.__dataclass_fields__[name].default for name in SETTINGS}


# ---- seeds ------------------------------------------------------------------------
def seed_genomes(template: Genome, routes: Sequence[str] = ()) -> list[Genome]:
    """Generation-0 seeds: model 0 unchanged, then each other source alone where its depth equals model 0's,
    then each of `routes` (route texts; one that the layout cannot hold is refused with a GenomeError)."""
    lay = template.layout
    seeds = []
    for source, n in enumerate(lay.layers):
        if n != lay.layers[0]:
            continue
        bits = [0] * lay.T
        start = lay.index(0, source, 0)
        bits[start : start + n] = [1] * n
        seeds.append(template.with_bits(bits, [1.0] * len(template.scales)))
    for text in routes:
        route = replace(Route.parse(text), embed_source=template.embed_source, head_source=template.head_source)
        try:
            g = Genome.from_route(route, template.sources, lay.layers, lay.repeats, template.scaling,
                                  template.constraints)
        except GenomeError as err:
            raise GenomeError(f"seed route {text!r}: {err}") from None
        seeds.append(replace(g, **template.settings()))
    unique = {g.key(): g for g in reversed(seeds)}  # a route given twice (or equal to a source) seeds once
    return [g for g in seeds if unique.get(g.key()) is g]
