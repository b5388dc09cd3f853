"""mergekit `passthrough` configs: a route written as one, and one read back into a genome.

`write_mergekit_config` writes the same model as a mergekit 0.1.5 `passthrough`
config (`mergekit-yaml cfg.yaml OUT` builds it); `import_mergekit` reads such a
config back into a genome. A hybrid (a genome with a parameter-space recipe file among
its sources) is written as a `mergekit-multi` config: each recipe's merge as a named
document, then the passthrough route referring to it by that name
(`mergekit-multi cfg.yaml --intermediate-dir DIR --out-path OUT` builds it).

mergekit semantics this module relies on (mergekit 0.1.5, `plan.py`, `config.py`,
`merge_methods/passthrough.py`):

- a slice's `parameters.scale` multiplies every tensor it resolves to; a list of
  `{filter, value}` resolves per tensor to the first entry whose `filter` is a
  substring of the output tensor name (no filter, or `*`, matches all); no match
  leaves the tensor as is;
- the embeddings come from the first slice's model, the final norm and LM head
  from the last slice's model; a `layer_range` of `[0, 0]` contributes no layer,
  so an empty slice of the base pins them to the base;
- the output config is the `base_model`'s with `num_hidden_layers` replaced, and
  with `copy_tokenizer` (the default) the base's tokenizer and generation config
  files are copied verbatim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

import dfs_merge
from dfs_merge.atomic import write_atomic
from dfs_merge.config import ConstraintsConfig
from dfs_merge.errors import ExportError, GenomeError, SourceError
from dfs_merge.export.tensors import running_products
from dfs_merge.genome import DTYPE_NAMES, Genome, Hop, Route, Scaling
from dfs_merge.inputs import NoAliasDumper, read_yaml
from dfs_merge.models import hub
from dfs_merge.models.adapters import split_source
from dfs_merge.models.families import Family
from dfs_merge.models.sources import locate, read_config, ties_embeddings
from dfs_merge.outputs import check_output

if TYPE_CHECKING:
    from dfs_merge.merging.recipe import Recipe

# --------------------------------------------------------------------------- mergekit out


@dataclass(frozen=True)
class _Slice:
    source: int
    start: int  # first layer
    end: int  # exclusive
    product: float  # running scale product of every hop in the slice


def mergekit_slices(route: Route) -> list[_Slice]:
    """Fewest slices for mergekit: runs of consecutive layers of one source with one running product."""
    out: list[_Slice] = []
    for h, p in zip(route, running_products(route), strict=True):
        last = out[-1] if out else None
        if last is not None and last.source == h.source and last.end == h.layer and last.product == p:
            out[-1] = _Slice(last.source, last.start, last.end + 1, p)
        else:
            out.append(_Slice(h.source, h.layer, h.layer + 1, p))
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


def _dtype_name(config: Any) -> str:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(d).replace("torch.", "") if d is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


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
    A `Recipe` (a parameter-space merge) is written by `mergekit_recipe.write_recipe_config`.

    A hybrid, whose sources include recipe files, is written as a multi-document
    `mergekit-multi` config: one document per distinct recipe (`recipe_config`'s mapping plus
    `name: ps-<recipe key>`), then the unnamed passthrough document of the route, where each
    recipe source's model is that name (mergekit-multi replaces a model path equal to a
    document's name by `INTERMEDIATE_DIR/NAME`; the unnamed document is the one written to
    `--out-path`). A recipe source's config (layers, family, dtype) is its base's.
    """
    from dfs_merge.merging.recipe import Recipe, is_recipe_file, load_recipe_source

    if isinstance(genome, Recipe):
        from dfs_merge.export.mergekit_recipe import write_recipe_config

        return write_recipe_config(genome, out, force=force, dtype=dtype)
    route = genome.check()
    recipes = {i: load_recipe_source(p) for i, p in enumerate(genome.sources) if is_recipe_file(p)}
    inputs = [*genome.sources, *(s for r in recipes.values() for s in r.sources)]
    out = check_output(out, kind="file", force=force, inputs=inputs, error=ExportError, what=None,
                       force_hint="force=True (--force)")
    configs = [read_config(_config_folder(p, recipes.get(i))) for i, p in enumerate(genome.sources)]
    # a recipe source is referred to by the name of its merge, built first (mergekit-multi)
    merges = _recipe_documents(recipes, dtype)
    names = {i: name for name, (_, _, idx) in merges.items() for i in idx}
    folders = [names[i] if i in names else _model_reference(p) for i, p in enumerate(genome.sources)]
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
    writers = _residual_writers(family) or ()
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
        "dtype": dtype or genome.dtype or genome.out_dtype or _dtype_name(base_cfg),
    }
    if dtype is None and genome.out_dtype and genome.out_dtype != data["dtype"]:
        data["out_dtype"] = genome.out_dtype
    if genome.tokenizer_source:
        data["tokenizer_source"] = str(folders[genome.tokenizer_source])
    if genome.chat_template is not None:
        data["chat_template"] = genome.chat_template
    data["slices"] = entries

    def dump(d: dict[str, Any]) -> str:
        return yaml.dump(d, Dumper=NoAliasDumper, sort_keys=False, default_flow_style=None, width=200)

    if not merges:
        header = (
            f"# mergekit passthrough config written by dfs-merge {dfs_merge.__version__}\n"
            f"# route ({len(route)} hops): {route.text()}\n"
            f"# genome key {genome.key()}; sources: {', '.join(genome.sources)}\n"
            f"{note}# build: mergekit-yaml {out.name} OUTPUT_DIR  (the "
            f"{'base' if not genome.tokenizer_source else f'source {genome.tokenizer_source}'}'s tokenizer)\n"
        )
        write_atomic(out, header + dump(data))
        return out
    from dfs_merge.export.mergekit_recipe import dare_note

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
    header += notes + note
    header += (
        f"# build: mergekit-multi {out.name} --intermediate-dir DIR --out-path OUTPUT_DIR\n"
        "#   each named document is merged first into DIR/NAME (kept and reused while it exists, unless --no-lazy);\n"
        "#   the last, unnamed document is the route, written to OUTPUT_DIR (the base's tokenizer is copied).\n"
        "#   Not a mergekit-yaml config (several documents).\n"
    )
    docs = [dump({"name": name, **cfg}) for name, (_, cfg, _) in merges.items()]
    write_atomic(out, header + "---\n".join([*docs, dump(data)]))
    return out


def _layer_types_note(route: Route, configs: Sequence[tuple[Any, Family]], family: Family) -> str:
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


def _config_folder(source: str, recipe: Recipe | None) -> Path:
    """The folder whose config.json describes a source: for a recipe file (a hybrid's source), its base's."""
    if recipe is None:
        return locate(source).resolve()
    return locate(recipe.sources[recipe.base if recipe.base is not None else 0]).resolve()


def _recipe_documents(
    recipes: dict[int, Recipe], dtype: str | None
) -> dict[str, tuple[Recipe, dict[str, Any], list[int]]]:
    """The merges a hybrid needs, by the name mergekit-multi builds each under: its recipe key (`ps-...`),
    with `-s<source index>` added where another merge has that key (a key does not name the sources).

    Recipe sources whose mergekit configs are equal share one merge.
    Returns name -> (recipe, its mergekit config, the genome's source indices it stands for).
    """
    from dfs_merge.export.mergekit_recipe import recipe_config

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


def _resolve_setting(setting: Any, tensor: str, t: float) -> float | None:
    """mergekit's `evaluate_setting` for a numeric parameter: filters, then gradients over `t`."""
    if setting is None:
        return None
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, bool) or isinstance(setting, str):
        raise ValueError(f"not a number: {setting!r}")
    if isinstance(setting, (int, float)):
        return float(setting)
    if not isinstance(setting, list):
        raise ValueError(f"unexpected value {setting!r}")
    if not setting:
        return None
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(setting[i0]) + frac * float(setting[i1])
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond:
            raise ValueError(f"expected {{filter, value}} entries, got {cond!r}")
        filt = cond.get("filter")
        if filt is None or filt == "*" or (tensor and str(filt) in tensor):
            return _resolve_setting(cond["value"], tensor, t)
    return None


def _model_reference(source: str) -> str:
    """How mergekit names a source: its local folder, with `+ADAPTER` (mergekit's LoRA syntax) for an adapter."""
    base, adapter = split_source(source)
    folder = str(locate(base).resolve())
    return f"{folder}+{adapter.resolve()}" if adapter is not None else folder


def _model_name(entry: Any, where: str) -> str:
    """A slice's model as a source: a path or name, `BASE+LORA` kept as it is (a LoRA adapter source)."""
    model = entry.get("model") if isinstance(entry, dict) else None
    if isinstance(model, dict):  # mergekit's long form {model: {path: ...}, lora: {path: ...}}
        inner, lora = model.get("model"), model.get("lora")
        model = inner.get("path") if isinstance(inner, dict) else None
        if isinstance(model, str) and model and lora:
            lora_path = lora.get("path") if isinstance(lora, dict) else None
            if not isinstance(lora_path, str) or not lora_path:
                raise GenomeError(f"{where}: its lora needs a 'path'")
            model = f"{model}+{lora_path}"
    if not isinstance(model, str) or not model:
        raise GenomeError(f"{where}: needs a 'model' path")
    return model


def _same_path(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def import_mergekit(
    config_path: str | Path,
    *,
    repeats: int | None = None,
    scaling: Scaling = "slot",
    sources: Sequence[str] | None = None,
) -> Genome | Recipe:
    """Turn a mergekit `passthrough` config into a genome (a `linear`, `task_arithmetic`, `ties`,
    `dare_linear` or `dare_ties` config into a recipe: `mergekit_recipe.import_recipe`).

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
    are carried. A `linear` config in which every slice has exactly one model of nonzero
    weight (the dummy-model trick of miquliz and TheProfessor) is the passthrough it
    builds. `repeats` defaults to the smallest that expresses the route; a route the
    layout cannot express is a GenomeError naming the slice. `pin_ends` is kept when the
    route starts and ends with the base's first and last layer.
    """
    path = Path(config_path)
    try:
        data = read_yaml(path, GenomeError)
    except GenomeError:
        docs = _document_count(path)
        if docs > 1:
            raise GenomeError(
                f"{path}: {docs} YAML documents, a mergekit-multi config (a hybrid's export?); only a single "
                "mergekit config (one document) can be imported"
            ) from None
        raise
    where = str(path)
    method = data.get("merge_method")
    if method == "linear":
        passthrough = _linear_as_passthrough(data)
        if passthrough is not None:
            data, method = passthrough, "passthrough"
    if method != "passthrough":
        from dfs_merge.export.mergekit_recipe import import_recipe, supported_message
        from dfs_merge.merging.methods import METHODS

        if isinstance(method, str) and method in METHODS:
            return import_recipe(data, where, sources=sources)
        raise GenomeError(f"{where}: {supported_message(method)}")
    raw = data.get("slices")
    if not isinstance(raw, list) or not raw:
        raise GenomeError(f"{where}: a passthrough config needs a 'slices' list (models/modules forms are not routes)")
    top_params = (data.get("parameters") or {}).get("scale")

    # sources
    named: list[tuple[str, list[int], Any]] = []  # (model, [start, end), scale setting) per slice
    for i, sl in enumerate(raw):
        w = f"{where}: slice {i}"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or len(sl["sources"]) != 1:
            raise GenomeError(f"{w}: a passthrough slice needs exactly one entry under 'sources'")
        entry = sl["sources"][0]
        model = _model_name(entry, w)
        rng = entry.get("layer_range")
        if (
            not isinstance(rng, (list, tuple)) or len(rng) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng) or not 0 <= rng[0] <= rng[1]
        ):
            raise GenomeError(f"{w}: layer_range must be [start, end] with 0 <= start <= end, got {rng!r}")
        setting = (entry.get("parameters") or {}).get("scale")
        if setting is None:
            setting = (sl.get("parameters") or {}).get("scale")
        if setting is None:
            setting = top_params
        named.append((model, [int(rng[0]), int(rng[1])], setting))
    base_model = data.get("base_model")
    if isinstance(base_model, dict):
        base_model = _model_name({"model": base_model}, f"{where}: base_model")
    if sources is None:
        order = ([base_model] if isinstance(base_model, str) else []) + [m for m, _, _ in named]
        src_list: list[str] = []
        for m in order:
            if not any(_same_path(m, s) for s in src_list):
                src_list.append(m)
    else:
        src_list = [str(s) for s in sources]
        if not src_list:
            raise GenomeError(f"{where}: sources is empty")
    index_of: list[int] = []
    for i, (m, _, _) in enumerate(named):
        k = next((j for j, s in enumerate(src_list) if _same_path(m, s)), None)
        if k is None:
            raise GenomeError(f"{where}: slice {i}: model {m} is not one of the sources ({', '.join(src_list)})")
        index_of.append(k)

    settings = {
        "tokenizer_source": _tokenizer_source(data, src_list, where),
        "dtype": _dtype_setting(data, "dtype", where),
        "out_dtype": _dtype_setting(data, "out_dtype", where),
        "chat_template": data.get("chat_template"),
    }
    settings["out_dtype"] = settings["out_dtype"] or settings["dtype"]  # what mergekit writes the checkpoint in

    # layer counts, from config.json only
    layers: list[int] = []
    families: list[Family] = []
    configs: list[Any] = []
    for s in src_list:
        cfg, fam = read_config(locate(s))
        layers.append(int(cfg.num_hidden_layers))
        families.append(fam)
        configs.append(cfg)
    family = families[0]
    writers = _residual_writers(family)
    pre = tuple(n for n in family.non_layer_weights if "embed" in n)
    post = tuple(n for n in family.non_layer_weights if "embed" not in n)

    # hops and their running products
    hops: list[tuple[int, int, float, int]] = []  # (source, layer, product, slice)
    for i, ((m, (start, end), setting), src) in enumerate(zip(named, index_of, strict=True)):
        w = f"{where}: slice {i} ({m} [{start}, {end}])"
        if end > layers[src]:
            raise GenomeError(f"{w}: layer_range ends past the model's {layers[src]} layers")
        n = end - start
        ends = (pre if i == 0 else ()) + (post if i == len(named) - 1 else ())
        _unscaled(setting, ends, w)  # mergekit scales them with this slice's setting at t = 0
        for j in range(n):
            t = j / (n - 1) if n > 1 else 1.0
            product = _slice_product(setting, family, writers, len(hops), t, w)
            hops.append((src, start + j, product, i))
    if not hops:
        raise GenomeError(f"{where}: the slices contain no layer")
    embed, head = index_of[0], index_of[-1]
    if embed != head and any(ties_embeddings(configs[k]) for k in (embed, head)):
        raise GenomeError(
            f"{where}: slice {len(named) - 1}: mergekit takes the final norm from its model ({named[-1][0]}) but, "
            f"the models tying the LM head to the embeddings, the head from the first slice's ({named[0][0]}); a "
            "genome takes norm and head from one source"
        )

    scales, prev = [], 1.0
    for _, _, p, _ in hops:
        scales.append(float(f"{p / prev:.12g}"))
        prev = p
    if scaling == "none" and any(s != 1.0 for s in scales):
        raise GenomeError(f"{where}: the config scales hops but scaling is 'none'")
    route = Route(tuple(Hop(s, layer, sc) for (s, layer, _, _), sc in zip(hops, scales, strict=True)), embed, head)

    # the slot layout
    offsets = [sum(layers[:i]) for i in range(len(layers))]
    reps = [0]  # the repetition each hop lands in when every hop takes the next free slot
    for k in range(1, len(hops)):
        here, before = offsets[hops[k][0]] + hops[k][1], offsets[hops[k - 1][0]] + hops[k - 1][1]
        reps.append(reps[-1] + (here <= before))
    need = reps[-1] + 1
    r = repeats if repeats is not None else need
    if r < 1:
        raise GenomeError(f"{where}: repeats must be at least 1, got {r}")
    if need > r:
        k = next(k for k, x in enumerate(reps) if x >= r)
        s, layer, _, i = hops[k]
        raise GenomeError(
            f"{where}: slice {i} ({named[i][0]} [{named[i][1][0]}, {named[i][1][1]}]): hop {k} ({s}:{layer}) "
            f"does not fit in repeats={r}; the route needs repeats >= {need}"
        )
    pin = route[0].source == 0 and route[0].layer == 0 and route[-1].source == 0 and route[-1].layer == layers[0] - 1
    constraints = ConstraintsConfig(pin_ends=pin)
    try:
        genome = replace(Genome.from_route(route, src_list, layers, r, scaling, constraints), **settings)
        genome.check()
    except GenomeError as err:
        raise GenomeError(f"{where}: {err}") from None
    return genome


def _document_count(path: Path) -> int:
    """How many YAML documents a file holds, from the parser's events (nothing is built, no alias
    expanded); 0 when it cannot be read or parsed that far."""
    n = 0
    try:
        for event in yaml.parse(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader):
            n += isinstance(event, yaml.DocumentStartEvent)
    except (OSError, UnicodeError, yaml.YAMLError):
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


def _tokenizer_source(data: dict[str, Any], sources: Sequence[str], where: str) -> int:
    """The source index of a config's `tokenizer_source` (or `tokenizer.source`): `base` (or none) is 0,
    `model:NAME` (older mergekit's syntax) or a model's path names one of the sources."""
    tok = data.get("tokenizer_source")
    spec = data.get("tokenizer")
    if spec is not None:
        if not isinstance(spec, dict):
            raise GenomeError(f"{where}: tokenizer: expected a mapping")
        changed = next((k for k in ("tokens", "pad_to_multiple_of") if spec.get(k)), None)
        if changed is not None:
            raise GenomeError(f"{where}: tokenizer.{changed}: mergekit changes the vocabulary (adds tokens or pads "
                              "the embeddings); a genome uses one source's tokenizer as it is")
        tok = spec.get("source", tok)
    if tok is None or tok == "base":
        return 0
    if tok == "union":
        raise GenomeError(f"{where}: tokenizer_source 'union': mergekit builds a new vocabulary from every model's; a "
                          "genome uses one source's tokenizer as it is (use base or model:NAME)")
    name = tok.removeprefix("model:") if isinstance(tok, str) else None
    k = next((i for i, s in enumerate(sources) if name and _same_path(name, s)), None)
    if k is None:
        raise GenomeError(f"{where}: tokenizer_source {tok!r} is none of the config's models ({', '.join(sources)}); "
                          "a genome's tokenizer is one of its sources'")
    return k


def _dtype_setting(data: dict[str, Any], key: str, where: str) -> str | None:
    """A config's `dtype` / `out_dtype` as a genome names it (`torch.` dropped, as mergekit does); None if unset."""
    value = data.get(key)
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in DTYPE_NAMES:
        raise GenomeError(f"{where}: {key} {value!r}: a genome's {key} is one of {', '.join(DTYPE_NAMES)}")
    return name


def _unscaled(setting: Any, names: Sequence[str], where: str) -> None:
    """Refuse a slice's scale on the embeddings or the final norm and head (`names`), which mergekit applies
    at t = 0 to the first and the last slice's; a hop scale cannot express it."""
    if setting is None:
        return
    for name in names:
        try:
            value = _resolve_setting(setting, name, 0.0)
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
        probe = {n: _resolve_setting(setting, n, t) for n in names}
        values = [_resolve_setting(setting, f"{layer}.{w}.weight", t) for w in writers or ()]
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

