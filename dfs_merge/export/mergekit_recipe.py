"""mergekit configs of parameter-space merges: a recipe written as one, and one read back into a recipe.

`write_recipe_config` writes a `Recipe` as a mergekit 0.1.5 config of the same method
(`linear`, `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`) in the slices form that
mergekit-evolve writes (`evo/genome.py`, `_discrete_config_slices`): one slice per layer
group, each merged source with the group's `layer_range` and its `weight` (and `density`),
plus the base without parameters where it is not one of the merged sources.
`import_recipe` reads such a config (or the `models` form) back into a recipe.

mergekit semantics this module relies on (mergekit 0.1.5, `plan.py`, `config.py`,
`parameter_resolver.py`, `merge_methods/generalized_task_arithmetic.py`, `merge_methods/linear.py`):

- a per-model parameter (`weight`, `density`) is looked up in the model's own `parameters`,
  then the slice's, then the config's; shared ones (`normalize`, `lambda`, `rescale`,
  `int8_mask`) in the slice's, then the config's. A gradient (list of numbers) interpolates
  over a slice's layers (`t` = i / (n - 1), 1 for a one-layer slice); `{filter, value}`
  entries resolve per tensor name;
- the embeddings are merged with the first slice's parameters and the final norm and LM
  head with the last slice's, both at `t = 0`; so a gradient's head value is its first
  one, not its last;
- the `models` form is one slice over all layers of every model, with the base added
  (without parameters) when it is not listed;
- `linear` weights every input, the base too (a base without a weight is an error);
  the other methods weight the non-base inputs only;
- `ties` with `rescale: true` rescales its magnitude-pruned deltas (a recipe's `ties` does
  not: refused); DARE's masks come from torch's global generator, so mergekit cannot
  reproduce the masks of a recipe's seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

import dfs_merge
from dfs_merge.atomic import write_atomic
from dfs_merge.errors import ExportError, GenomeError, SourceError
from dfs_merge.export.mergekit import (
    _dtype_name,
    _model_name,
    _model_reference,
    _resolve_setting,
    _same_path,
    _tokenizer_source,
)
from dfs_merge.inputs import NoAliasDumper
from dfs_merge.merging.methods import METHODS
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.sources import locate, read_config
from dfs_merge.outputs import check_output

# --------------------------------------------------------------------------- recipe out


def write_recipe_config(recipe: Recipe, out: str | Path, *, force: bool = False, dtype: str | None = None) -> Path:
    """Write a mergekit config that builds the same merge as `merged_model(recipe, pool)`.

    The config is `recipe_config`'s, under a header naming the recipe and how to build it.
    For DARE the header says that mergekit's random masks are not the recipe's.
    """
    out = check_output(out, kind="file", force=force, inputs=recipe.sources, error=ExportError, what=None,
                       force_hint="force=True (--force)")
    data = recipe_config(recipe, dtype=dtype)
    header = (
        f"# mergekit {recipe.method} config written by dfs-merge {dfs_merge.__version__}\n"
        f"# recipe ({recipe.layer_groups} layer group{'s' if recipe.layer_groups != 1 else ''} over "
        f"{recipe.layers} layers): {recipe.text()}\n"
        f"# recipe key {recipe.key()}; sources: {', '.join(recipe.sources)}\n"
    )
    header += dare_note(recipe)
    header += f"# build: mergekit-yaml {out.name} OUTPUT_DIR\n"
    write_atomic(out, header + yaml.dump(data, Dumper=NoAliasDumper, sort_keys=False, default_flow_style=None, width=200))
    return out


def recipe_config(recipe: Recipe, *, dtype: str | None = None) -> dict[str, Any]:
    """The mergekit config (a mapping) that builds the same merge as `merged_model(recipe, pool)`.

    One slice per layer group (`layer_range` [first, end) of the group); each merged source
    carries the group's `weight` (and `density`); the base is listed without parameters in
    every slice where it is not merged (mergekit-evolve's layout). `base_model` is the base
    (for `linear` only when the recipe has one); `parameters` holds `normalize`, `lambda`
    when it is not 1 and, for DARE, `rescale`. `dtype` defaults to the base's stored dtype.
    Sources are checked (config.json only): their layer counts, no model listed twice, and
    no source that is itself a recipe file (mergekit has no name for it).
    """
    from dfs_merge.merging.recipe import is_recipe_file

    for i, p in enumerate(recipe.sources):
        if is_recipe_file(p):
            raise ExportError(f"source {i} ({p}) of the recipe is itself a recipe file; a mergekit config "
                              "cannot name a merge nested in a merge")
    configs = [read_config(locate(p).resolve())[0] for p in recipe.sources]
    for i, cfg in enumerate(configs):
        if cfg.num_hidden_layers != recipe.layers:
            raise SourceError(f"source {i} ({recipe.sources[i]}) has {cfg.num_hidden_layers} layers, "
                              f"the recipe says {recipe.layers}")
    folders = [_model_reference(p) for p in recipe.sources]
    spec = recipe.spec
    listed = [*recipe.merged, *([recipe.base] if spec.needs_base and recipe.base is not None else [])]
    for a in range(len(listed)):
        for b in range(a):
            if folders[listed[a]] == folders[listed[b]]:
                raise ExportError(f"sources {listed[b]} and {listed[a]} are the same model ({folders[listed[a]]}); "
                                  "mergekit refuses a model listed twice in one merge")
    params: dict[str, Any] = {"normalize": spec.normalize if recipe.normalize is None else recipe.normalize}
    if recipe.method != "linear" and recipe.lam != 1:
        params["lambda"] = recipe.lam
    if spec.sparsify == "random":
        params["rescale"] = spec.rescale if recipe.rescale is None else recipe.rescale
    slices: list[dict[str, Any]] = []
    for g in range(recipe.layer_groups):
        first, end = recipe.group_range(g)
        weights, densities = recipe.params(g)
        entries: list[dict[str, Any]] = []
        for k, s in enumerate(recipe.merged):
            p: dict[str, Any] = {"weight": weights[k]}
            if spec.has_density:
                p["density"] = densities[k]
            entries.append({"model": folders[s], "layer_range": [first, end], "parameters": p})
        if spec.needs_base and recipe.base is not None:
            entries.append({"model": folders[recipe.base], "layer_range": [first, end]})
        slices.append({"sources": entries})
    data: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.base is not None:
        data["base_model"] = folders[recipe.base]
    data["parameters"] = params
    data["dtype"] = dtype or _dtype_name(configs[recipe.base if recipe.base is not None else 0])
    data["slices"] = slices
    return data


def dare_note(recipe: Recipe) -> str:
    """Header lines (each ending in a newline) saying that mergekit cannot reproduce a DARE recipe's masks;
    empty for the other methods."""
    if recipe.spec.sparsify != "random":
        return ""
    return (
        f"# DARE: mergekit draws its random masks from torch's global generator (mergekit-yaml --random-seed),\n"
        f"# not from dfs-merge's per-tensor generators of seed {recipe.seed}: mergekit cannot reproduce this\n"
        "# recipe's masks; its build is the same recipe with other masks, not the same weights\n"
    )


# --------------------------------------------------------------------------- recipe in

SUPPORTED = ("passthrough", *METHODS)
_SHARED = {"normalize": bool, "lambda": float, "rescale": bool, "int8_mask": bool}
_TOP_KEYS = {"merge_method", "base_model", "dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template",
             "parameters", "slices", "models", "name"}


def _parameters(holder: Any, at: str, allowed: set[str], per_model_only: bool = False) -> dict[str, Any]:
    """The `parameters` mapping of a config, slice or model entry (named by the prefix `at`), its names checked."""
    p = holder.get("parameters") if isinstance(holder, dict) else None
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise GenomeError(f"{at}parameters: expected a mapping, got {type(p).__name__}")
    for name in p:
        if name not in allowed:
            raise GenomeError(f"{at}parameters.{name}: not a parameter a recipe can express for this merge_method "
                              f"(known: {', '.join(sorted(allowed))})")
        if per_model_only and name in _SHARED:
            raise GenomeError(f"{at}parameters.{name}: a shared parameter, which mergekit reads only from a "
                              "slice's or the config's parameters (it would be ignored here)")
    return p


def _shared_value(scopes: Sequence[tuple[str, dict[str, Any]]], name: str) -> Any:
    """A shared parameter as mergekit resolves it (first scope that sets it); None when none does."""
    for at, scope in scopes:
        if name in scope and scope[name] is not None:
            v = scope[name]
            if _SHARED[name] is bool and not isinstance(v, bool):
                raise GenomeError(f"{at}parameters.{name}: expected true or false, got {v!r} "
                                  "(a recipe has one value for every tensor)")
            if _SHARED[name] is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise GenomeError(f"{at}parameters.{name}: expected a finite number, got {v!r} "
                                  "(a recipe has one value for every tensor)")
            return float(v) if _SHARED[name] is float else v
    return None


def _resolved(scopes: Sequence[tuple[str, dict[str, Any]]], name: str, tensor: str, t: float) -> float | None:
    """A per-model parameter of one tensor as mergekit resolves it: the first scope giving a value."""
    for at, scope in scopes:
        if name in scope:
            try:
                v = _resolve_setting(scope[name], tensor, t)
            except ValueError as err:
                raise GenomeError(f"{at}parameters.{name}: {err}") from None
            if v is not None:
                if not math.isfinite(v):
                    raise GenomeError(f"{at}parameters.{name}: {v!r} is not a finite number")
                return v
    return None


def _layer_range(entry: dict[str, Any], where: str) -> tuple[int, int]:
    rng = entry.get("layer_range")
    if (not isinstance(rng, (list, tuple)) or len(rng) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng) or not 0 <= rng[0] <= rng[1]):
        raise GenomeError(f"{where}: layer_range must be [start, end] with 0 <= start <= end, got {rng!r}")
    return int(rng[0]), int(rng[1])


def import_recipe(data: dict[str, Any], where: str, sources: Sequence[str] | None = None) -> Recipe:
    """Turn a mergekit config of a parameter-space method into a recipe (errors: one GenomeError line).

    Both the `slices` form (as mergekit-evolve writes it: every slice lists the same models,
    each over the slice's own layers) and the `models` form are read. Every parameter is
    resolved per layer and per tensor exactly as mergekit does (precedence, gradients,
    filters); a value that differs between the tensors of one layer, or an embeddings / head
    value other than layer group 0's / the last group's, cannot be a recipe and is refused.
    `layer_groups` is the number of slices when the values fit that grouping (1 for scalar
    values of the `models` form, the number of layers for gradients), else the fewest
    groups that hold them. Sources are `sources` if given (the same models, in any order),
    else the `base_model` (when set) then the models in order of first appearance.
    """
    method = data.get("merge_method")
    if method not in METHODS:
        raise GenomeError(f"{where}: {supported_message(method)}")
    spec = METHODS[method]
    for key in data:
        if key == "modules":
            raise GenomeError(f"{where}: modules: per-module configs are not supported (use slices or models)")
        if key not in _TOP_KEYS:
            raise GenomeError(f"{where}: {key}: not a mergekit config field a recipe can express")
    allowed = {"weight", "normalize"} if method == "linear" else {"weight", "density", *_SHARED}
    top_at = f"{where}: "
    top = _parameters(data, top_at, allowed)

    # the slices: (label, layer_range, [(model, its parameters, its label)], slice parameters); models: one slice
    base_model = data.get("base_model")
    if isinstance(base_model, dict):
        base_model = _model_name({"model": base_model}, f"{where}: base_model")
    if base_model is not None and (not isinstance(base_model, str) or not base_model):
        raise GenomeError(f"{where}: base_model: expected a model path, got {base_model!r}")
    raw_slices, raw_models = data.get("slices"), data.get("models")
    if (raw_slices is None) == (raw_models is None):
        raise GenomeError(f"{where}: needs exactly one of 'slices' and 'models'")
    slices: list[tuple[str, tuple[int, int] | None, list[tuple[str, dict[str, Any], str]], dict[str, Any]]] = []
    if raw_slices is not None:
        if not isinstance(raw_slices, list) or not raw_slices:
            raise GenomeError(f"{where}: slices: expected a non-empty list")
        for i, sl in enumerate(raw_slices):
            w = f"{where}: slices[{i}]"
            if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
                raise GenomeError(f"{w}: needs a non-empty 'sources' list")
            for key in sl:
                if key == "base_model":
                    other = sl[key] if not isinstance(sl[key], dict) else _model_name({"model": sl[key]}, f"{w}.base_model")
                    if not (isinstance(other, str) and isinstance(base_model, str) and _same_path(other, base_model)):
                        raise GenomeError(f"{w}.base_model: a per-slice base other than the config's base_model")
                elif key not in ("sources", "parameters"):
                    raise GenomeError(f"{w}.{key}: not a slice field a recipe can express")
            entries, rng = [], None
            for j, entry in enumerate(sl["sources"]):
                we = f"{w}.sources[{j}]"
                if not isinstance(entry, dict):
                    raise GenomeError(f"{we}: expected a mapping with 'model' and 'layer_range'")
                for key in entry:
                    if key not in ("model", "layer_range", "parameters"):
                        raise GenomeError(f"{we}.{key}: not a slice source field a recipe can express")
                this = _layer_range(entry, we)
                if rng is not None and this != rng:
                    raise GenomeError(f"{we}: layer_range {list(this)} differs from {list(rng)} of the slice's first "
                                      "model; a recipe merges layer l of every source into layer l")
                rng = this
                entries.append((_model_name(entry, we), _parameters(entry, we + ".", allowed, per_model_only=True), we))
            slices.append((w, rng, entries, _parameters(sl, w + ".", allowed)))
    else:
        if not isinstance(raw_models, list) or not raw_models:
            raise GenomeError(f"{where}: models: expected a non-empty list")
        entries = []
        for j, entry in enumerate(raw_models):
            we = f"{where}: models[{j}]"
            if not isinstance(entry, dict):
                raise GenomeError(f"{we}: expected a mapping with 'model'")
            for key in entry:
                if key not in ("model", "parameters"):
                    raise GenomeError(f"{we}.{key}: not a model entry field a recipe can express")
            entries.append((_model_name(entry, we), _parameters(entry, we + ".", allowed, per_model_only=True), we))
        if isinstance(base_model, str) and not any(_same_path(m, base_model) for m, _, _ in entries):
            entries.append((base_model, {}, f"{where}: base_model"))  # mergekit adds the base, without parameters
        slices.append((f"{where}: models", None, entries, {}))

    # sources and the base
    order = ([base_model] if isinstance(base_model, str) else []) + [m for _, _, es, _ in slices for m, _, _ in es]
    found: list[str] = []
    for m in order:
        if not any(_same_path(m, s) for s in found):
            found.append(m)
    if sources is None:
        src_list = found
    else:
        src_list = [str(s) for s in sources]
        for s in src_list:
            if not any(_same_path(s, m) for m in found):
                raise GenomeError(f"{where}: source {s} is not a model of the config ({', '.join(found)})")
        for m in found:
            if not any(_same_path(m, s) for s in src_list):
                raise GenomeError(f"{where}: model {m} is not one of the sources ({', '.join(src_list)})")

    def index(m: str) -> int:
        return next(k for k, s in enumerate(src_list) if _same_path(m, s))

    base = index(base_model) if isinstance(base_model, str) else None
    if spec.needs_base and base is None:
        raise GenomeError(f"{where}: base_model: merge_method {method} needs a base_model")
    every = set(range(len(src_list)))
    per_slice: list[dict[int, tuple[dict[str, Any], str]]] = []
    for w, _, entries, _ in slices:
        mine: dict[int, tuple[dict[str, Any], str]] = {}
        for m, p, we in entries:
            k = index(m)
            if k in mine:
                raise GenomeError(f"{we}: model {m} is listed twice in one slice (mergekit refuses duplicate inputs)")
            mine[k] = (p, we)
        if set(mine) != every:
            missing = src_list[min(every - set(mine))]
            what = "the base_model" if base is not None and index(missing) == base else f"model {missing}"
            raise GenomeError(f"{w}: {what} is not among its sources; a recipe merges the same models in every "
                              "layer group" + (" (and mergekit needs the base in every slice)" if spec.needs_base else ""))
        per_slice.append(mine)

    if _tokenizer_source(data, src_list, where) != 0:
        raise GenomeError(f"{where}: tokenizer_source {data.get('tokenizer_source')!r}: a recipe's merge keeps the "
                          f"vocabulary of its sources (the tokenizer of {src_list[0]})")

    # layers, from config.json only
    layer_counts, family, tied = [], None, False
    for s in src_list:
        cfg, fam = read_config(locate(s))
        layer_counts.append(int(cfg.num_hidden_layers))
        if family is None:
            family, tied = fam, bool(getattr(cfg, "tie_word_embeddings", False))
    if len(set(layer_counts)) != 1:
        raise GenomeError(f"{where}: a parameter-space merge needs sources of one depth, got layers {layer_counts}")
    layers = layer_counts[0]
    assert family is not None
    spans: list[tuple[int, int]] = []
    pos = 0
    for w, rng, _, _ in slices:
        start, end = rng if rng is not None else (0, layers)
        if end > layers:
            raise GenomeError(f"{w}: layer_range [{start}, {end}] ends past the models' {layers} layers")
        if start != pos or end == start:
            raise GenomeError(f"{w}: layer_range [{start}, {end}]: a recipe merges layer l of every source into "
                              f"layer l, so this slice must start at layer {pos} and hold at least one layer")
        spans.append((start, end))
        pos = end
    if pos != layers:
        raise GenomeError(f"{where}: the slices end at layer {pos}, not at the models' {layers} layers")

    # shared parameters: one value for the whole merge (mergekit's defaults are the recipe's)
    defaults = {"normalize": spec.normalize, "lambda": 1.0, "rescale": spec.rescale, "int8_mask": False}
    shared: dict[str, Any] = {}
    for name in ("normalize",) if method == "linear" else tuple(_SHARED):
        values = [_shared_value([(w + ".", sp), (top_at, top)], name) for w, _, _, sp in slices]
        values = [defaults[name] if v is None else v for v in values]
        if any(v != values[0] for v in values):
            k = next(k for k, v in enumerate(values) if v != values[0])
            raise GenomeError(f"{slices[k][0]}.parameters.{name}: {values[k]!r} differs from slice 0's "
                              f"{values[0]!r}; a recipe has one {name} for the whole merge")
        shared[name] = values[0]
    if method == "ties" and shared.get("rescale"):
        raise GenomeError(f"{where}: parameters.rescale: true rescales TIES's pruned deltas in mergekit; a recipe's "
                          "ties does not (use dare_ties, or rescale: false)")

    # per-model parameters: a value per layer, then the embeddings' and the head's
    merged = [k for k in range(len(src_list)) if method == "linear" or k != base]
    layer_names = [*family.layer_weights, *(n.replace(".weight", ".bias") for n in family.layer_weights if "_proj." in n)]
    pre_names = [n for n in family.non_layer_weights if "embed" in n]
    post_names = [n for n in family.non_layer_weights if "embed" not in n and not (tied and n.startswith("lm_head"))]
    names = ["weight", *(["density"] if spec.has_density else [])]
    rows: dict[str, list[list[float]]] = {n: [] for n in names}

    def value(k: int, slice_i: int, name: str, tensors: Sequence[str], t: float, what: str) -> float:
        p, we = per_slice[slice_i][k]
        scopes = [(we + ".", p), (slices[slice_i][0] + ".", slices[slice_i][3]), (top_at, top)]
        found_values = {tname: _resolved(scopes, name, tname, t) for tname in tensors}
        (first, v), *rest = found_values.items()
        other = next(((tname, x) for tname, x in rest if x != v), None)
        if other is not None:
            raise GenomeError(f"{we}.parameters.{name}: filters give {what} different values ({first}: {v}, "
                              f"{other[0]}: {other[1]}); a recipe has one {name} per source and layer group")
        if v is None:
            if name == "density":
                return 1.0
            raise GenomeError(f"{we}: no {name} for model {src_list[k]} on {what} (mergekit requires one)")
        return v

    for name in names:
        for k in merged:
            per_layer = []
            for i, (start, end) in enumerate(spans):
                n = end - start
                for j in range(n):
                    layer = start + j
                    per_layer.append(value(k, i, name, [f"{family.layers_attr}.{layer}.{x}" for x in layer_names],
                                           j / (n - 1) if n > 1 else 1.0, f"the tensors of layer {layer}"))
            pre = value(k, 0, name, pre_names, 0.0, "the embeddings")
            if pre != per_layer[0]:
                raise GenomeError(f"{per_slice[0][k][1]}.parameters.{name}: mergekit merges the embeddings of "
                                  f"{src_list[k]} with {name} {pre:g} but layer 0 with {per_layer[0]:g}; a recipe "
                                  "gives the embeddings layer group 0's values")
            if post_names:
                post = value(k, len(slices) - 1, name, post_names, 0.0, "the final norm and LM head")
                if post != per_layer[-1]:
                    raise GenomeError(
                        f"{per_slice[-1][k][1]}.parameters.{name}: mergekit merges the final norm and LM head of "
                        f"{src_list[k]} with {name} {post:g} (the last slice's value at its first layer, t = 0) but "
                        f"layer {layers - 1} with {per_layer[-1]:g}; a recipe gives them the last layer group's values")
            rows[name].append(per_layer)

    def fits(groups: int) -> bool:
        return all(len({row[x] for x in range(layers) if x * groups // layers == g}) == 1
                   for rs in rows.values() for row in rs for g in range(groups))

    preferred = len(slices) if raw_slices is not None else (1 if fits(1) else layers)
    groups = next(g for g in [preferred, *range(1, layers + 1)] if fits(g))
    firsts = [next(x for x in range(layers) if x * groups // layers == g) for g in range(groups)]
    weights = tuple(tuple(row[x] for x in firsts) for row in rows["weight"])
    densities = tuple(tuple(row[x] for x in firsts) for row in rows.get("density", []))
    try:
        return Recipe(tuple(src_list), layers, method, base, groups, weights, densities, normalize=shared["normalize"],
                      lam=shared.get("lambda", 1.0),
                      rescale=shared["rescale"] if spec.sparsify == "random" else None)
    except GenomeError as err:
        raise GenomeError(f"{where}: {err}") from None


_WHY_NOT = {
    "slerp": "it interpolates two models' weights along the sphere between them, which no route and none of the "
             "recipes' weighted sums reproduces",
    "nuslerp": "it interpolates models' weights along the sphere between them, which no route and none of the "
               "recipes' weighted sums reproduces",
}


def supported_message(method: Any) -> str:
    """The refusal of a merge method that neither a route nor a recipe can express (with why, where known)."""
    why = _WHY_NOT.get(method) if isinstance(method, str) else None
    return (f"merge_method is {method!r}, which is not supported{f' ({why})' if why else ''}; "
            f"supported: {', '.join(SUPPORTED)}")
