"""The two genome kinds side by side: what the search, the ledger, the scorer and the exporters use of either
(`CandidateGenome`), and their YAML file formats.

`dfs-merge/genome@1` holds a data-flow genome (`genome.Genome`): its sources, the slot layout, bits and
scales (or the route), the constraints and the settings; `dfs-merge/recipe@1` a parameter-space recipe
(`merging.recipe.Recipe`): method, base, weights (and each parameter filter's) and densities per layer
group, the method's options. Both list their sources and, where known, the scores they earned. `load_genome` reads either kind by its `format` and validates it with an
error that names the file and the field; `genome_to_dict` and `save_genome` write either.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from dfs_merge.atomic import write_atomic
from dfs_merge.errors import GenomeError
from dfs_merge.genome import MAX_SCALES, SETTINGS, ConstraintsConfig, Genome, Scaling, SlotLayout
from dfs_merge.inputs import NoAliasDumper, describe_validation_error, read_yaml
from dfs_merge.merging.methods import METHODS
from dfs_merge.merging.recipe import Recipe, check_merged_count, merged_sources
from dfs_merge.models.adapters import resolve_source
from dfs_merge.route import MAX_SLOTS, Route

if TYPE_CHECKING:
    from typing_extensions import Self

GENOME_FORMAT = "dfs-merge/genome@1"
RECIPE_FORMAT = "dfs-merge/recipe@1"
Scale = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A hop scale as read from a file: finite and positive (0 would divide the folded export, NaN poison it)."""
DtypeName = Literal["float32", "bfloat16", "float16"]


class CandidateGenome(Protocol):
    """A genome of either kind, as the search, the ledger, the scorer and the exporters see it.

    To the search a genome is its genes: inclusion `bits` (a recipe has none) and continuous `scales` (a
    route's hop scales; a recipe's weights, then densities), `with_bits` the genome of other genes, `key` the
    canonical key of what it builds, `seeds` generation 0's fixed members. Both kinds are frozen dataclasses
    (`dataclasses.replace` attaches scores and fingerprints) and decode to a `Route`.
    """

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def sources(self) -> tuple[str, ...]: ...

    @property
    def scores(self) -> dict[str, Any]: ...

    @property
    def fingerprints(self) -> tuple[str | None, ...]: ...

    @property
    def bits(self) -> tuple[int, ...]: ...

    @property
    def scales(self) -> tuple[float, ...]: ...

    @property
    def source_layers(self) -> tuple[int, ...]:
        """Decoder layers of each source."""

    def key(self) -> str:
        """Canonical key: equal for genomes that build the same model."""

    def text(self) -> str:
        """One readable line: the route, or the recipe's method and weights."""

    def decode(self) -> Route:
        """The hops of the model it builds."""

    def check(self) -> Route:
        """The route, with the genome's constraints enforced (a GenomeError names the violation)."""

    def settings(self) -> dict[str, Any]:
        """Embeddings, head and tokenizer sources, dtypes and chat template that differ from the base's."""

    def with_bits(self, bits: Sequence[int], scales: Sequence[float] | None = None) -> Self:
        """The genome of other genes (scores dropped)."""

    def seeds(self, routes: Sequence[str] = ()) -> list[Self]:
        """Generation 0's fixed members."""


# ---- reading ------------------------------------------------------------------------------
class SourceEntry(BaseModel):
    """One source as a genome or recipe file lists it: its path, layer count and (where known) fingerprint."""

    model_config = ConfigDict(extra="forbid")
    path: str
    layers: int = Field(ge=1)
    fingerprint: str | None = None


class _GenomeFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["dfs-merge/genome@1"]
    sources: list[SourceEntry] = Field(min_length=1)
    repeats: int = Field(1, ge=1)
    scaling: Scaling = "slot"
    constraints: ConstraintsConfig = ConstraintsConfig()
    route: str | None = None
    hops: int | None = None
    hop_scales: list[Scale] | None = None
    bits: str | list[str] | None = None
    scales: list[Scale] | list[list[Scale]] | None = None
    embed_source: Annotated[StrictInt, Field(ge=0)] = 0
    head_source: Annotated[StrictInt, Field(ge=0)] = 0
    tokenizer_source: Annotated[StrictInt, Field(ge=0)] = 0
    dtype: DtypeName | None = None
    out_dtype: DtypeName | None = None
    chat_template: str | None = None
    scores: dict[str, Any] = {}


class _RecipeFile(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    format: Literal["dfs-merge/recipe@1"]
    sources: list[SourceEntry] = Field(min_length=1)
    method: str
    base: int | None = None
    layer_groups: int = Field(1, ge=1)
    ends: StrictBool = False  # each row: the embeddings' value, one per layer group, the norm and head's value
    normalize: bool | None = None
    lam: float = Field(1.0, alias="lambda", allow_inf_nan=False)
    rescale: bool | None = None
    seed: int = Field(0, ge=0)
    weights: dict[int, list[float]] = {}
    filters: dict[str, dict[int, list[float]]] = {}
    densities: dict[int, list[float]] | None = None
    options: dict[str, StrictBool | float] = {}
    scores: dict[str, Any] = {}


def genome_from_dict(data: dict[str, Any], where: str = "genome") -> Genome | Recipe:
    """Validate a genome or recipe mapping (as read from YAML) and build the `Genome` or `Recipe` its
    `format` names; errors name the field."""
    if "format" not in data:
        raise GenomeError(f"{where}: not a dfs-merge genome (no 'format: {GENOME_FORMAT}' key)")
    kind = _RecipeFile if data.get("format") == RECIPE_FORMAT else _GenomeFile
    try:
        f = kind.model_validate(data)
    except ValidationError as err:
        raise GenomeError(f"{where}: {describe_validation_error(err)}") from None
    try:
        g = _recipe(f) if isinstance(f, _RecipeFile) else _genome(f)
    except GenomeError as err:
        raise GenomeError(f"{where}: {err}") from None
    fingerprints = tuple(s.fingerprint for s in f.sources)
    return replace(g, scores=dict(f.scores), fingerprints=fingerprints if any(fingerprints) else ())


def _genome(f: _GenomeFile) -> Genome:
    """The data-flow genome of a validated file: from its bits (checked against its route, if given) or its route."""
    sources = [s.path for s in f.sources]
    layers = [s.layers for s in f.sources]
    m = sum(layers)  # checked before anything of this size is allocated
    if m * f.repeats > MAX_SLOTS:
        raise GenomeError(f"{m} layers x {f.repeats} repeats is {m * f.repeats} slots, "
                          f"more than the {MAX_SLOTS} a genome may have")
    if f.scaling == "transition" and m * m > MAX_SCALES:
        raise GenomeError(f"scaling 'transition' over {m} layers needs {m * m} scales, "
                          f"more than the {MAX_SCALES} a genome may have")
    if f.bits is None:
        if f.route is None:
            raise GenomeError("needs either 'bits' or 'route'")
        route = Route.parse(f.route, f.hop_scales)
        route = replace(route, embed_source=f.embed_source, head_source=f.head_source)
        g = Genome.from_route(route, sources, layers, f.repeats, f.scaling, f.constraints)
    else:
        text = "".join(f.bits) if isinstance(f.bits, list) else f.bits
        text = re.sub(r"\s", "", text)
        if set(text) - {"0", "1"}:
            raise GenomeError("bits: only 0 and 1 are allowed")
        scales = f.scales or []
        flat = [float(x) for row in scales for x in (row if isinstance(row, list) else [row])]
        layout = SlotLayout(tuple(layers), f.repeats)
        if f.scaling != "none" and not scales:
            flat = [1.0] * (layout.T if f.scaling == "slot" else layout.M**2)
        g = Genome(tuple(sources), layout, tuple(int(c) for c in text), f.scaling, tuple(flat), f.constraints,
                   embed_source=f.embed_source, head_source=f.head_source)
        g.check()
        if f.route is not None and Route.parse(f.route).text() != g.decode().text():
            raise GenomeError(f"route: {f.route!r} does not match the bits, which decode to {g.decode().text()!r}")
    g = replace(g, **{name: getattr(f, name) for name in SETTINGS})
    g.check()
    return g


def _recipe(f: _RecipeFile) -> Recipe:
    """The recipe of a validated file: one depth for all sources, a row for each merged source."""
    layers = {s.layers for s in f.sources}
    if len(layers) != 1:
        raise GenomeError(f"sources: a parameter-space merge needs sources of one depth, got layers "
                          f"{[s.layers for s in f.sources]}")
    if f.method not in METHODS:
        raise GenomeError(f"method: unknown merge method {f.method!r}; supported: {', '.join(METHODS)}")
    if METHODS[f.method].needs_base and f.base is None:
        raise GenomeError(f"base: method {f.method} needs a base model (base: SOURCE INDEX)")
    check_merged_count(f.method, len(f.sources), f.base)
    merged = merged_sources(len(f.sources), f.method, f.base)
    weighted = METHODS[f.method].weight is not None
    blocks = [("weights", f.weights), *((f"filters.{k}", rows) for k, rows in f.filters.items()),
              ("densities", f.densities or {})]
    for name, rows in blocks:
        extra = sorted(set(rows) - set(merged))
        if extra:
            raise GenomeError(f"{name}: source {extra[0]} is not merged (merged sources: "
                              f"{', '.join(map(str, merged))})")
        missing = [s for s in merged if s not in rows]
        if missing and (name != "densities" and weighted or rows):
            raise GenomeError(f"{name}: no row for source {missing[0]}")
    prunes = METHODS[f.method].has_density
    densities = ({s: [1.0] * (f.layer_groups + 2 * f.ends) for s in merged} if prunes and not f.densities
                 else f.densities or {})

    def rows(values: dict[int, list[float]]) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(values[s]) for s in merged) if values else ()

    return Recipe(tuple(s.path for s in f.sources), f.sources[0].layers, f.method, f.base, f.layer_groups,
                  rows(f.weights), rows(densities), f.normalize, f.lam, f.rescale, f.seed,
                  filters=tuple(f.filters), filtered=tuple(rows(v) for v in f.filters.values()),
                  options=tuple(f.options.items()), ends=f.ends)


def load_genome(path: str | Path) -> Genome | Recipe:
    """Read and validate a genome or recipe file; any problem is a GenomeError naming the file and the field."""
    label = str(path) if str(path).isprintable() else repr(str(path))  # a newline in the name would break the line
    g = genome_from_dict(read_yaml(path, GenomeError), label)
    # a source path written relative to the file (`../models/family/j` beside genomes/) resolves against its folder
    folder = Path(path).expanduser().resolve().parent
    return replace(g, sources=tuple(resolve_source(s, folder) for s in g.sources))


def is_recipe_file(path: str) -> bool:
    """Whether a source path names a recipe file (`*.yaml` / `*.yml` whose `format` is a recipe's): a
    hybrid's source, merged in memory when the pool loads."""
    p = Path(path).expanduser()
    if p.suffix not in (".yaml", ".yml") or not p.is_file():
        return False
    try:
        head = p.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return False
    return RECIPE_FORMAT in head


def load_recipe_source(path: str) -> Recipe:
    """The recipe a hybrid's source names (its own sources resolve against the recipe file's folder where they
    exist there, as every genome file's do)."""
    r = load_genome(path)
    if not isinstance(r, Recipe):
        raise GenomeError(f"{path}: a genome file, not a recipe; only a parameter-space recipe can be a source")
    return r


# ---- writing ------------------------------------------------------------------------------
def genome_to_dict(g: CandidateGenome) -> dict[str, Any]:
    """The YAML mapping of a genome (`dfs-merge/genome@1`) or a recipe (`dfs-merge/recipe@1`)."""
    if isinstance(g, Recipe):
        return _recipe_dict(g)
    if isinstance(g, Genome):
        return _genome_dict(g)
    raise TypeError(f"not a genome of a kind dfs-merge writes: {type(g).__name__}")


def _source_entries(paths: Sequence[str], layers: Sequence[int],
                    fingerprints: Sequence[str | None]) -> list[dict[str, Any]]:
    """The `sources:` list of a file: path, layers and (where known) fingerprint of each."""
    return [{"path": p, "layers": n, **({"fingerprint": fp} if fp else {})}
            for p, n, fp in zip(paths, layers, fingerprints or [None] * len(paths), strict=True)]


def _genome_dict(g: Genome) -> dict[str, Any]:
    """A data-flow genome's mapping: bits and scales in one row per (repetition, source) block."""
    route = g.decode()
    blocks = g.layout.blocks()
    data: dict[str, Any] = {
        "format": GENOME_FORMAT,
        "sources": _source_entries(g.sources, g.layout.layers, g.fingerprints),
        **g.settings(),  # only those other than the defaults: older files and their keys stay as they were
        "repeats": g.layout.repeats,
        "scaling": g.scaling,
        "constraints": g.constraints.model_dump(),
        "route": route.text(),
        "hops": len(route),
        "hop_scales": [float(f"{x:.6g}") for x in route.scales],  # 6 digits, not 6 decimals: 1e-7 stays > 0
        "bits": ["".join(map(str, g.bits[start : start + n])) for _, _, start, n in blocks],
    }
    if g.scaling == "slot":
        data["scales"] = [list(g.scales[start : start + n]) for _, _, start, n in blocks]
    elif g.scaling == "transition":
        m = g.layout.M
        data["scales"] = [list(g.scales[i * m : (i + 1) * m]) for i in range(m)]
    if g.scores:
        data["scores"] = g.scores
    return data


def _recipe_dict(r: Recipe) -> dict[str, Any]:
    """A recipe's mapping: one weight (and density) row per merged source."""
    data: dict[str, Any] = {
        "format": RECIPE_FORMAT,
        "sources": _source_entries(r.sources, r.source_layers, r.fingerprints),
        "method": r.method,
        "base": r.base,
        "layer_groups": r.layer_groups,
    }
    if r.ends:
        data["ends"] = True
    if r.spec.params or r.normalize != r.spec.normalize:  # slerp, nuslerp, model stock: neither at its default
        data["normalize"] = r.normalize
    if r.spec.params or r.lam != 1:
        data["lambda"] = r.lam
    if r.spec.sparsify not in (None, "magnitude"):
        data["rescale"] = r.rescale
    if r.spec.random:
        data["seed"] = r.seed
    if r.options:
        data["options"] = dict(r.options)
    if r.weights:
        data["weights"] = {s: list(row) for s, row in zip(r.merged, r.weights, strict=True)}
    if r.filters:
        data["filters"] = {f: {s: list(row) for s, row in zip(r.merged, rows, strict=True)}
                           for f, rows in zip(r.filters, r.filtered, strict=True)}
    if r.densities:
        data["densities"] = {s: list(row) for s, row in zip(r.merged, r.densities, strict=True)}
    if r.scores:
        data["scores"] = r.scores
    return data


class _FlowLists(NoAliasDumper):
    """Dumper that writes lists of numbers on one line, keeping genome files readable (and no aliases,
    which `read_yaml` refuses)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(x, (int, float)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowLists.add_representer(list, _represent_list)


def save_genome(g: CandidateGenome, path: str | Path) -> None:
    """Write a genome or recipe file atomically."""
    text = yaml.dump(genome_to_dict(g), Dumper=_FlowLists, sort_keys=False, width=200)
    write_atomic(path, text)
