"""Writing a merge whose base is a vision-language model as that VLM: a plain checkpoint of the base's own class.

Where source 0 is a VLM (a LLaVA, an Idefics3 or SmolVLM, a Gemma 3), `dfs-merge export --format hf` writes the
base VLM with its language model replaced by the route's (or the recipe's merge): a folder that the base's class
(`LlavaForConditionalGeneration`, ..., and `AutoModelForImageTextToText`) loads, with no code of this project.
The language model's tensors are the ones the HF export plans (`tensors.plan_tensors`: each hop's layer, its
running scale product folded in by the family; the embeddings, final norm and LM head), under the VLM's names
(`VisionFamily.checkpoint_name`); the vision tower's and the projector's are the base VLM's own, unchanged. The config is the base VLM's with its text
config the route's (`checkpoint.export_config`); the processor files (tokenizer, image processor, chat
template) and generation config are the base folder's. Everything is written into a staging folder, checked
there (each tensor read back bit for bit, then the written VLM's logits on a picture and a question, and on text
alone, against the stitched VLM's: `pool.candidate(stitch(...))`; with `full`, greedy generations on the picture
too), gets its model card (naming every source), and is renamed into place only when complete.

mergekit and GGUF cannot express such a merge: `formats` refuses them in one line.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dfs_merge.errors import ExportError
from dfs_merge.export.card import card_sources, model_card
from dfs_merge.export.checkpoint import (
    EXPORT_STAGING,
    GENOME_FILE,
    TOKENIZER_FILES,
    ExportInputs,
    appeared,
    export_config,
    load_genome_pool,
    precheck,
    start_pool_export,
    written_dtype,
)
from dfs_merge.export.progress import Progress
from dfs_merge.export.providers import INDEX_NAME, WEIGHTS_NAME, PoolTensors
from dfs_merge.export.settings import Settings, chat_template_text, write_chat_template
from dfs_merge.export.tensors import (
    Entry,
    FoldedLayers,
    one_thread,
    plan_tensors,
    running_products,
    save_shard,
    shards,
)
from dfs_merge.export.verify import (
    VERIFY_NEW_TOKENS,
    VERIFY_PROMPTS,
    VerifyResult,
    check_tensors,
    check_verified,
    coarsest,
    logits_problem,
)
from dfs_merge.genome_files import save_genome
from dfs_merge.models.families.vision import VisionModel
from dfs_merge.models.sources import SourcePool
from dfs_merge.route import Route
from dfs_merge.stitch import stitch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from dfs_merge.export.formats import ExportOptions
    from dfs_merge.genome_files import CandidateGenome

__all__ = ["PROCESSOR_FILES", "export_vlm", "export_vlm_genome", "precheck", "write"]

log = logging.getLogger(__name__)

PROCESSOR_FILES = (*TOKENIZER_FILES, "processor_config.json", "preprocessor_config.json")
"""A VLM folder's files that its processor reads (its tokenizer's, its image processor's, its chat template)."""


class VisionLayers(FoldedLayers):
    """`FoldedLayers` of the language model, plus the base VLM's tensors outside it (`vision`: by their checkpoint
    names, written as they are, cast to their entry's dtype)."""

    def __init__(self, pool: SourcePool, route: Route, vision: dict[str, torch.Tensor],
                 dtype: torch.dtype | None = None):
        super().__init__(pool, route, running_products(route), dtype)
        self.vision = vision

    def tensor(self, e: Entry) -> torch.Tensor:
        """The tensor written for `e`: a vision tensor, or the language model's, folded."""
        if e.name in self.vision:
            t = self.vision[e.name]
            return t if t.dtype == e.dtype else t.to(e.dtype)
        return super().tensor(e)


def export_vlm(pool: SourcePool, genome: CandidateGenome, out: str | Path, *, force: bool = False,
               verify: bool | str = True, max_shard_size: int | str = "2GB", command: str | None = None,
               progress: bool | Progress = False, copy_tokenizer: bool = True, dtype: str | None = None) -> Path:
    """Write `genome` (a route, or a parameter-space recipe) over `pool`, whose base is a vision-language model, as
    that VLM in `out`; returns its path. The arguments are `checkpoint.export_checkpoint`'s; the processor written
    is always the base's (a genome's `tokenizer_source` names another tokenizer of the same vocabulary)."""
    vision = pool.vision
    if vision is None:
        raise ExportError(f"source 0 ({pool.paths[0]}) is not a vision-language model: export_checkpoint writes "
                          "its merge")
    job = start_pool_export(pool, genome, out, force=force, verify=verify, max_shard_size=max_shard_size,
                            dtype=dtype, progress=progress)
    show, mode, settings, route, written, out, limit = (job.show, job.mode, job.settings, job.route, job.written,
                                                         job.out, job.limit)
    configs = [s.vision.model.config if s.vision is not None else s.config for s in pool.sources]
    inputs = ExportInputs(
        PoolTensors(written), list(pool.paths), [s.folder for s in written.sources],
        [s.config for s in written.sources], type(vision.model).__name__,
        card_sources(genome.sources, [s.folder for s in pool.sources], configs, genome.source_layers,
                     [s.license for s in pool.sources]),
        pool=written, device=str(pool.device))
    text_entries = plan_tensors(written, route, settings.out_dtype)
    entries = vision_entries(vision, settings.out_dtype) + [
        replace(e, name=vision.family.checkpoint_name(e.name, written.base.model.base_model_prefix))
        for e in text_entries]
    feed = VisionLayers(written, route, vision.vision_tensors(), settings.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    EXPORT_STAGING.remove_leftovers(out)
    with one_thread(), EXPORT_STAGING.folder(out, replace=force, refuse=appeared) as staging:
        with show.stage(f"writing the {vision.model_type} model with {len(route)} language-model hops: "
                        f"{len(entries)} tensors", "written"):
            write_weights(staging, entries, feed, limit)
        config = copy.deepcopy(vision.model.config)
        config.text_config = export_config(inputs, route, text_entries)
        config.text_config.architectures = None
        config.architectures = [inputs.architecture]
        config.dtype = written_dtype(entries)
        config.save_pretrained(staging)
        _write_side_files(pool, vision, staging, settings, copy_tokenizer)
        save_genome(genome, staging / GENOME_FILE)
        verified = _verify(written, route, entries, feed, staging, settings, mode, show)
        card = model_card(inputs.card, genome, route, architecture=inputs.architecture, family=pool.family.name,
                          title=out.name, genome_file=GENOME_FILE, genome_text=(staging / GENOME_FILE).read_text(),
                          verified=verified, command=command, written=written_dtype(entries), settings=settings,
                          loader=vision.family.auto_class)
        (staging / "README.md").write_text(_with_vision_note(card, vision, pool.paths[0]))
    return out


def export_vlm_genome(genome: CandidateGenome, out: str | Path, *, device: str = "cpu", dtype: str | None = None,
                      progress: bool | Progress = False, **kwargs: Any) -> Path:
    """Export `genome`, whose base is a vision-language model, from its own sources: loaded whole (in the genome's
    `dtype`, else the written one, else the base's stored one), then written by `export_vlm`."""
    show = Progress.of(progress)
    return export_vlm(load_genome_pool(genome, device, dtype, show), genome, out, dtype=dtype, progress=show, **kwargs)


def write(genome: CandidateGenome, out: Path, options: ExportOptions, progress: Progress) -> Path:
    """`dfs-merge export --format hf` of a genome whose base is a vision-language model (`precheck` is the HF
    checkpoint's)."""
    return export_vlm_genome(genome, out, device=options.device, dtype=options.dtype, force=options.force,
                             verify=options.verify, max_shard_size=options.max_shard_size or "2GB",
                             copy_tokenizer=options.copy_tokenizer, progress=progress)


def vision_entries(vision: VisionModel, dtype: torch.dtype | None) -> list[Entry]:
    """The base VLM's tensors outside its language model, as written: by their state-dict names, floating ones in
    `dtype` (None: as held)."""
    out = []
    for name, t in vision.vision_tensors().items():
        written = dtype if dtype is not None and t.is_floating_point() else t.dtype
        out.append(Entry(name, None, name, written, tuple(t.shape)))
    return out


def write_weights(folder: Path, entries: list[Entry], feed: VisionLayers, limit: int) -> None:
    """The safetensors shards of `entries` (and their index where there are several), a tensor at a time."""
    groups = shards(entries, limit)
    names = [WEIGHTS_NAME] if len(groups) == 1 else [f"model-{i:05d}-of-{len(groups):05d}.safetensors"
                                                     for i in range(1, len(groups) + 1)]
    for name, group in zip(names, groups, strict=True):
        by_name = {e.name: e for e in group}
        save_shard(folder / name, [(e.name, e.dtype, e.shape) for e in group], lambda n, b=by_name: feed.tensor(b[n]))
    if len(groups) > 1:
        weight_map = {e.name: name for name, group in zip(names, groups, strict=True) for e in group}
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_side_files(pool: SourcePool, vision: VisionModel, folder: Path, settings: Settings,
                      copy_tokenizer: bool) -> None:
    """The base folder's generation config and (unless not `copy_tokenizer`) processor files, copied verbatim
    (else the loaded ones saved), then the genome's chat template where it names one."""
    base = pool.base.folder
    if base is not None and (base / "generation_config.json").is_file():
        shutil.copy2(base / "generation_config.json", folder / "generation_config.json")
    else:
        vision.model.generation_config.save_pretrained(folder)
    if not copy_tokenizer:
        return
    copied = [n for n in PROCESSOR_FILES if base is not None and (base / n).is_file()]
    for name in copied:
        shutil.copy2(base / name, folder / name)
    if not copied:
        vision.processor.save_pretrained(folder)
    if settings.chat_template:
        text = chat_template_text(settings.chat_template, [s.folder for s in pool.sources])
        if text is not None:
            write_chat_template(folder, text)


def verify_inputs(vision: VisionModel, device: torch.device, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """What the written VLM and the stitched one both run: a drawn picture with a question, then text alone."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (64, 64), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    draw.ellipse((8, 8, 36, 36), fill=(220, 30, 30))
    draw.rectangle((34, 30, 58, 56), fill=(30, 60, 220))
    processor = vision.processor
    token = getattr(processor, "image_token", None) or "<image>"
    with_picture = processor(images=[picture], text=[f"{token}\nWhat is in the picture? {VERIFY_PROMPTS[0]}"],
                             return_tensors="pt")
    text = processor.tokenizer(list(VERIFY_PROMPTS[:1]), return_tensors="pt")
    rows = [dict(with_picture), {"input_ids": text["input_ids"]}]
    return [{k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in row.items()}
            for row in rows]


@torch.no_grad()
def compare_vlm(reference: PreTrainedModel, folder: Path, vision: VisionModel, dtype: torch.dtype,
                full: bool) -> VerifyResult:
    """The VLM written in `folder` (loaded by transformers in `dtype`, as a user loads it) against `reference`
    (the stitched or merged VLM) on `verify_inputs`: logits, and with `full` the greedy continuation of the
    picture's question."""
    import transformers

    device = next(reference.parameters()).device
    rows = verify_inputs(vision, device, dtype)
    expected = [reference(**row).logits.float() for row in rows]
    kw = dict(max_new_tokens=VERIFY_NEW_TOKENS, do_sample=False, num_beams=1,
              pad_token_id=vision.processor.tokenizer.pad_token_id)
    generated = reference.generate(**rows[0], **kw) if full else None
    auto = getattr(transformers, vision.family.auto_class)
    loaded = auto.from_pretrained(folder, dtype=dtype, use_safetensors=True).to(device).eval()
    diff = top = 0.0
    for row, a in zip(rows, expected, strict=True):
        b = loaded(**row).logits.float()
        for name, logits in (("the stitched model", a), ("the written checkpoint", b)):
            problem = logits_problem(name, logits)
            if problem is not None:
                return VerifyResult(float("nan"), float("nan"), None, 0, problem)
        if a.shape != b.shape:
            return VerifyResult(float("nan"), float("nan"), None, 0, f"the written checkpoint gives logits of shape "
                                f"{list(b.shape)}, the stitched model {list(a.shape)}")
        diff, top = max(diff, float((a - b).abs().max())), max(top, float(a.abs().max()))
    same = None
    if generated is not None:
        again = loaded.generate(**rows[0], **kw)
        same = again.shape == generated.shape and bool((again == generated).all())
    return VerifyResult(diff, top, same, VERIFY_NEW_TOKENS if full else 0)


def _verify(written: SourcePool, route: Route, entries: list[Entry], feed: VisionLayers, folder: Path,
            settings: Settings, mode: str, show: Progress) -> str:
    """The checks on the staged folder (an ExportError when one fails): the tensors read back, then the logits on
    a picture and a question (and text alone) against the stitched VLM; what they found, one line."""
    if mode == "off":
        return "not verified (--verify off)"
    with show.stage(f"checking the {len(entries)} written tensors against their sources", "checked"):
        checked = check_tensors(folder, entries, feed)
    vision = written.vision
    reference, _ = written.candidate(stitch(written, route))
    coarse = coarsest(settings.dtype, written_dtype(entries), written.dtype)
    with show.stage("comparing the written model with the stitched one on a picture and a question", "compared"):
        result = compare_vlm(reference, folder, vision, written.dtype, full=mode == "full")
    check_verified(result, coarse)
    text = f"{checked.text()}; on a picture and a question, and on text: {result.text()}"
    show.say(f"verify: {text}")
    return text


def _with_vision_note(card: str, vision: VisionModel, base: str) -> str:
    """The model card with a paragraph saying which parts are the base VLM's own."""
    note = (f"## Vision\n\nA vision-language model ({vision.model_type}, `{type(vision.model).__name__}`): its vision "
            f"tower, projector and image-token handling are source 0's (`{base}`), unchanged; its language model is "
            "the merge described above; its processor (`AutoProcessor`) is source 0's.\n\n")
    at = card.find("## Settings")
    return card[:at] + note + card[at:] if at >= 0 else card + "\n" + note
