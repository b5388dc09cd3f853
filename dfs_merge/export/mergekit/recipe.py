"""mergekit configs of parameter-space merges: a recipe written as one, and one read back into a recipe.

`write_recipe_config` writes a `Recipe` as a mergekit 0.1.5 config of the same method (every method of
`METHODS`: `linear`, `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `breadcrumbs`,
`breadcrumbs_ties`, `della`, `della_linear`, `slerp`, `nuslerp`, `model_stock`) in the slices form that
mergekit-evolve writes (`evo/genome.py`, `_discrete_config_slices`): one slice per layer
group, each merged source with the group's `layer_range` and its `weight` (and `density`),
plus the base without parameters where it is not one of the merged sources. A method whose value is
shared (slerp's `t`) has it in the slice's `parameters`; a recipe's filters are written as mergekit's
`{filter, value}` entries, the unfiltered weight last; the method's options in the config's `parameters`.
`import_recipe` reads such a config (or the `models` form) back into a recipe, in three steps:
parse the slices (`_parse`), resolve them against the sources' configs into one value per source,
layer, parameter and weight class (`_sources`, `_spans`, `_shared`, `_per_layer`), and build the recipe of
the fewest layer groups that hold those values (`_build`).

mergekit semantics this module relies on (mergekit 0.1.5, `plan.py`, `config.py`,
`parameter_resolver.py`, `merge_methods/generalized_task_arithmetic.py`, `merge_methods/linear.py`,
`merge_methods/slerp.py`, `nuslerp.py`, `model_stock.py`):

- a per-model parameter (`weight`, `density`, `gamma`, `epsilon`) is looked up in the model's own
  `parameters`, then the slice's, then the config's; shared ones (`normalize`, `lambda`, `rescale`,
  `int8_mask`, slerp's `t`, nuslerp's and model stock's switches) in the slice's, then the config's. A
  gradient (list of numbers) interpolates over a slice's layers (`t` = i / (n - 1), 1 for a one-layer
  slice); `{filter, value}` entries resolve per tensor name (the first whose filter is in the name);
- the embeddings are merged with the first slice's parameters and the final norm and LM
  head with the last slice's, both at `t = 0`; so a gradient's head value is its first
  one, not its last;
- the `models` form is one slice over all layers of every model, with the base added
  (without parameters) when it is not listed;
- `linear` weights every input, the base too (a base without a weight is an error);
  the other methods weight the non-base inputs only; `slerp` takes the base and exactly one other model,
  `nuslerp` exactly two besides its optional base, `model_stock` at least two besides the base;
- `ties` with `rescale: true` rescales its magnitude-pruned deltas (a recipe's `ties` does
  not: refused); DARE's and DELLA's masks come from torch's global generator, so mergekit cannot
  reproduce the masks of a recipe's seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dfs_merge
from dfs_merge.atomic import write_atomic
from dfs_merge.errors import ExportError, GenomeError, SourceError
from dfs_merge.export.mergekit.common import (
    base_model,
    check_config_output,
    distinct_models,
    dump_config,
    layer_range,
    merge_dtype,
    model_name,
    model_reference,
    resolve_setting,
    same_path,
    tokenizer_source,
)
from dfs_merge.merging.methods import GTA, METHODS, Method
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.families import Family
from dfs_merge.models.kinds import source_kind
from dfs_merge.models.sources import locate, read_config

__all__ = ["dare_note", "import_recipe", "recipe_config", "supported", "supported_message", "write_recipe_config"]

# --------------------------------------------------------------------------- recipe out


def write_recipe_config(recipe: Recipe, out: str | Path, *, force: bool = False, dtype: str | None = None) -> Path:
    """Write a mergekit config that builds the same merge as dfs-merge does (`dfs_merge.merging.blend`).

    The config is `recipe_config`'s, under a header naming the recipe and how to build it.
    For DARE the header says that mergekit's random masks are not the recipe's.
    """
    out = check_config_output(out, recipe.sources, force=force)
    data = recipe_config(recipe, dtype=dtype)
    header = (
        f"# mergekit {recipe.method} config written by dfs-merge {dfs_merge.__version__}\n"
        f"# recipe ({recipe.layer_groups} layer group{'s' if recipe.layer_groups != 1 else ''} over "
        f"{recipe.layers} layers): {recipe.text()}\n"
        f"# recipe key {recipe.key()}; sources: {', '.join(recipe.sources)}\n"
    )
    header += dare_note(recipe)
    header += f"# build: mergekit-yaml {out.name} OUTPUT_DIR\n"
    write_atomic(out, header + dump_config(data))
    return out


def recipe_config(recipe: Recipe, *, dtype: str | None = None) -> dict[str, Any]:
    """The mergekit config (a mapping) that builds the same merge as dfs-merge does (`dfs_merge.merging.blend`).

    One slice per layer group (`layer_range` [first, end) of the group); each merged source
    carries the group's `weight` (and `density`); the base is listed without parameters in
    every slice where it is not merged (mergekit-evolve's layout). With `ends` the first and
    the last layer are one-layer slices of their own whose values are two-point gradients:
    mergekit takes a one-layer slice's layer at `t = 1` and the embeddings (first slice) and the
    final norm and head (last slice) at `t = 0`. `base_model` is the base
    (for `linear` only when the recipe has one); `parameters` holds `normalize`, `lambda`
    when it is not 1 and, for DARE, `rescale`. `dtype` defaults to the base's stored dtype.
    Sources are checked (config.json only): their layer counts, one `vocab_size` (mergekit cannot say a merge
    over vocabularies in a prefix relation), no model listed twice, and no source of a kind built in memory
    (`kinds`: a recipe file), which mergekit has no name for.
    """
    for i, p in enumerate(recipe.sources):
        kind = source_kind(p)
        if kind is not None:
            raise ExportError(f"source {i} ({p}) of the recipe is itself a {kind.name} file; a mergekit config "
                              "cannot name a model built in memory (a merge nested in a merge)")
    configs = [read_config(locate(p).resolve())[0] for p in recipe.sources]
    for i, cfg in enumerate(configs):
        if cfg.num_hidden_layers != recipe.layers:
            raise SourceError(f"source {i} ({recipe.sources[i]}) has {cfg.num_hidden_layers} layers, "
                              f"the recipe says {recipe.layers}")
        if cfg.vocab_size != configs[0].vocab_size:  # `models.vocab`: one vocabulary a prefix of the other's
            raise ExportError(f"sources 0 and {i} differ in vocab_size ({configs[0].vocab_size} vs {cfg.vocab_size}): "
                              "dfs-merge merges the rows of the tokens they share and keeps the base's others, which a "
                              "mergekit config cannot say; export an HF checkpoint instead (--format hf)")
    folders = [model_reference(p) for p in recipe.sources]
    spec = recipe.spec
    with_base = spec.takes_base and recipe.base is not None
    listed = [*recipe.merged, *([recipe.base] if with_base else [])]
    for a in range(len(listed)):
        for b in range(a):
            if folders[listed[a]] == folders[listed[b]]:
                raise ExportError(f"sources {listed[b]} and {listed[a]} are the same model ({folders[listed[a]]}); "
                                  "mergekit refuses a model listed twice in one merge")
    params: dict[str, Any] = {}
    if "normalize" in spec.params:
        params["normalize"] = spec.normalize if recipe.normalize is None else recipe.normalize
    if "lambda" in spec.params and recipe.lam != 1:
        params["lambda"] = recipe.lam
    if "rescale" in spec.params and spec.sparsify not in (None, "magnitude"):
        params["rescale"] = spec.rescale if recipe.rescale is None else recipe.rescale
    params.update(recipe.options)
    slices: list[dict[str, Any]] = []
    for first, end, column, at_zero in _slice_plan(recipe):
        def value(row: Sequence[float], column: int = column, at_zero: int | None = at_zero) -> Any:
            return row[column] if at_zero is None or row[at_zero] == row[column] else [row[at_zero], row[column]]

        values = [_filtered_value(recipe, value, k) for k in range(len(recipe.weights))]
        entries: list[dict[str, Any]] = []
        for k, s in enumerate(recipe.merged):
            p: dict[str, Any] = {spec.weight: values[k]} if values and not spec.shared_weight and spec.weight else {}
            if spec.has_density:
                p["density"] = value(recipe.densities[k])
            entries.append({"model": folders[s], "layer_range": [first, end], **({"parameters": p} if p else {})})
        if with_base:
            entries.append({"model": folders[recipe.base], "layer_range": [first, end]})
        slices.append({"sources": entries, **({"parameters": {spec.weight: values[0]}} if spec.shared_weight else {})})
    data: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.base is not None:
        data["base_model"] = folders[recipe.base]
    data["parameters"] = params
    data["dtype"] = dtype or merge_dtype(configs[recipe.base if recipe.base is not None else 0])
    data["slices"] = slices
    return data


def _slice_plan(recipe: Recipe) -> list[tuple[int, int, int, int | None]]:
    """The slices of a recipe's config: (first layer, end, the column of the rows its layers take, the column its
    `t = 0` end takes where that differs: the embeddings' before the first layer, the norm and head's after the
    last). Without `ends`, one slice per layer group."""
    if recipe.ends and recipe.layers == 1:
        raise ExportError("a one-layer recipe with ends cannot be written for mergekit: its one slice gives the "
                          "embeddings, the layer and the head values at t = 0 and t = 1 only")
    plan = []
    for g in range(recipe.layer_groups):
        first, end = recipe.group_range(g)
        column = recipe.column(first)
        if recipe.ends and first == 0:
            plan.append((0, 1, column, recipe.column(None)))
            first = 1
        if recipe.ends and end == recipe.layers:
            if first < end - 1:
                plan.append((first, end - 1, column, None))
            plan.append((end - 1, end, column, recipe.column(None, after=True)))
        elif first < end:
            plan.append((first, end, column, None))
    return plan


def _filtered_value(recipe: Recipe, value: Any, k: int) -> Any:
    """Merged source k's weight in a slice as mergekit writes it (`value` of a row: a number or a gradient), or
    with the recipe's filters a list of `{filter, value}` entries, the unfiltered weight last."""
    if not recipe.filters:
        return value(recipe.weights[k])
    return [*({"filter": f, "value": value(rows[k])} for f, rows in zip(recipe.filters, recipe.filtered, strict=True)),
            {"value": value(recipe.weights[k])}]


def dare_note(recipe: Recipe) -> str:
    """Header lines (each ending in a newline) saying that mergekit cannot reproduce a DARE or DELLA recipe's
    masks; empty for the other methods."""
    if not recipe.spec.random:
        return ""
    return (
        f"# {recipe.method}: mergekit draws its random masks from torch's global generator (mergekit-yaml "
        "--random-seed),\n"
        f"# not from dfs-merge's per-tensor generators of seed {recipe.seed}: mergekit cannot reproduce this\n"
        "# recipe's masks; its build is the same recipe with other masks, not the same weights\n"
    )


# --------------------------------------------------------------------------- recipe in

_SHARED = {"normalize": bool, "lambda": float, "rescale": bool, "int8_mask": bool}
"""Generalized task arithmetic's shared parameters and their types."""
_TOP_KEYS = {"merge_method", "base_model", "dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template",
             "parameters", "slices", "models", "name"}


def supported() -> tuple[str, ...]:
    """The merge methods a mergekit config may name: passthrough and every registered method."""
    return ("passthrough", *METHODS)


def supported_message(method: Any) -> str:
    """The refusal of a merge method that neither a route nor a recipe can express."""
    return f"merge_method is {method!r}, which is not supported; supported: {', '.join(supported())}"


def _shared_types(spec: Method) -> dict[str, type]:
    """The shared parameters mergekit reads for a method (slice, then config) and their types."""
    gta = spec.params == GTA
    types = {name: t for name, t in _SHARED.items() if gta or name in spec.params}
    types.update({name: bool for name, default in spec.options if isinstance(default, bool)})
    if spec.shared_weight and spec.weight:
        types[spec.weight] = float
    return types


def _per_model(spec: Method) -> dict[str, float | None]:
    """The per-model parameters mergekit reads for a method (model, slice, then config) and their defaults
    (None: required)."""
    out: dict[str, float | None] = {}
    if spec.weight and not spec.shared_weight:
        out[spec.weight] = None
    if spec.has_density or spec.params == GTA:
        out["density"] = 1.0
    out.update({name: float(d) for name, d in spec.options if not isinstance(d, bool)})
    return out


Scopes = Sequence[tuple[str, dict[str, Any]]]
"""Where a parameter is looked up, first to last: (the message prefix of a scope, its `parameters`)."""


@dataclass(frozen=True)
class _Model:
    """One model entry of a slice: its name, its own `parameters`, where it is (for messages)."""

    name: str
    params: dict[str, Any]
    at: str


@dataclass(frozen=True)
class _RecipeSlice:
    """One slice as parsed: where it is, its `layer_range` (None: every layer, the `models` form), its models
    and its own `parameters`."""

    at: str
    layers: tuple[int, int] | None
    models: list[_Model]
    params: dict[str, Any]


@dataclass(frozen=True)
class _Parsed:
    """A config as parsed, before any source is read."""

    method: str
    spec: Method
    top: dict[str, Any]  # the config's own `parameters`
    top_at: str
    base_model: str | None
    slices: list[_RecipeSlice]
    sliced: bool  # the `slices` form (else the `models` form)


def import_recipe(data: dict[str, Any], where: str, sources: Sequence[str] | None = None) -> Recipe:
    """Turn a mergekit config of a parameter-space method into a recipe (errors: one GenomeError line).

    Both the `slices` form (as mergekit-evolve writes it: every slice lists the same models,
    each over the slice's own layers) and the `models` form are read. Every parameter is
    resolved per layer and per tensor exactly as mergekit does (precedence, gradients,
    filters); a value that differs between the tensors of one layer cannot be a recipe and is
    refused; embeddings / head values other than the first / last layer's make a recipe with
    `ends`.
    `layer_groups` is the number of slices when the values fit that grouping (1 for scalar
    values of the `models` form, the number of layers for gradients), else the fewest
    groups that hold them. Sources are `sources` if given (the same models, in any order),
    else the `base_model` (when set) then the models in order of first appearance.
    """
    config = _parse(data, where)
    src_list, base, per_slice = _sources(config, sources, where)
    if tokenizer_source(data, src_list, where) != 0:
        raise GenomeError(f"{where}: tokenizer_source {data.get('tokenizer_source')!r}: a recipe's merge keeps the "
                          f"vocabulary of its sources (the tokenizer of {src_list[0]})")
    layers, family, tied = _depth(src_list, where)
    spans = _spans(config.slices, layers, where)
    shared = _shared(config, where)
    merged = [k for k in range(len(src_list)) if base is None or not config.spec.takes_base or k != base]
    rows, filters = _per_layer(config, per_slice, src_list, merged, spans, family, tied)
    return _build(config, src_list, base, layers, rows, filters, shared, where)


# ---- parse


def _parse(data: dict[str, Any], where: str) -> _Parsed:
    """The config's method, parameters, base and slices (the `models` form as one slice), their fields checked."""
    method = data.get("merge_method")
    if method not in METHODS:
        raise GenomeError(f"{where}: {supported_message(method)}")
    for key in data:
        if key == "modules":
            raise GenomeError(f"{where}: modules: per-module configs are not supported (use slices or models)")
        if key not in _TOP_KEYS:
            raise GenomeError(f"{where}: {key}: not a mergekit config field a recipe can express")
    spec = METHODS[method]
    top_at = f"{where}: "
    top = _parameters(data, top_at, spec)
    base = base_model(data, where)
    if base is not None and (not isinstance(base, str) or not base):
        raise GenomeError(f"{where}: base_model: expected a model path, got {base!r}")
    raw_slices, raw_models = data.get("slices"), data.get("models")
    if (raw_slices is None) == (raw_models is None):
        raise GenomeError(f"{where}: needs exactly one of 'slices' and 'models'")
    if raw_slices is not None:
        slices = _parse_slices(raw_slices, base, spec, where)
    else:
        slices = [_parse_models(raw_models, base, spec, where)]
    return _Parsed(method, spec, top, top_at, base, slices, raw_slices is not None)


def _parse_slices(raw: Any, base: str | None, spec: Method, where: str) -> list[_RecipeSlice]:
    """The `slices` form: each slice's models over one `layer_range`, with their parameters."""
    if not isinstance(raw, list) or not raw:
        raise GenomeError(f"{where}: slices: expected a non-empty list")
    slices = []
    for i, sl in enumerate(raw):
        w = f"{where}: slices[{i}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise GenomeError(f"{w}: needs a non-empty 'sources' list")
        for key in sl:
            if key == "base_model":
                other = sl[key] if not isinstance(sl[key], dict) else model_name({"model": sl[key]}, f"{w}.base_model")
                if not (isinstance(other, str) and isinstance(base, str) and same_path(other, base)):
                    raise GenomeError(f"{w}.base_model: a per-slice base other than the config's base_model")
            elif key not in ("sources", "parameters"):
                raise GenomeError(f"{w}.{key}: not a slice field a recipe can express")
        models, rng = [], None
        for j, entry in enumerate(sl["sources"]):
            we = f"{w}.sources[{j}]"
            if not isinstance(entry, dict):
                raise GenomeError(f"{we}: expected a mapping with 'model' and 'layer_range'")
            for key in entry:
                if key not in ("model", "layer_range", "parameters"):
                    raise GenomeError(f"{we}.{key}: not a slice source field a recipe can express")
            this = layer_range(entry, we)
            if rng is not None and this != rng:
                raise GenomeError(f"{we}: layer_range {list(this)} differs from {list(rng)} of the slice's first "
                                  "model; a recipe merges layer l of every source into layer l")
            rng = this
            models.append(_Model(model_name(entry, we), _parameters(entry, we + ".", spec, model=True), we))
        slices.append(_RecipeSlice(w, rng, models, _parameters(sl, w + ".", spec)))
    return slices


def _parse_models(raw: Any, base: str | None, spec: Method, where: str) -> _RecipeSlice:
    """The `models` form: one slice over every layer, the base added without parameters when not listed."""
    if not isinstance(raw, list) or not raw:
        raise GenomeError(f"{where}: models: expected a non-empty list")
    models = []
    for j, entry in enumerate(raw):
        we = f"{where}: models[{j}]"
        if not isinstance(entry, dict):
            raise GenomeError(f"{we}: expected a mapping with 'model'")
        for key in entry:
            if key not in ("model", "parameters"):
                raise GenomeError(f"{we}.{key}: not a model entry field a recipe can express")
        models.append(_Model(model_name(entry, we), _parameters(entry, we + ".", spec, model=True), we))
    if isinstance(base, str) and not any(same_path(m.name, base) for m in models):
        models.append(_Model(base, {}, f"{where}: base_model"))  # mergekit adds the base, without parameters
    return _RecipeSlice(f"{where}: models", None, models, {})


def _parameters(holder: Any, at: str, spec: Method, model: bool = False) -> dict[str, Any]:
    """The `parameters` mapping of a config, slice or model entry (`model`; named by the prefix `at`), its names
    checked against the method's (a shared one is refused in a model entry, where mergekit ignores it)."""
    shared = _shared_types(spec)
    allowed = {*shared, *_per_model(spec)}
    p = holder.get("parameters") if isinstance(holder, dict) else None
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise GenomeError(f"{at}parameters: expected a mapping, got {type(p).__name__}")
    for name in p:
        if name not in allowed:
            raise GenomeError(f"{at}parameters.{name}: not a parameter a recipe can express for this merge_method "
                              f"(known: {', '.join(sorted(allowed))})")
        if model and name in shared:
            raise GenomeError(f"{at}parameters.{name}: a shared parameter, which mergekit reads only from a "
                              "slice's or the config's parameters (it would be ignored here)")
    return p


# ---- resolve


def _sources(
    config: _Parsed, sources: Sequence[str] | None, where: str
) -> tuple[list[str], int | None, list[dict[int, _Model]]]:
    """The recipe's sources, its base's index, and each slice's model entry per source index (every slice
    must merge every source)."""
    order = ([config.base_model] if config.base_model is not None else []) + [
        m.name for sl in config.slices for m in sl.models]
    found = distinct_models(order)
    if sources is None:
        src_list = found
    else:
        src_list = [str(s) for s in sources]
        for s in src_list:
            if not any(same_path(s, m) for m in found):
                raise GenomeError(f"{where}: source {s} is not a model of the config ({', '.join(found)})")
        for m in found:
            if not any(same_path(m, s) for s in src_list):
                raise GenomeError(f"{where}: model {m} is not one of the sources ({', '.join(src_list)})")

    def index(m: str) -> int:
        return next(k for k, s in enumerate(src_list) if same_path(m, s))

    base = index(config.base_model) if config.base_model is not None else None
    if config.spec.needs_base and base is None:
        raise GenomeError(f"{where}: base_model: merge_method {config.method} needs a base_model")
    every = set(range(len(src_list)))
    per_slice: list[dict[int, _Model]] = []
    for sl in config.slices:
        mine: dict[int, _Model] = {}
        for m in sl.models:
            k = index(m.name)
            if k in mine:
                raise GenomeError(f"{m.at}: model {m.name} is listed twice in one slice (mergekit refuses duplicate "
                                  "inputs)")
            mine[k] = m
        if set(mine) != every:
            missing = src_list[min(every - set(mine))]
            what = "the base_model" if base is not None and index(missing) == base else f"model {missing}"
            raise GenomeError(f"{sl.at}: {what} is not among its sources; a recipe merges the same models in every "
                              "layer group" + (" (and mergekit needs the base in every slice)"
                                               if config.spec.needs_base else ""))
        per_slice.append(mine)
    return src_list, base, per_slice


def _depth(src_list: Sequence[str], where: str) -> tuple[int, Family, bool]:
    """The sources' one layer count, the first source's family and whether it ties its head to its embeddings
    (from config.json only)."""
    counts, first = [], None
    for s in src_list:
        cfg, fam = read_config(locate(s))
        counts.append(int(cfg.num_hidden_layers))
        if first is None:
            first = (fam, bool(getattr(cfg, "tie_word_embeddings", False)))
    if len(set(counts)) != 1:
        raise GenomeError(f"{where}: a parameter-space merge needs sources of one depth, got layers {counts}")
    assert first is not None
    return counts[0], *first


def _spans(slices: Sequence[_RecipeSlice], layers: int, where: str) -> list[tuple[int, int]]:
    """Each slice's layers [start, end): the slices must cover the models' layers in order, each layer once."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for sl in slices:
        start, end = sl.layers if sl.layers is not None else (0, layers)
        if end > layers:
            raise GenomeError(f"{sl.at}: layer_range [{start}, {end}] ends past the models' {layers} layers")
        if start != pos or end == start:
            raise GenomeError(f"{sl.at}: layer_range [{start}, {end}]: a recipe merges layer l of every source into "
                              f"layer l, so this slice must start at layer {pos} and hold at least one layer")
        spans.append((start, end))
        pos = end
    if pos != layers:
        raise GenomeError(f"{where}: the slices end at layer {pos}, not at the models' {layers} layers")
    return spans


def _shared(config: _Parsed, where: str) -> dict[str, Any]:
    """The shared parameters (slerp's `t` aside, a weight): one value for the whole merge (mergekit's defaults
    are the recipe's)."""
    spec = config.spec
    types = {n: t for n, t in _shared_types(spec).items() if n != spec.weight}
    defaults = {"normalize": spec.normalize, "lambda": 1.0, "rescale": spec.rescale, "int8_mask": False,
                **dict(spec.options)}
    shared: dict[str, Any] = {}
    for name, kind in types.items():
        values = [_shared_value([(sl.at + ".", sl.params), (config.top_at, config.top)], name, kind)
                  for sl in config.slices]
        values = [defaults[name] if v is None else v for v in values]
        if any(v != values[0] for v in values):
            k = next(k for k, v in enumerate(values) if v != values[0])
            raise GenomeError(f"{config.slices[k].at}.parameters.{name}: {values[k]!r} differs from slice 0's "
                              f"{values[0]!r}; a recipe has one {name} for the whole merge")
        shared[name] = values[0]
    if config.method == "ties" and shared.get("rescale"):
        raise GenomeError(f"{where}: parameters.rescale: true rescales TIES's pruned deltas in mergekit; a recipe's "
                          "ties does not (use dare_ties, or rescale: false)")
    return shared


def _shared_value(scopes: Scopes, name: str, kind: type) -> Any:
    """A shared parameter as mergekit resolves it (first scope that sets it); None when none does."""
    for at, scope in scopes:
        if name in scope and scope[name] is not None:
            v = scope[name]
            if kind is bool and not isinstance(v, bool):
                raise GenomeError(f"{at}parameters.{name}: expected true or false, got {v!r} "
                                  "(a recipe has one value for every tensor)")
            if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise GenomeError(f"{at}parameters.{name}: expected a finite number, got {v!r} "
                                  "(a recipe has one value for every tensor)")
            return float(v) if kind is float else v
    return None


def _config_filters(config: _Parsed, name: str) -> list[str]:
    """The filters of `name`'s `{filter, value}` entries in every scope (config, slices, models), in order of
    first appearance (`*` and no filter, which match every tensor, left out)."""
    found: list[str] = []

    def walk(setting: Any) -> None:
        for entry in [setting] if isinstance(setting, dict) else setting if isinstance(setting, list) else []:
            if isinstance(entry, dict):
                f = entry.get("filter")
                if f is not None and str(f) != "*" and str(f) not in found:
                    found.append(str(f))
                walk(entry.get("value"))

    for scope in [config.top, *(sl.params for sl in config.slices), *(m.params for sl in config.slices for m in sl.models)]:
        walk(scope.get(name))
    return found


def _weight_class(filters: Sequence[str], tensor: str) -> int | None:
    """The class of a tensor under `filters`: the first in its name (`Recipe.weight_class`); None: unfiltered."""
    return next((c for c, f in enumerate(filters) if f in tensor), None)


PerLayer = dict[tuple[str, int | None], list[list[float]]]
"""Per (parameter, weight class), one row per merged source of its value at the embeddings, at every layer and at
the final norm and head."""


def _per_layer(
    config: _Parsed, per_slice: Sequence[dict[int, _Model]], src_list: Sequence[str], merged: Sequence[int],
    spans: Sequence[tuple[int, int]], family: Family, tied: bool,
) -> tuple[PerLayer, list[str]]:
    """Per parameter (the method's weight, `density`, per-model options) and weight class (the weight's filters
    that select layer tensors), one row per merged source of its value at the embeddings (mergekit: the first
    slice at t = 0), every layer and the final norm and head (the last slice at t = 0); a class without such
    tensors takes its first / last layer's value there. Also the filters kept."""
    spec = config.spec
    layer_names = [*family.layer_weights, *(n.replace(".weight", ".bias") for n in family.layer_weights if "_proj." in n)]
    pre_names = [n for n in family.non_layer_weights if "embed" in n]
    post_names = [n for n in family.non_layer_weights if "embed" not in n and not (tied and n.startswith("lm_head"))]
    defaults = _per_model(spec)
    names = [n for n in defaults if n != "density" or spec.has_density]
    if spec.shared_weight and spec.weight:
        names.insert(0, spec.weight)
    layers = [[f"{family.layers_attr}.{layer}.{x}" for x in layer_names] for layer in range(spans[-1][1])]
    filters = [f for f in _config_filters(config, spec.weight) if any(f in n for ns in layers for n in ns)] \
        if spec.weight else []
    rows: PerLayer = {}
    last = len(config.slices) - 1

    def scopes(k: int, i: int) -> Scopes:
        model, sl = per_slice[i][k], config.slices[i]
        return [(model.at + ".", model.params), (sl.at + ".", sl.params), (config.top_at, config.top)]

    def value(k: int, i: int, name: str, tensors: Sequence[str], t: float, what: str) -> float:
        model = per_slice[i][k]
        return _model_value(scopes(k, i), name, tensors, t, what, model.at, src_list[k], defaults.get(name))

    def by_class(name: str, tensors: Sequence[str]) -> dict[int | None, list[str]]:
        out: dict[int | None, list[str]] = {}
        for tensor in tensors:
            out.setdefault(_weight_class(filters, tensor) if name == spec.weight else None, []).append(tensor)
        return out

    for name in names:
        classes = [None, *range(len(filters))] if name == spec.weight else [None]
        for k in merged:
            per_layer: dict[int | None, list[float | None]] = {c: [] for c in classes}
            for i, (start, end) in enumerate(spans):
                n = end - start
                for j in range(n):
                    layer = start + j
                    groups = by_class(name, layers[layer])
                    for c in classes:
                        per_layer[c].append(value(k, i, name, groups[c], j / (n - 1) if n > 1 else 1.0,
                                                  f"the tensors of layer {layer}") if c in groups else None)
            # a class without tensors in a layer: any value builds the same; the first class's that has some
            filled = {c: [v if v is not None else next(per_layer[d][pos] for d in classes if per_layer[d][pos] is not None)
                          for pos, v in enumerate(per_layer[c])] for c in classes}
            pre = {c: value(k, 0, name, group, 0.0, "the embeddings") for c, group in by_class(name, pre_names).items()}
            post = {c: value(k, last, name, group, 0.0, "the final norm and LM head")
                    for c, group in by_class(name, post_names).items()}
            for c in classes:
                rows.setdefault((name, c), []).append([pre.get(c, filled[c][0]), *filled[c],
                                                       post.get(c, filled[c][-1])])
    return rows, filters


def _model_value(scopes: Scopes, name: str, tensors: Sequence[str], t: float, what: str, at: str, model: str,
                 default: float | None) -> float:
    """One model's `name` on a set of tensors (a layer's, the embeddings, the head): one value for all of them
    (a missing value is `default`; none, as for a missing weight, is refused, as mergekit does)."""
    values = {tensor: _resolved(scopes, name, tensor, t) for tensor in tensors}
    (first, v), *rest = values.items()
    other = next(((tensor, x) for tensor, x in rest if x != v), None)
    if other is not None:
        raise GenomeError(f"{at}.parameters.{name}: filters give {what} different values ({first}: {v}, "
                          f"{other[0]}: {other[1]}); a recipe has one {name} per source and layer group")
    if v is None:
        if default is not None:
            return default
        raise GenomeError(f"{at}: no {name} for model {model} on {what} (mergekit requires one)")
    return v


def _resolved(scopes: Scopes, name: str, tensor: str, t: float) -> float | None:
    """A per-model parameter of one tensor as mergekit resolves it: the first scope giving a value."""
    for at, scope in scopes:
        if name in scope:
            try:
                v = resolve_setting(scope[name], tensor, t)
            except ValueError as err:
                raise GenomeError(f"{at}parameters.{name}: {err}") from None
            if v is not None:
                if not math.isfinite(v):
                    raise GenomeError(f"{at}parameters.{name}: {v!r} is not a finite number")
                return v
    return None


# ---- build


def _build(config: _Parsed, src_list: Sequence[str], base: int | None, layers: int, rows: PerLayer,
           filters: Sequence[str], shared: dict[str, Any], where: str) -> Recipe:
    """The recipe of the per-layer values in the fewest layer groups that hold them (the slices' own grouping,
    or for the `models` form one group or one per layer, where those fit); a per-model option (gamma,
    epsilon) must be one value for the whole merge."""
    spec = config.spec
    options: dict[str, Any] = {n: v for n, v in shared.items() if n in dict(spec.options)}
    for name, _ in spec.options:
        if (name, None) in rows:
            found = sorted({v for row in rows.pop((name, None)) for v in row})
            if len(found) > 1:
                raise GenomeError(f"{where}: parameters.{name}: the config gives {', '.join(map(str, found))}; a recipe "
                                  f"has one {name} for the whole merge")
            options[name] = found[0]

    ends = any(row[0] != row[1] or row[-1] != row[-2] for rs in rows.values() for row in rs)
    inner = [row[1:-1] for rs in rows.values() for row in rs]

    def fits(groups: int) -> bool:
        return all(len({row[x] for x in range(layers) if x * groups // layers == g}) == 1
                   for row in inner for g in range(groups))

    if config.sliced:  # the slices' grouping; with ends, less the one-layer end slices `_slice_plan` splits off
        ones = [sl for sl in {id(x): x for x in (config.slices[0], config.slices[-1])}.values()
                if sl.layers is not None and sl.layers[1] - sl.layers[0] == 1]
        preferred = max(1, len(config.slices) - len(ones)) if ends else len(config.slices)
    else:
        preferred = 1 if fits(1) else layers
    groups = next(g for g in [preferred, *range(1, layers + 1)] if fits(g))
    firsts = [next(x for x in range(layers) if x * groups // layers == g) for g in range(groups)]

    def grouped(key: tuple[str, int | None]) -> tuple[tuple[float, ...], ...]:
        columns = [0, *(x + 1 for x in firsts), layers + 1] if ends else [x + 1 for x in firsts]
        return tuple(tuple(row[x] for x in columns) for row in rows.get(key, []))

    w = spec.weight or ""
    try:
        return Recipe(tuple(src_list), layers, config.method, base, groups, grouped((w, None)), grouped(("density", None)),
                      normalize=shared.get("normalize"), lam=shared.get("lambda", 1.0),
                      rescale=shared.get("rescale") if spec.sparsify not in (None, "magnitude") else None,
                      filters=tuple(filters), filtered=tuple(grouped((w, c)) for c in range(len(filters))),
                      options=tuple(options.items()), ends=ends)
    except GenomeError as err:
        raise GenomeError(f"{where}: {err}") from None
