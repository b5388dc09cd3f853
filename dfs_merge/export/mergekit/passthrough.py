"""mergekit `passthrough` configs: a route written as one, and one read back into a genome.

`write_mergekit_config` writes the same model as a mergekit 0.1.5 `passthrough`
config (`mergekit-yaml cfg.yaml OUT` builds it); `import_mergekit` reads such a
config back into a genome, in three steps: parse the slices (`_parse_slices`), resolve
them against the sources' configs into hops (`_passthrough_sources`, `_hops`), and build
the route and its slot layout (`_route`, `_repeats`, `_build_genome`). A hybrid (a genome
with a parameter-space recipe file among its sources) is written as a `mergekit-multi`
config: each recipe's merge as a named document, then the passthrough route referring to
it by that name (`mergekit-multi cfg.yaml --intermediate-dir DIR --out-path OUT` builds it).
The configs of the other merge methods, out and in, are `recipe`'s; both functions here
take and give either kind.

mergekit semantics this module relies on (mergekit 0.1.5, `plan.py`, `config.py`,
`merge_methods/passthrough.py`):

- a slice's `parameters.scale` multiplies every tensor it resolves to (`common.resolve_setting`);
  no match leaves the tensor as is;
- the embeddings come from the first slice's model, the final norm and LM head
  from the last slice's model; a `layer_range` of `[0, 0]` contributes no layer,
  so an empty slice of the base pins them to the base;
- the output config is the `base_model`'s with `num_hidden_layers` replaced, and
  with `copy_tokenizer` (the default) the base's tokenizer and generation config
  files are copied verbatim.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

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
from dfs_merge.export.mergekit.recipe import (
    dare_note,
    import_recipe,
    recipe_config,
    supported_message,
    write_recipe_config,
)
from dfs_merge.export.tensors import running_products
from dfs_merge.genome import DTYPE_NAMES, ConstraintsConfig, Genome, Scaling
from dfs_merge.genome_files import load_recipe_source
from dfs_merge.inputs import MAX_DEPTH, nesting_depth, read_text, read_yaml
from dfs_merge.merging.hybrid import RECIPE_SOURCE
from dfs_merge.merging.methods import METHODS
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models import hub
from dfs_merge.models.adapters import split_source
from dfs_merge.models.families import Family
from dfs_merge.models.kinds import source_kind
from dfs_merge.models.sources import check_compatible, locate, read_config, ties_embeddings
from dfs_merge.route import Hop, Route

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from dfs_merge.export.formats import ExportOptions
    from dfs_merge.export.progress import Progress

__all__ = ["RouteSlice", "import_mergekit", "import_passthrough", "mergekit_slices", "precheck", "write",
           "write_mergekit_config"]

# --------------------------------------------------------------------------- the export format


def precheck(genome: Genome | Recipe, options: ExportOptions) -> None:
    """`dfs-merge export --format mergekit` checks nothing before writing: writing reads only config.json."""


def write(genome: Genome | Recipe, out: Path, options: ExportOptions, progress: Progress) -> Path:
    """`dfs-merge export --format mergekit`: `write_mergekit_config` (no weights are read, so no progress)."""
    return write_mergekit_config(genome, out, force=options.force, dtype=options.dtype)


# --------------------------------------------------------------------------- mergekit out


@dataclass(frozen=True)
class RouteSlice:
    """Consecutive hops of a route written as one mergekit slice: layers [start, end) of one source, one
    running product."""

    source: int
    start: int  # first layer
    end: int  # exclusive
    product: float  # running scale product of every hop in the slice


def mergekit_slices(route: Route) -> list[RouteSlice]:
    """Fewest slices for mergekit: runs of consecutive layers of one source with one running product."""
    out: list[RouteSlice] = []
    for h, p in zip(route, running_products(route), strict=True):
        last = out[-1] if out else None
        if last is not None and last.source == h.source and last.end == h.layer and last.product == p:
            out[-1] = RouteSlice(last.source, last.start, last.end + 1, p)
        else:
            out.append(RouteSlice(h.source, h.layer, h.layer + 1, p))
    return out


def _residual_writers(family: Family) -> tuple[str, ...] | None:
    """The tensors `family.fold_scale` divides by the factor (and leaves all else alone), or None.

    Probed on a fake layer state, so a family whose fold is not a plain division (Gemma's
    norm gains) is recognised as one mergekit's multiplicative scale cannot express.
    """
    writers = tuple(getattr(family, "residual_writers", ()) or ())
    if not writers:
        return None
    state = {n: torch.ones(2) for n in family.layer_weights}
    state.update({f"{w}.weight": torch.ones(2) for w in writers})
    family.fold_scale(state, 4.0)
    scaled = {n for n, v in state.items() if not torch.equal(v, torch.ones(2))}
    ok = scaled == {f"{w}.weight" for w in writers} and all(torch.equal(state[n], torch.full((2,), 0.25)) for n in scaled)
    return writers if ok else None


def write_mergekit_config(
    genome: Genome | Recipe, out: str | Path, *, force: bool = False, dtype: str | None = None
) -> Path:
    """Write a mergekit `passthrough` config that builds the same model as `export_checkpoint`.

    Slices group consecutive layers of one source with one running scale product; a slice
    whose product P is not 1 gets `scale: 1/P` on the family's residual writers (Llama:
    `o_proj`, `down_proj`), exactly the fold of `export_checkpoint`. Empty slices
    (`layer_range: [0, 0]`) are added first / last where needed so that the embeddings come
    from the genome's `embed_source` and the final norm and head from its `head_source`.
    `base_model` is the base: mergekit takes the output config from it and, with
    `copy_tokenizer` (its default), copies the base's tokenizer and generation config files
    verbatim. `tokenizer_source` is written only for a genome whose `tokenizer_source` is not
    the base (as that source's folder, mergekit 0.1.5's syntax): it rebuilds the vocabulary
    (the sources share one, so the embeddings stay as they are) and sets `vocab_size` to the
    tokenizer's length, which trims an embedding matrix padded beyond it. `dtype` is the
    argument if given, else the genome's `dtype` (or `out_dtype`), else the base's stored
    dtype; `out_dtype` and `chat_template` are the genome's. A route whose attention types
    differ from the base's `layer_types` (of the route's length) is an ExportError; families
    whose fold mergekit cannot express (Gemma 3) are one too.
    A `Recipe` (a parameter-space merge) is written by `recipe.write_recipe_config`.

    A hybrid, whose sources include recipe files, is written as a multi-document
    `mergekit-multi` config: one document per distinct recipe (`recipe_config`'s mapping plus
    `name: ps-<recipe key>`), then the unnamed passthrough document of the route, where each
    recipe source's model is that name (mergekit-multi replaces a model path equal to a
    document's name by `INTERMEDIATE_DIR/NAME`; the unnamed document is the one written to
    `--out-path`). A recipe source's config (layers, family, dtype) is its base's.
    """
    if isinstance(genome, Recipe):
        return write_recipe_config(genome, out, force=force, dtype=dtype)
    route = genome.check()
    recipes = {i: load_recipe_source(p) for i, p in enumerate(genome.sources) if source_kind(p) is RECIPE_SOURCE}
    out = check_config_output(out, [*genome.sources, *(s for r in recipes.values() for s in r.sources)], force=force)
    configs = [read_config(locate(p).resolve()) for p in genome.sources]  # a recipe source's: its base's
    # a recipe source is referred to by the name of its merge, built first (mergekit-multi)
    merges = _recipe_documents(recipes, dtype)
    names = {i: name for name, (_, _, idx) in merges.items() for i in idx}
    folders = [names[i] if i in names else model_reference(p) for i, p in enumerate(genome.sources)]
    for i, ((cfg, _), n) in enumerate(zip(configs, genome.layout.layers, strict=True)):
        if cfg.num_hidden_layers != n:
            raise SourceError(f"source {i} ({genome.sources[i]}) has {cfg.num_hidden_layers} layers, the genome says {n}")
    base_cfg, family = configs[0]
    if any(h.scale != 1.0 for h in route) and _residual_writers(family) is None:
        raise ExportError(
            f"mergekit output is not supported for the {family.name} family with hop scales other than 1: "
            "its scales fold into norm gains, which mergekit's multiplicative scale cannot express"
        )
    note = _layer_types_note(route, configs, family)
    if any(hub.is_hub_name(split_source(p)[0]) and not Path(split_source(p)[0]).exists() for p in genome.sources):
        note += ("# Hub names are written as their folders in the local Hugging Face cache: mergekit asks the Hub "
                 "for a name even when it is cached\n")
    data = _passthrough_document(genome, route, folders, _residual_writers(family) or (), dtype, base_cfg)
    if not merges:
        header = (
            f"# mergekit passthrough config written by dfs-merge {dfs_merge.__version__}\n"
            f"# route ({len(route)} hops): {route.text()}\n"
            f"# genome key {genome.key()}; sources: {', '.join(genome.sources)}\n"
            f"{note}# build: mergekit-yaml {out.name} OUTPUT_DIR  (the "
            f"{'base' if not genome.tokenizer_source else f'source {genome.tokenizer_source}'}'s tokenizer)\n"
        )
        write_atomic(out, header + dump_config(data))
        return out
    docs = [dump_config({"name": name, **cfg}) for name, (_, cfg, _) in merges.items()]
    write_atomic(out, _multi_header(genome, route, merges, note, out.name) + "---\n".join([*docs, dump_config(data)]))
    return out


def _multi_header(genome: Genome, route: Route, merges: dict[str, tuple[Recipe, dict[str, Any], list[int]]],
                  note: str, file_name: str) -> str:
    """The comment lines above a hybrid's mergekit-multi config: the route, each merge it builds first (and the
    sources it stands for), the notes, and how to build it."""
    n = len(merges)
    header = (
        f"# mergekit-multi config written by dfs-merge {dfs_merge.__version__}: a hybrid, {n} parameter-space "
        f"merge{'s' if n != 1 else ''} then the passthrough route over {'them' if n != 1 else 'it'}\n"
        f"# route ({len(route)} hops): {route.text()}\n"
        f"# genome key {genome.key()}; sources: {', '.join(genome.sources)}\n"
    )
    notes = ""
    for name, (r, _, idx) in merges.items():
        which = ", ".join(f"source {i} ({genome.sources[i]})" for i in idx)
        header += (f"# {which}: the {r.method} merge named {name} ({r.layer_groups} layer group"
                   f"{'s' if r.layer_groups != 1 else ''}): {r.text()}; recipe key {r.key()}; "
                   f"its sources: {', '.join(r.sources)}\n")
        notes += dare_note(r)
    return header + notes + note + (
        f"# build: mergekit-multi {file_name} --intermediate-dir DIR --out-path OUTPUT_DIR\n"
        "#   each named document is merged first into DIR/NAME (kept and reused while it exists, unless --no-lazy);\n"
        "#   the last, unnamed document is the route, written to OUTPUT_DIR (the base's tokenizer is copied).\n"
        "#   Not a mergekit-yaml config (several documents).\n"
    )


def _passthrough_document(genome: Genome, route: Route, folders: Sequence[str], writers: Sequence[str],
                          dtype: str | None, base_config: Any) -> dict[str, Any]:
    """The passthrough config (a mapping) of `route` over the sources named `folders`: its slices (empty ones
    first / last to pin the embeddings and the head), each scaled by 1/P on the residual `writers`, and the
    genome's settings."""
    slices = mergekit_slices(route)
    entries: list[dict[str, Any]] = []
    if slices[0].source != genome.embed_source:
        entries.append({"sources": [{"model": str(folders[genome.embed_source]), "layer_range": [0, 0]}]})
    for s in slices:
        src: dict[str, Any] = {"model": str(folders[s.source]), "layer_range": [s.start, s.end]}
        if s.product != 1.0:
            value = 1.0 / s.product
            src["parameters"] = {
                "scale": [{"filter": w, "value": value} for w in writers] + [{"value": 1.0}]
            }
        entries.append({"sources": [src]})
    if slices[-1].source != genome.head_source:
        entries.append({"sources": [{"model": str(folders[genome.head_source]), "layer_range": [0, 0]}]})
    data: dict[str, Any] = {
        "merge_method": "passthrough",
        "base_model": str(folders[0]),
        "dtype": dtype or genome.dtype or genome.out_dtype or merge_dtype(base_config),
    }
    if dtype is None and genome.out_dtype and genome.out_dtype != data["dtype"]:
        data["out_dtype"] = genome.out_dtype
    if genome.tokenizer_source:
        data["tokenizer_source"] = str(folders[genome.tokenizer_source])
    if genome.chat_template is not None:
        data["chat_template"] = genome.chat_template
    data["slices"] = entries
    return data


def _layer_types_note(route: Route, configs: Sequence[tuple[PretrainedConfig, Family]], family: Family) -> str:
    """Refuse a route whose attention types are not the base's `layer_types` (all the same type, for a route of
    another depth), as mergekit keeps them; a header note when the depth changes, which mergekit 0.1.5 cannot
    save under transformers 5 (it keeps the base's list beside the new `num_hidden_layers`)."""
    base_types = getattr(configs[0][0], "layer_types", None)
    if base_types is None:
        return ""
    types = [family.layer_type(configs[h.source][0], h.layer) for h in route]
    if len(base_types) == len(types):
        want = list(base_types)
    elif len(set(base_types)) == 1:
        want = [base_types[0]] * len(types)
    else:
        raise ExportError(f"mergekit output is not supported for this {family.name} route: the base's layer_types mix "
                          f"attention types, which mergekit cannot lay out for {len(types)} layers")
    k = next((k for k, (a, b) in enumerate(zip(want, types, strict=True)) if a != b), None)
    if k is not None:
        raise ExportError(f"mergekit output is not supported for this {family.name} route: mergekit keeps the base's "
                          f"layer_types, and hop {k} is {types[k]} where the base's layer {k} is {want[k]}")
    if len(base_types) == len(types):
        return ""
    return (f"# note: mergekit 0.1.5 keeps the base's layer_types ({len(base_types)} entries) beside num_hidden_layers "
            f"{len(types)}; transformers 5 refuses to save that config after the weights are written. The config of "
            f"this model is the base's with layer_types: [{types[0]}] x {len(types)} (as `dfs-merge export` writes)\n")


def _recipe_documents(
    recipes: dict[int, Recipe], dtype: str | None
) -> dict[str, tuple[Recipe, dict[str, Any], list[int]]]:
    """The merges a hybrid needs, by the name mergekit-multi builds each under: its recipe key (`ps-...`),
    with `-s<source index>` added where another merge has that key (a key does not name the sources).

    Recipe sources whose mergekit configs are equal share one merge.
    Returns name -> (recipe, its mergekit config, the genome's source indices it stands for).
    """
    out: dict[str, tuple[Recipe, dict[str, Any], list[int]]] = {}
    for i, r in recipes.items():
        cfg = recipe_config(r, dtype=dtype)
        same = next((name for name, (_, c, _) in out.items() if c == cfg), None)
        if same is not None:
            out[same][2].append(i)
            continue
        out[r.key() if r.key() not in out else f"{r.key()}-s{i}"] = (r, cfg, [i])
    return out


# --------------------------------------------------------------------------- mergekit in


def import_mergekit(
    config_path: str | Path,
    *,
    repeats: int | None = None,
    scaling: Scaling = "slot",
    sources: Sequence[str] | None = None,
) -> Genome | Recipe:
    """Turn a mergekit `passthrough` config into a genome (`import_passthrough`); a `linear`, `task_arithmetic`,
    `ties`, `dare_linear` or `dare_ties` config into a recipe (`recipe.import_recipe`).

    A `linear` config in which every slice has exactly one model of nonzero weight (the
    dummy-model trick of miquliz and TheProfessor) is the passthrough it builds. Any other
    method, and a multi-document file (a `mergekit-multi` config), is a GenomeError.
    """
    path = Path(config_path)
    data, where = _read_document(path), str(path)
    method = data.get("merge_method")
    if method == "linear":
        passthrough = _linear_as_passthrough(data)
        if passthrough is not None:
            data, method = passthrough, "passthrough"
    if method == "passthrough":
        return import_passthrough(data, where, repeats=repeats, scaling=scaling, sources=sources)
    if isinstance(method, str) and method in METHODS:
        return import_recipe(data, where, sources=sources)
    raise GenomeError(f"{where}: {supported_message(method)}")


@dataclass(frozen=True)
class _PassthroughSlice:
    """One slice of a passthrough config as parsed: its model, its layers [start, end), its scale setting."""

    model: str
    start: int
    end: int
    scale: Any  # the source entry's, else the slice's, else the config's `parameters.scale`

    def label(self) -> str:
        return f"{self.model} [{self.start}, {self.end}]"


@dataclass(frozen=True)
class _LayerHop:
    """One layer a slice takes: its source and layer, the running product P at it, the slice it is from."""

    source: int
    layer: int
    product: float
    slice: int


def import_passthrough(
    data: dict[str, Any],
    where: str,
    *,
    repeats: int | None = None,
    scaling: Scaling = "slot",
    sources: Sequence[str] | None = None,
) -> Genome:
    """Turn a passthrough config (a mapping, read from `where`) into a genome.

    Sources are `sources` if given, else `base_model` (when set) and then the slices'
    models in order of first appearance; a model may be a folder or a Hub name in the
    local cache (`models.hub`). Layer counts come from each source's config.json (no
    weights are loaded). Hop scales are recovered from the slices' `scale` on the
    residual writers (the inverse running product); any other tensor that mergekit
    scales is refused (a slice's layers; the embeddings for the first slice and the final
    norm and head for the last, at t = 0). The embeddings come from the first slice's
    model (`embed_source`), the final norm and head from the last slice's (`head_source`),
    as in mergekit. `tokenizer_source` (`base`, `model:NAME` or a model's path),
    `dtype`, `out_dtype` (default: `dtype`, what mergekit writes) and `chat_template`
    are carried. `repeats` defaults to the smallest that expresses the route; a route the
    layout cannot express is a GenomeError naming the slice. `pin_ends` is kept when the
    route starts and ends with the base's first and last layer.
    """
    slices = _parse_slices(data, where)
    src_list, index_of = _passthrough_sources(slices, base_model(data, where), sources, where)
    settings = {
        "tokenizer_source": tokenizer_source(data, src_list, where),
        "dtype": _dtype_setting(data, "dtype", where),
        "out_dtype": _dtype_setting(data, "out_dtype", where),
        "chat_template": data.get("chat_template"),
    }
    settings["out_dtype"] = settings["out_dtype"] or settings["dtype"]  # what mergekit writes the checkpoint in
    configs = [read_config(locate(s)) for s in src_list]  # layer counts, from config.json only
    try:
        check_compatible(configs)  # slices of models that share no hidden space build nothing that runs
    except SourceError as err:
        raise GenomeError(f"{where}: {err}") from None
    layers = [int(cfg.num_hidden_layers) for cfg, _ in configs]
    hops = _hops(slices, index_of, configs, where)
    route = _route(hops, index_of, scaling, where)
    r = _repeats(hops, slices, layers, repeats, where)
    pin = route[0].source == 0 and route[0].layer == 0 and route[-1].source == 0 and route[-1].layer == layers[0] - 1
    try:
        genome = replace(Genome.from_route(route, src_list, layers, r, scaling, ConstraintsConfig(pin_ends=pin)),
                         **settings)
        genome.check()
    except GenomeError as err:
        raise GenomeError(f"{where}: {err}") from None
    return genome


# ---- parse


def _read_document(path: Path) -> dict[str, Any]:
    """The one YAML document of a config file; a mergekit-multi config (several documents) is refused."""
    try:
        return read_yaml(path, GenomeError)
    except GenomeError:
        docs = _document_count(path)
        if docs > 1:
            raise GenomeError(
                f"{path}: {docs} YAML documents, a mergekit-multi config (a hybrid's export?); only a single "
                "mergekit config (one document) can be imported"
            ) from None
        raise


_DOCUMENT_MARK = re.compile(r"^---(?:[ \t\r]|$)", re.M)
"""A YAML document start marker: a file without one holds one document at most."""


def _document_count(path: Path) -> int:
    """How many YAML documents a file holds, from the parser's events (nothing is built, no alias
    expanded); 0 when it cannot be read or parsed that far. Asked only after `read_yaml` refused the file, so
    a file that cannot be several documents is not parsed again: one without a `---` line, or one nested
    deeper than `read_yaml` reads (PyYAML's parser takes minutes over 100 kB of brackets)."""
    try:
        text = read_text(path, GenomeError)  # a pipe or device is refused here too, never opened
    except GenomeError:
        return 0
    if not _DOCUMENT_MARK.search(text) or nesting_depth(text) > MAX_DEPTH:
        return 0
    n = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            n += isinstance(event, yaml.DocumentStartEvent)
    except (yaml.YAMLError, RecursionError):
        pass
    return n


def _linear_as_passthrough(data: dict[str, Any]) -> dict[str, Any] | None:
    """The passthrough config a `linear` config builds when every slice has exactly one model of nonzero weight
    (each tensor is then that model's: w x / w with mergekit's default `normalize`, or w = 1): the dummy-model
    trick of frankenmerges such as miquliz and TheProfessor. None for any other linear config (a real linear
    merge, or one with per-tensor or gradient weights), which `import_recipe` reads or refuses."""
    raw, top = data.get("slices"), data.get("parameters") or {}
    if not isinstance(raw, list) or not raw or not isinstance(top, dict) or set(top) - {"weight", "normalize"}:
        return None
    slices = []
    for sl in raw:
        if not isinstance(sl, dict) or set(sl) - {"sources", "parameters"} or not isinstance(sl.get("sources"), list):
            return None
        own = sl.get("parameters") or {}
        if not isinstance(own, dict) or set(own) - {"weight", "normalize"}:
            return None
        normalize = own.get("normalize", top.get("normalize", True))
        kept = []
        for entry in sl["sources"]:
            params = (entry.get("parameters") or {}) if isinstance(entry, dict) else None
            if not isinstance(params, dict) or set(params) - {"weight"}:
                return None
            weight = next((scope["weight"] for scope in (params, own, top) if scope.get("weight") is not None), None)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                return None
            if weight != 0:
                kept.append((entry, weight))
        if len(kept) != 1 or (kept[0][1] != 1 and normalize is not True):
            return None
        slices.append({"sources": [{k: v for k, v in kept[0][0].items() if k != "parameters"}]})
    rest = {k: v for k, v in data.items() if k not in ("merge_method", "parameters", "slices")}
    return {"merge_method": "passthrough", **rest, "slices": slices}


def _parse_slices(data: dict[str, Any], where: str) -> list[_PassthroughSlice]:
    """The slices of a passthrough config: one model each, its layer range and its scale setting."""
    raw = data.get("slices")
    if not isinstance(raw, list) or not raw:
        raise GenomeError(f"{where}: a passthrough config needs a 'slices' list (models/modules forms are not routes)")
    top_scale = (data.get("parameters") or {}).get("scale")
    slices = []
    for i, sl in enumerate(raw):
        w = f"{where}: slice {i}"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or len(sl["sources"]) != 1:
            raise GenomeError(f"{w}: a passthrough slice needs exactly one entry under 'sources'")
        entry = sl["sources"][0]
        model = model_name(entry, w)
        start, end = layer_range(entry, w)
        setting = (entry.get("parameters") or {}).get("scale")
        if setting is None:
            setting = (sl.get("parameters") or {}).get("scale")
        if setting is None:
            setting = top_scale
        slices.append(_PassthroughSlice(model, start, end, setting))
    return slices


def _dtype_setting(data: dict[str, Any], key: str, where: str) -> str | None:
    """A config's `dtype` / `out_dtype` as a genome names it (`torch.` dropped, as mergekit does); None if unset."""
    value = data.get(key)
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in DTYPE_NAMES:
        raise GenomeError(f"{where}: {key} {value!r}: a genome's {key} is one of {', '.join(DTYPE_NAMES)}")
    return name


# ---- resolve


def _passthrough_sources(
    slices: Sequence[_PassthroughSlice], base: Any, sources: Sequence[str] | None, where: str
) -> tuple[list[str], list[int]]:
    """The genome's sources (`sources`, else the base then the slices' models) and each slice's source index."""
    if sources is None:
        src_list = distinct_models(([base] if isinstance(base, str) else []) + [s.model for s in slices])
    else:
        src_list = [str(s) for s in sources]
        if not src_list:
            raise GenomeError(f"{where}: sources is empty")
    index_of: list[int] = []
    for i, sl in enumerate(slices):
        k = next((j for j, s in enumerate(src_list) if same_path(sl.model, s)), None)
        if k is None:
            raise GenomeError(f"{where}: slice {i}: model {sl.model} is not one of the sources ({', '.join(src_list)})")
        index_of.append(k)
    return src_list, index_of


def _hops(slices: Sequence[_PassthroughSlice], index_of: Sequence[int], configs: Sequence[tuple[PretrainedConfig, Family]],
          where: str) -> list[_LayerHop]:
    """Every layer the slices take, in order, with the running product their scales give it; the slices'
    ends must leave the embeddings, final norm and head unscaled, and take norm and head from one source."""
    layers = [int(cfg.num_hidden_layers) for cfg, _ in configs]
    family = configs[0][1]
    writers = _residual_writers(family)
    pre = tuple(n for n in family.non_layer_weights if "embed" in n)
    post = tuple(n for n in family.non_layer_weights if "embed" not in n)
    hops: list[_LayerHop] = []
    for i, (sl, src) in enumerate(zip(slices, index_of, strict=True)):
        w = f"{where}: slice {i} ({sl.label()})"
        if sl.end > layers[src]:
            raise GenomeError(f"{w}: layer_range ends past the model's {layers[src]} layers")
        n = sl.end - sl.start
        ends = (pre if i == 0 else ()) + (post if i == len(slices) - 1 else ())
        _unscaled(sl.scale, ends, w)  # mergekit scales them with this slice's setting at t = 0
        for j in range(n):
            t = j / (n - 1) if n > 1 else 1.0
            product = _slice_product(sl.scale, family, writers, len(hops), t, w)
            hops.append(_LayerHop(src, sl.start + j, product, i))
    if not hops:
        raise GenomeError(f"{where}: the slices contain no layer")
    embed, head = index_of[0], index_of[-1]
    if embed != head and any(ties_embeddings(configs[k][0]) for k in (embed, head)):
        raise GenomeError(
            f"{where}: slice {len(slices) - 1}: mergekit takes the final norm from its model ({slices[-1].model}) but, "
            f"the models tying the LM head to the embeddings, the head from the first slice's ({slices[0].model}); a "
            "genome takes norm and head from one source"
        )
    return hops


def _unscaled(setting: Any, names: Sequence[str], where: str) -> None:
    """Refuse a slice's scale on the embeddings or the final norm and head (`names`), which mergekit applies
    at t = 0 to the first and the last slice's; a hop scale cannot express it."""
    if setting is None:
        return
    for name in names:
        try:
            value = resolve_setting(setting, name, 0.0)
        except ValueError as err:
            raise GenomeError(f"{where}: scale: {err}") from None
        if value is not None and value != 1.0:
            raise GenomeError(f"{where}: scale {value:g} on {name} cannot be read as a hop scale "
                              "(mergekit scales it with this slice's setting; only the residual writers may be scaled)")


def _slice_product(
    setting: Any, family: Family, writers: tuple[str, ...] | None, hop: int, t: float, where: str
) -> float:
    """The running product P of output layer `hop`: its residual writers are scaled by 1/P, all else by 1.

    Every weight of the layer the family names (`layer_weights`) is probed against the setting.
    """
    if setting is None:
        return 1.0
    mine = {f"{w}.weight" for w in writers or ()}
    layer = f"{family.layers_attr}.{hop}"
    names = [f"{layer}.{n}" for n in family.layer_weights if n not in mine]
    try:
        probe = {n: resolve_setting(setting, n, t) for n in names}
        values = [resolve_setting(setting, f"{layer}.{w}.weight", t) for w in writers or ()]
    except ValueError as err:
        raise GenomeError(f"{where}: scale: {err}") from None
    others = {n: v for n, v in probe.items() if v is not None and v != 1.0}
    if others:
        name = next(iter(others))
        raise GenomeError(
            f"{where}: scale {others[name]:g} on {name} cannot be read as a hop scale "
            "(only the residual writers may be scaled)"
        )
    vals = {1.0 if v is None else v for v in values}
    if not vals:
        return 1.0
    if len(vals) > 1:
        raise GenomeError(f"{where}: the residual writers ({', '.join(writers or ())}) have different scales {sorted(vals)}")
    v = vals.pop()
    if v == 0:
        raise GenomeError(
            f"{where}: scale 0 on the residual writers ({', '.join(writers or ())}) makes output layer {hop} an "
            "identity block (LLaMA Pro's block expansion, new layers to train); a hop scale cannot be 1/0 (the model "
            "computes what the route without this slice computes)"
        )
    if not (math.isfinite(v) and v > 0):
        raise GenomeError(f"{where}: scale {v} on the residual writers is not a positive number")
    return 1.0 / v


# ---- build


def _route(hops: Sequence[_LayerHop], index_of: Sequence[int], scaling: Scaling, where: str) -> Route:
    """The route of the hops: each hop's scale is its running product over the previous hop's (12 digits)."""
    scales, prev = [], 1.0
    for h in hops:
        scales.append(float(f"{h.product / prev:.12g}"))
        prev = h.product
    if scaling == "none" and any(s != 1.0 for s in scales):
        raise GenomeError(f"{where}: the config scales hops but scaling is 'none'")
    return Route(tuple(Hop(h.source, h.layer, s) for h, s in zip(hops, scales, strict=True)), index_of[0], index_of[-1])


def _repeats(hops: Sequence[_LayerHop], slices: Sequence[_PassthroughSlice], layers: Sequence[int],
             repeats: int | None, where: str) -> int:
    """The slot layout's repeats: `repeats`, else the fewest in which every hop takes the next free slot; a
    hop that does not fit is refused, naming its slice."""
    offsets = [sum(layers[:i]) for i in range(len(layers))]
    reps = [0]  # the repetition each hop lands in when every hop takes the next free slot
    for k in range(1, len(hops)):
        here = offsets[hops[k].source] + hops[k].layer
        before = offsets[hops[k - 1].source] + hops[k - 1].layer
        reps.append(reps[-1] + (here <= before))
    need = reps[-1] + 1
    r = repeats if repeats is not None else need
    if r < 1:
        raise GenomeError(f"{where}: repeats must be at least 1, got {r}")
    if need > r:
        k = next(k for k, x in enumerate(reps) if x >= r)
        h = hops[k]
        raise GenomeError(
            f"{where}: slice {h.slice} ({slices[h.slice].label()}): hop {k} ({h.source}:{h.layer}) "
            f"does not fit in repeats={r}; the route needs repeats >= {need}"
        )
    return r
