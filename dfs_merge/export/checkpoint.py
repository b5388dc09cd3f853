"""Writing a route as a plain Hugging Face checkpoint: the orchestration, the side files, publishing.

An export writes the route as an ordinary Hugging Face checkpoint of the base's own class
(`num_hidden_layers` = hops), with each hop's running scale product folded into its weights by the
family (`Family.fold_scale`). One path plans, writes and checks it (`_export`), over one of two tensor
providers (`providers`): `export_genome` streams the tensors from the sources' safetensors files, a
layer at a time, without loading a model; `export_checkpoint` reads them from a loaded `SourcePool`
(a `BASE+ADAPTER` source, a recipe's merge, a model built in memory). Shards are written one tensor
at a time (`tensors`), so the output is never held in memory. The genome's settings are honoured: the
embeddings and head sources (the route's), the tokenizer source, `dtype` (the merge's) and `out_dtype`
(the written one), the chat template. Everything goes into a staging folder beside the target
(`dfs_merge.atomic.Staging`), is verified there (`verify`: tensors read back, logits, or in full the
generations too; the stitched model's side of it beside the writing where a core is free, `overlap`), gets
its model card (`card`), and is renamed into place only when complete: a killed or failed export never
leaves a half folder under the target's name. The genome's settings and chat
template are `settings`'; the stage lines and bar, `progress`; the pool's checks, `pool`. `precheck` and
`write` are the `hf` export format (`dfs_merge.export.formats`).

mergekit passthrough configs of the same route, out and in: `dfs_merge.export.mergekit`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dfs_merge.atomic import NO_SPACE, Staging
from dfs_merge.errors import ExportError
from dfs_merge.export.card import CardSource, card_sources, model_card
from dfs_merge.export.overlap import Background, Flusher, MemoryGate, spare_core
from dfs_merge.export.pool import check_layers, check_pool, written_pool
from dfs_merge.export.progress import Progress
from dfs_merge.export.providers import (
    INDEX_NAME,
    WEIGHTS_NAME,
    FileTensors,
    PoolTensors,
    TensorProvider,
    safetensors_files,
)
from dfs_merge.export.settings import Settings, chat_template_text, export_settings, write_chat_template
from dfs_merge.export.tensors import (
    Entry,
    FoldedLayers,
    one_thread,
    parse_size,
    plan_tensors,
    running_products,
    shards,
)
from dfs_merge.export.tensors import save_shard as _save_shard
from dfs_merge.export.verify import (
    QUICK_LOGITS_MAX_BYTES,
    VERIFY_MODES,
    VERIFY_PROMPTS,
    Reference,
    VerifyResult,
    check_tensors,
    check_verified,
    coarsest,
    compare_written,
    reference_outputs,
    verify_export,
    verify_tolerance,
)
from dfs_merge.genome_files import save_genome
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.adapters import split_source
from dfs_merge.models.kinds import source_kind
from dfs_merge.models.metadata import check_same_sources
from dfs_merge.models.sources import DTYPES, SourcePool, check_compatible, locate, read_config, resolve_device
from dfs_merge.outputs import check_output
from dfs_merge.route import Route

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from dfs_merge.export.formats import ExportOptions
    from dfs_merge.genome_files import CandidateGenome
    from dfs_merge.models.families import Family

__all__ = [
    "GENOME_FILE", "INDEX_NAME", "TOKENIZER_FILES", "WEIGHTS_NAME", "ExportInputs", "VerifyResult",
    "export_checkpoint", "export_config", "export_genome", "parse_size", "precheck", "running_products",
    "stream_folders", "verify_export", "verify_mode", "write",
]

log = logging.getLogger(__name__)

GENOME_FILE = "dfs-merge-genome.yaml"
"""The errors of a full disk (or quota), as `run_evolution` tells them."""
# staging folder beside DIR: .<DIR name>.dfs-export-<pid>-<hex>; a replaced DIR: .<DIR name>.dfs-replaced-<pid>-<hex>
EXPORT_STAGING = Staging(tag="dfs-export", old_tag="dfs-replaced", what="export")
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


def export_checkpoint(
    pool: SourcePool,
    genome: CandidateGenome,
    out: str | Path,
    *,
    force: bool = False,
    verify: bool | str = True,
    max_shard_size: int | str = "2GB",
    command: str | None = None,
    progress: bool | Progress = False,
    copy_tokenizer: bool = True,
    dtype: str | None = None,
) -> Path:
    """Write `genome`'s route over the loaded `pool` (or a parameter-space recipe's merge of it) as a plain
    HF checkpoint in `out`; returns its path.

    The folder holds safetensors shards (and an index when sharded), config, generation config, the
    tokenizer source's tokenizer files (unless not `copy_tokenizer`), the genome (`dfs-merge-genome.yaml`)
    and a model card. An existing `out` is refused unless `force`. `verify` is `quick` (or True), `full`
    or `off` (or False), see `dfs_merge.export.verify`; a failed check is an ExportError and nothing is
    left under `out`'s name. `dtype` overrides the genome's `out_dtype`. `progress` prints stage lines and
    a bar to stderr (the CLI's; off for library calls). `export_genome` streams from the sources' files
    instead of a pool.
    """
    job = start_pool_export(pool, genome, out, force=force, verify=verify, max_shard_size=max_shard_size,
                            dtype=dtype, progress=progress)
    written = job.written
    inputs = ExportInputs(
        PoolTensors(written), list(pool.paths), [s.folder for s in written.sources],
        [s.config for s in written.sources], type(written.base.model).__name__,
        card_sources(genome.sources, [s.folder for s in pool.sources], [s.config for s in pool.sources],
                     genome.source_layers, [s.license for s in pool.sources]),
        pool=written, device=str(pool.device),
    )
    return _export(inputs, genome, job.route, job.out, job.settings, mode=job.mode, limit=job.limit, force=force,
                   show=job.show, command=command, copy_tokenizer=copy_tokenizer)


@dataclass(frozen=True)
class PoolExport:
    """What an export over a loaded pool starts from: its progress display, verification mode and settings, the
    checked route, the pool it writes (a recipe's merge applied), the checked output path and the shard limit."""

    show: Progress
    mode: str
    settings: Settings
    route: Route
    written: SourcePool
    out: Path
    limit: int


def start_pool_export(pool: SourcePool, genome: CandidateGenome, out: str | Path, *, force: bool,
                      verify: bool | str, max_shard_size: int | str, dtype: str | None,
                      progress: bool | Progress) -> PoolExport:
    """Check an export of `genome` over `pool` into `out` (the arguments of `export_checkpoint`) before anything
    is written, and apply a recipe's merge: shared by the language-model and the vision-language exports."""
    show = Progress.of(progress)
    mode = verify_mode(verify)
    settings = export_settings(genome, dtype)
    route = genome.check()
    check_pool(pool, genome)
    written = written_pool(pool, genome, show)
    out = check_output(out, kind="folder", force=force, inputs=[*genome.sources, *pool.paths], error=ExportError,
                       what=None, force_hint="force=True (--force)")
    return PoolExport(show, mode, settings, route, written, out, parse_size(max_shard_size))


def export_genome(genome: CandidateGenome, out: str | Path, *, device: str = "cpu", dtype: str | None = None,
                  progress: bool | Progress = False, **kwargs: Any) -> Path:
    """Export `genome` from its own sources (the arguments of `export_checkpoint`, without a pool).

    Where every source is a folder of safetensors weights (as given, or a packaged model, GGUF file or Hub
    name once located) the tensors are streamed from those files, one layer at a time, and no model is
    loaded to write them; otherwise (a recipe, a `BASE+ADAPTER` or recipe-file source) the sources are
    loaded whole, in the genome's `dtype` (else the written one, else the base's stored one), and written
    by `export_checkpoint`. Missing sources are a SourceError.
    """
    show = Progress.of(progress)
    folders = stream_folders(genome)
    if folders is not None:
        return _export_streamed(genome, folders, out, device=device, dtype=dtype, show=show, **kwargs)
    return export_checkpoint(load_genome_pool(genome, device, dtype, show), genome, out, dtype=dtype, progress=show,
                             **kwargs)


def load_genome_pool(genome: CandidateGenome, device: str, dtype: str | None, show: Progress) -> SourcePool:
    """`genome`'s own sources loaded whole, in the genome's `dtype`, else `dtype` (the written one), else the
    genome's `out_dtype`, else the base's stored one."""
    given = genome.settings()
    name = (given.get("dtype") or dtype or given.get("out_dtype") or stored_dtype(locate(genome.sources[0]))
            or "float32")
    with show.loading(len(genome.sources), device, name):
        return SourcePool.load(list(genome.sources), device=device, dtype=name)


def precheck(genome: CandidateGenome, options: ExportOptions) -> None:
    """`dfs-merge export --format hf`, before any source is loaded: the device, the shard size and the genome's
    settings."""
    resolve_device(options.device)
    parse_size(options.max_shard_size or "2GB")
    export_settings(genome, options.dtype)


def write(genome: CandidateGenome, out: Path, options: ExportOptions, progress: Progress) -> Path:
    """`dfs-merge export --format hf`: `export_genome` with the command's options."""
    return export_genome(genome, out, device=options.device, dtype=options.dtype, force=options.force,
                         verify=options.verify, max_shard_size=options.max_shard_size or "2GB",
                         copy_tokenizer=options.copy_tokenizer, progress=progress)


def stream_folders(genome: CandidateGenome) -> list[Path] | None:
    """Each source's local folder where an export can stream all of them from safetensors files; None for a
    recipe (merged in memory), a `BASE+ADAPTER` source or one of a kind the loader builds in memory (`kinds`: a
    recipe file), or a folder without safetensors."""
    if isinstance(genome, Recipe) or any(split_source(p)[1] is not None or source_kind(p) is not None
                                         for p in genome.sources):
        return None
    folders = [locate(p) for p in genome.sources]
    return folders if all(safetensors_files(f) is not None for f in folders) else None


def stored_dtype(folder: Path) -> str | None:
    """The dtype a folder's config.json says its weights are stored in, where it is one `SourcePool` loads."""
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = data.get("dtype") or data.get("torch_dtype") if isinstance(data, dict) else None
    return name if name in DTYPES else None


def _export_streamed(genome: CandidateGenome, folders: list[Path], out: str | Path, *, device: str, dtype: str | None,
                     show: Progress, force: bool = False, verify: bool | str = True,
                     max_shard_size: int | str = "2GB", command: str | None = None,
                     copy_tokenizer: bool = True) -> Path:
    """`export_genome` over safetensors folders: the sources checked from their configs, tensors streamed."""
    mode = verify_mode(verify)
    settings = export_settings(genome, dtype)
    route = genome.check()
    out = check_output(out, kind="folder", force=force, inputs=[*genome.sources, *map(str, folders)],
                       error=ExportError, what=None, force_hint="force=True (--force)")
    limit = parse_size(max_shard_size)
    read: dict[Path, tuple[PretrainedConfig, Family]] = {}
    for f in folders:
        read.setdefault(f.resolve(), read_config(f))
    pairs = [read[f.resolve()] for f in folders]
    check_compatible(pairs, _tokenizers_if_differ(folders)).check_settings(genome.settings())
    check_layers(tuple(int(c.num_hidden_layers) for c, _ in pairs), genome)
    if any(genome.fingerprints):
        check_same_sources(genome.sources, genome.fingerprints, list(genome.sources))
    configs = [c for c, _ in pairs]
    n = len(read)
    show.say(f"streaming the tensors of {n} source{'s' if n != 1 else ''} from safetensors files")
    inputs = ExportInputs(
        FileTensors(folders, configs, [f for _, f in pairs]), list(genome.sources), folders, configs,
        _architecture(configs[0]),
        card_sources(genome.sources, folders, configs, genome.source_layers),
        pool=None, device=device,
    )
    return _export(inputs, genome, route, out, settings, mode=mode, limit=limit, force=force, show=show,
                   command=command, copy_tokenizer=copy_tokenizer)


def _tokenizers_if_differ(folders: list[Path]) -> list[PreTrainedTokenizerBase] | None:
    """The sources' tokenizers for `check_compatible`, loaded only where their tokenizer files differ (a
    self-merge or fine-tunes that ship the same files need none)."""
    distinct = list(dict.fromkeys(f.resolve() for f in folders))

    def files(folder: Path) -> tuple[bytes, ...]:
        return tuple((folder / n).read_bytes() if (folder / n).is_file() else b"" for n in TOKENIZER_FILES)

    if len(distinct) == 1 or len({files(f) for f in distinct}) == 1:
        return None
    from dfs_merge.models.sources import load_tokenizer

    loaded = {f: load_tokenizer(f, False) for f in distinct}
    return [loaded[f.resolve()] for f in folders]


def _architecture(config: PretrainedConfig) -> str:
    """The output's class name: the base config's `architectures`, else transformers' causal LM for its type."""
    names = getattr(config, "architectures", None)
    if names:
        return str(names[0])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise ExportError(f"{config.model_type}: transformers has no causal LM class for it")
    return name


def verify_mode(verify: bool | str) -> str:
    """`quick`, `full` or `off` for a `verify` argument (True is `quick`, False is `off`)."""
    if verify is True or verify is False:
        return "quick" if verify else "off"
    if verify not in VERIFY_MODES:
        raise ExportError(f"verify {verify!r} is not one of {', '.join(VERIFY_MODES)}")
    return str(verify)


@dataclass
class ExportInputs:
    """What an export reads, whichever provider its tensors come from."""

    tensors: TensorProvider
    paths: list[str]  # the sources as the genome names them (for a recipe: as its pool names them)
    folders: list[Path | None]  # each written source's folder (None: built in memory)
    configs: list[PretrainedConfig]  # each written source's HF config; the first is the output's
    architecture: str  # the output's class name
    card: list[CardSource]
    pool: SourcePool | None = None  # the loaded sources, where the export is made from memory
    device: str = "cpu"


def _export(inputs: ExportInputs, genome: CandidateGenome, route: Route, out: Path, settings: Settings, *, mode: str,
            limit: int, force: bool, show: Progress, command: str | None, copy_tokenizer: bool) -> Path:
    """The one path of every HF export: plan, write into a staging folder, verify, card, publish."""
    entries = plan_tensors(inputs.tensors, route, settings.out_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    EXPORT_STAGING.remove_leftovers(out)
    try:
        return _write_staged(inputs, genome, route, out, settings, entries, mode=mode, limit=limit, force=force,
                             show=show, command=command, copy_tokenizer=copy_tokenizer)
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        # the staging folder is removed on the way out and `out` is renamed into place only when complete
        raise ExportError(f"no space left on {out.parent}; nothing was published (the partial export was removed): "
                          "free some space and export again") from None


def _write_staged(inputs: ExportInputs, genome: CandidateGenome, route: Route, out: Path, settings: Settings,
                  entries: list[Entry], *, mode: str, limit: int, force: bool, show: Progress, command: str | None,
                  copy_tokenizer: bool) -> Path:
    """`_export`'s writing: every file into a staging folder, verified there, then renamed to `out`.

    Where a core is free, the stitched model's side of the logit check (loading the sources for it, where the
    export streams them) runs in the background from the start, beside the writing and the tensor check; each
    shard is fsynced in the background while the checks read it (`overlap`). Both are done before the folder is
    published, and a failure waits for them before the folder is removed.
    """
    gate = MemoryGate(_largest_layer(entries))
    with one_thread(), EXPORT_STAGING.folder(out, replace=force, refuse=appeared) as staging, \
            contextlib.ExitStack() as background:
        flusher = background.enter_context(Flusher())
        logits = _logit_check(inputs, entries, settings, mode)
        reference = _start_reference(inputs, route, logits, gate, show)
        if reference is not None:
            background.enter_context(reference)
        background.callback(gate.open)  # on the way out (a failed write) before the reference is waited for
        _write_weights(inputs.tensors, route, entries, staging, limit, show, settings.dtype, flusher, gate)
        gate.open()  # the weights are written: a load waiting for the gate may start
        export_config(inputs, route, entries).save_pretrained(staging)
        _write_generation_config(inputs, staging)
        if copy_tokenizer:
            _write_tokenizer(inputs, staging, settings)
        elif settings.chat_template:
            log.warning("chat_template is set but the tokenizer is not copied: no template is written")
        save_genome(genome, staging / GENOME_FILE)
        verified = _verify(inputs, route, entries, staging, settings, show, logits, reference, gate)
        flusher.wait()
        card = model_card(inputs.card, genome, route, architecture=inputs.architecture,
                          family=inputs.tensors.family.name, title=out.name, genome_file=GENOME_FILE,
                          genome_text=(staging / GENOME_FILE).read_text(), verified=verified, command=command,
                          written=written_dtype(entries), settings=settings)
        (staging / "README.md").write_text(card)
    return out


def appeared(out: Path) -> ExportError:
    """The refusal of an export whose target folder appeared while it was being written (not forced)."""
    return ExportError(f"{out}: appeared while exporting; pass force=True (--force) to replace it")


def _write_weights(tensors: TensorProvider, route: Route, entries: list[Entry], folder: Path, limit: int,
                   show: Progress, dtype: torch.dtype | None = None, flusher: Flusher | None = None,
                   gate: MemoryGate | None = None) -> None:
    """The safetensors shards (and index), streamed from the provider: one folded layer is held at a time. Each
    shard is handed to `flusher` to be fsynced in the background; a tensor larger than a layer is written
    holding `gate`, which is opened when the first layer is reached."""
    groups = shards(entries, limit)
    feed = FoldedLayers(tensors, route, running_products(route), dtype)
    n = len(groups)
    weight_map: dict[str, str] = {}
    total = sum(e.nbytes for e in entries)
    with show.stage(f"writing {len(route)} hops: {len(entries)} tensors, {total / 2**20:.0f} MB in "
                    f"{n} shard{'s' if n != 1 else ''}", f"wrote {n} shard{'s' if n != 1 else ''}"), \
            show.bar(len(entries), "tensor") as bar:
        for i, shard in enumerate(groups, start=1):
            name = WEIGHTS_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            by_name = {e.name: e for e in shard}

            def get(tensor: str, by_name: dict[str, Entry] = by_name) -> torch.Tensor:
                bar.update(1)
                if gate is not None and by_name[tensor].hop is not None:
                    gate.open()
                return feed.tensor(by_name[tensor])

            def hold(tensor: str, by_name: dict[str, Entry] = by_name) -> contextlib.AbstractContextManager[object]:
                return gate.tensor(by_name[tensor].nbytes) if gate is not None else contextlib.nullcontext()

            _save_shard(folder / name, [(e.name, e.dtype, e.shape) for e in shard], get, hold)
            if flusher is not None:
                flusher.flush(folder / name)
            weight_map.update(dict.fromkeys(by_name, name))
    if n > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _largest_layer(entries: list[Entry]) -> int:
    """The bytes of the largest hop's tensors: what the writing holds at a time anyway."""
    sizes: dict[int, int] = {}
    for e in entries:
        if e.hop is not None:
            sizes[e.hop] = sizes.get(e.hop, 0) + e.nbytes
    return max(sizes.values(), default=0)


def written_dtype(entries: list[Entry]) -> torch.dtype:
    """The floating dtype that holds most of the written bytes: the one the config names."""
    sizes: dict[torch.dtype, int] = {}
    for e in entries:
        if e.dtype.is_floating_point:
            sizes[e.dtype] = sizes.get(e.dtype, 0) + e.nbytes
    return max(sizes, key=sizes.__getitem__) if sizes else torch.float32


def export_config(inputs: ExportInputs, route: Route, entries: list[Entry]) -> PretrainedConfig:
    """The base's config for `route`: `num_hidden_layers` = hops, `layer_types` per hop where it has them, the
    written dtype, and the head untied where one is written beside tied embeddings."""
    config = copy.deepcopy(inputs.configs[0])
    config.num_hidden_layers = len(route)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [inputs.tensors.families[h.source].layer_type(inputs.configs[h.source], h.layer)
                              for h in route]
    config.architectures = [inputs.architecture]
    config.dtype = written_dtype(entries)
    head = inputs.tensors.family.non_layer_weights[-1]
    if getattr(config, "tie_word_embeddings", False) and any(e.name == head for e in entries):
        config.tie_word_embeddings = False
    return config


def _write_generation_config(inputs: ExportInputs, folder: Path) -> None:
    """The base folder's generation_config.json, copied verbatim; else the base model's saved; else none."""
    base_dir = inputs.folders[0]
    if base_dir is not None and (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", folder / "generation_config.json")
        return
    gen = getattr(inputs.pool.base.model, "generation_config", None) if inputs.pool is not None else None
    if gen is not None:
        try:
            gen.save_pretrained(folder)
        except Exception as err:  # noqa: BLE001 - a generation config is optional
            log.warning("generation config not written (%s)", err)


def _write_tokenizer(inputs: ExportInputs, folder: Path, settings: Settings) -> None:
    """The tokenizer source's tokenizer files, copied verbatim (else its loaded tokenizer saved; else none),
    then the genome's chat template, if it names one, as chat_template.jinja."""
    i = settings.tokenizer_source if settings.tokenizer_source < len(inputs.folders) else 0
    source_dir = inputs.folders[i]
    copied = []
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, folder / name)
                copied.append(name)
    if not copied:
        pool = inputs.pool
        tok = (pool.tokenizer_for(i) if hasattr(pool, "tokenizer_for") else pool.tokenizer) if pool else None
        if tok is None:
            log.warning("source %d has no tokenizer: the export has none either", i)
            return
        tok.save_pretrained(folder)
    if settings.chat_template:
        text = chat_template_text(settings.chat_template, inputs.folders)
        if text is not None:
            write_chat_template(folder, text)


@dataclass(frozen=True)
class _LogitCheck:
    """The logit check an export makes, decided before it writes (its reference runs beside the writing)."""

    full: bool  # `full`: logits on every row, then greedy generations; else `quick`'s logits on one row
    ref_name: str  # the dtype the sources are loaded in for it, where they are not loaded already
    ref_dtype: torch.dtype  # the reference's dtype, which the checkpoint is loaded in
    coarse: torch.dtype  # the coarsest dtype the comparison went through: it sets the tolerance
    skipped: str | None = None  # why `quick` compares no logits (the models are too big); None when it does
    pooled: bool = False  # a streamed export whose tensor check reads the sources loaded for the reference


def _logit_check(inputs: ExportInputs, entries: list[Entry], settings: Settings, mode: str) -> _LogitCheck | None:
    """What `mode`'s logit check compares (None for `off`): `quick` compares no logits of a streamed export
    whose checkpoint or sources hold more than `QUICK_LOGITS_MAX_BYTES` (`full` always compares).

    A streamed export loads its sources for the reference: its tensor check then reads the expected tensors from
    them, as transformers loaded them (an independent reader of the same files, and no second read and cast of
    them), where that gives the very bits the writing did: where the merge computes in the reference's dtype, or
    every floating tensor of the sources is stored in it (and the loaded sources plan the same tensors as the
    files: `_verify`)."""
    if mode == "off":
        return None
    written = written_dtype(entries)
    pool = inputs.pool
    ref_name = next((k for k, v in DTYPES.items() if v == written), "float32")
    ref_dtype = pool.dtype if pool is not None else DTYPES[ref_name]
    check = _LogitCheck(mode == "full", ref_name, ref_dtype, coarsest(settings.dtype, written, ref_dtype))
    if pool is not None:
        return check
    if mode == "quick":
        size = max(sum(e.nbytes for e in entries), inputs.tensors.distinct_bytes(ref_dtype))
        if size > QUICK_LOGITS_MAX_BYTES:
            return replace(check, skipped=(
                f"logits not compared: {size / 2**30:.1f} GiB to load, over quick's "
                f"{QUICK_LOGITS_MAX_BYTES / 2**30:.0f} GiB (--verify full compares them)"))
    return replace(check, pooled=settings.dtype == ref_dtype or inputs.tensors.floating_dtypes() == {ref_dtype})


_Outputs = tuple[Reference, "SourcePool | None"]
"""What the reference hands back: the stitched model's outputs, and the sources it loaded where the tensor check
reads them (`_LogitCheck.pooled`), else None (they were dropped once it had run)."""


def _start_reference(inputs: ExportInputs, route: Route, check: _LogitCheck | None, gate: MemoryGate,
                     show: Progress) -> Background[_Outputs] | None:
    """The stitched model's side of the logit check (None where no logits are compared): over the loaded pool,
    or over the sources loaded for it in the reference's dtype, holding `gate` while they load. Where a core is
    free it starts now, in the background, beside the writing; on a busy machine it runs when the check asks
    for it."""
    if check is None or check.skipped is not None:
        return None
    given = inputs.pool

    def run() -> _Outputs:
        if given is not None:
            return reference_outputs(given, route, full=check.full), None
        with gate.loading():
            pool = SourcePool.load(list(inputs.paths), device=inputs.device, dtype=check.ref_name)
        return reference_outputs(pool, route, full=check.full), pool if check.pooled else None

    beside = spare_core()
    if beside and given is None:
        show.say(f"loading {show.sources(len(inputs.paths))} on {inputs.device} ({check.ref_name}) to compare, "
                 "beside the writing ...")
    return Background(run, name="dfs-merge-verify-reference", beside=beside)


def _reference_result(reference: Background[_Outputs], inputs: ExportInputs, check: _LogitCheck,
                      show: Progress) -> _Outputs:
    """The reference's outputs, once it has run: waited for, or run now (loading the sources, where the export
    streams them), with a line that says how long it took."""
    if inputs.pool is not None:
        return reference.result()
    sources = show.sources(len(inputs.paths))
    if reference.beside:
        t0 = time.perf_counter()
        outputs = reference.result()
        show.say(f"loaded {sources} and ran the stitched model beside the writing ({reference.seconds:.1f} s; "
                 f"waited {time.perf_counter() - t0:.1f} s)")
        return outputs
    with show.stage(f"loading {sources} on {inputs.device} ({check.ref_name}) to compare",
                    f"loaded {sources} and ran the stitched model"):
        return reference.result()


def _verify(inputs: ExportInputs, route: Route, entries: list[Entry], folder: Path, settings: Settings,
            show: Progress, check: _LogitCheck | None, reference: Background[_Outputs] | None,
            gate: MemoryGate) -> str:
    """Run the checks on the staged folder (an ExportError when one fails): the tensors read back, then the
    logits (and for `full` the generations) against the `reference` started before the writing; what they
    found, one line. A pooled check waits for the reference first and reads its sources (dropped after it)."""
    if check is None:
        return "not verified (--verify off)"
    ref: Reference | None = None
    expected: TensorProvider | SourcePool = inputs.tensors
    if reference is not None and check.pooled:
        ref, loaded = _reference_result(reference, inputs, check, show)
        if loaded is not None and plan_tensors(loaded, route, settings.out_dtype) == entries:
            expected = loaded
        elif loaded is not None:
            log.info("verify: the loaded sources hold other tensors than their files; checking against the files")
        del loaded
    n = len(entries)
    # the layers first: the large tensors outside them wait for `gate` while the sources load for the reference
    ordered = [e for e in entries if not gate.big(e.nbytes)] + [e for e in entries if gate.big(e.nbytes)]
    with show.stage(f"checking the {n} written tensors against their sources", f"checked {n} tensors"):
        checked = check_tensors(folder, ordered, FoldedLayers(expected, route, running_products(route),
                                                              settings.dtype),
                                hold=lambda e: gate.tensor(e.nbytes))
    del expected  # the sources loaded for the reference, dropped before the checkpoint is loaded
    show.say(f"verify: {checked.text()}")
    if reference is None:
        show.say(f"verify: {check.skipped}")
        return f"{checked.text()}; {check.skipped}"
    doing, done = (("verifying against the stitched model", "verified") if check.full else
                   ("comparing logits with the stitched model", "compared"))
    with show.stage(f"{doing} on {len(VERIFY_PROMPTS)} prompts", done):
        if ref is None:
            ref, _ = _reference_result(reference, inputs, check, show)
        result = compare_written(ref, folder, check.ref_dtype,
                                 tolerance=verify_tolerance(check.coarse) if check.full else None)
    log.info("verify: %s", result.text())
    check_verified(result, check.coarse)
    show.say(f"verify: {result.text()}")
    return f"{checked.text()}; {result.text()}"
