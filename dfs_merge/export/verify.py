"""Checking a written checkpoint before it is published: its tensors, its logits, its generations.

Three levels (`VERIFY_MODES`, the CLI's `--verify`):

- `quick` (the default): `check_tensors` reads every written tensor back (with safetensors, memory-mapped, a
  layer at a time) and compares it bit for bit with its source tensor, cast and folded as planned, and the
  files' names, dtypes, shapes and index with the plan; then `compare_logits` runs the verify prompts through
  the written checkpoint (loaded by transformers, as a user loads it) and through the stitched model, one model
  after the other, without generation. The logit check is skipped where either model would exceed
  `QUICK_LOGITS_MAX_BYTES` (the tensor check still runs).
- `full`: the tensor check, then `verify_export`: logits on the prompts and a 32-token row, then greedy
  generations of both models compared token for token.
- `off`: nothing.

Each logit check has two sides: the stitched model's (`reference_outputs`, a `Reference`), which an export runs
before the checkpoint is loaded, beside its writing where a core is free (`dfs_merge.export.overlap`), and the
written checkpoint's (`compare_written`). `check_verified` turns a result outside the dtype's tolerance
(`verify_tolerance`) into an ExportError.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dfs_merge.errors import ExportError, one_line
from dfs_merge.export.providers import INDEX_NAME, read_header, safetensors_files
from dfs_merge.export.tensors import Entry, FoldedLayers
from dfs_merge.route import Route

if TYPE_CHECKING:
    from dfs_merge.models.sources import SourcePool

log = logging.getLogger(__name__)

VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
VERIFY_TOLERANCE_HALF = 5e-2
VERIFY_NEW_TOKENS = 16
VERIFY_PROMPTS = ("The capital of France is", "def add(a, b):\n    return")
VERIFY_MODES = ("quick", "full", "off")
QUICK_LOGITS_MAX_BYTES = 4 * 2**30
"""`quick` compares logits only where the written checkpoint and the sources each hold at most this (4 GiB):
beyond it, loading them for the comparison would cost more memory than the streamed write (`full` always
compares)."""


@dataclass(frozen=True)
class VerifyResult:
    """How closely a written checkpoint reproduces the stitched model."""

    max_abs_diff: float  # max |logit(export) - logit(stitched)| over the verify batch
    max_abs_logit: float  # max |logit(stitched)| over the same batch
    generations_equal: bool | None  # greedy continuations of every prompt identical (None: not compared)
    new_tokens: int
    problem: str | None = None  # why the comparison could not be made (non-finite logits)

    @property
    def rel_error(self) -> float:
        """max|Δlogit| / max|logit| (NaN when a model gave non-finite logits, or the reference's are all zero:
        0/0 is no agreement)."""
        if self.problem is not None or not math.isfinite(self.max_abs_diff) or not self.max_abs_logit > 0:
            return math.nan
        return self.max_abs_diff / self.max_abs_logit

    def text(self) -> str:
        """One line for the log and the model card."""
        if self.problem is not None:
            return self.problem
        text = f"max|Δlogit|/max|logit| = {self.rel_error:.2e} (max|Δ| {self.max_abs_diff:.2e})"
        if not self.new_tokens:
            return text + f" on {len(VERIFY_PROMPTS)} prompts; no generation compared"
        gen = {True: "identical", False: "DIFFERENT", None: "not compared"}[self.generations_equal]
        return text + f"; greedy generations ({self.new_tokens} new tokens) {gen}"


def logits_problem(name: str, logits: torch.Tensor) -> str | None:
    """Why `name`'s logits cannot be compared: non-finite (max() would drop a NaN and call the export identical),
    or all zero (a broken model, whose difference from another broken one is 0); None when they can."""
    if not bool(torch.isfinite(logits).all()):
        return f"{name} gives non-finite logits"
    if not bool(logits.any()):
        return f"{name} gives logits that are all zero"
    return None


def verify_tolerance(dtype: torch.dtype) -> float:
    """The largest max|Δlogit|/max|logit| an export in `dtype` may show."""
    return VERIFY_TOLERANCE.get(dtype, VERIFY_TOLERANCE_HALF)


def coarsest(*dtypes: torch.dtype | None) -> torch.dtype:
    """Of the floating dtypes a comparison went through (the merge's, the written one, the reference's),
    the one with the widest tolerance: it decides `check_verified`."""
    present = [d for d in dtypes if d is not None]
    return max(present, key=verify_tolerance) if present else torch.float32


def _verify_inputs(pool: SourcePool, vocab: int) -> list[torch.Tensor]:
    """Prompts as token ids (1 x n each): the fixed text prompts, or fixed id rows without a tokenizer."""
    tok = pool.tokenizer
    if tok is not None:
        rows = [tok(p, return_tensors="pt")["input_ids"] for p in VERIFY_PROMPTS]
        if all(r.numel() and int(r.max()) < vocab for r in rows):
            return rows
    return [torch.tensor([[(7 + 31 * i + 101 * j) % vocab for i in range(12)]]) for j in range(2)]


@dataclass(frozen=True)
class Reference:
    """The stitched model's side of a logit check, computed once (`reference_outputs`), before or while the
    checkpoint is written: the rows both models run, the stitched model's logits on each, and for the full
    check its greedy continuation of each prompt."""

    rows: list[torch.Tensor]  # token ids, 1 x n each, on the reference's device
    logits: list[torch.Tensor]  # the stitched model's, float32, one per row
    dtype: torch.dtype  # the reference's: the checkpoint is loaded in it unless told otherwise
    device: torch.device
    generated: list[torch.Tensor] | None = None  # full: the greedy continuation of each prompt (the first rows)
    generate_kwargs: dict[str, Any] | None = None


@torch.no_grad()
def reference_outputs(reference: SourcePool | Callable[[], SourcePool], route: Route, *,
                      full: bool = False) -> Reference:
    """Run the verify batch through the stitched model over `reference` (a pool, or a callable that loads one).

    Quick (`compare_logits`): the prompts as one row, logits only. `full` (`verify_export`): each prompt and a
    32-token id row, then each prompt continued greedily for `VERIFY_NEW_TOKENS` tokens. A loaded pool is
    dropped before this returns, so that the checkpoint can be loaded after it without both in memory.
    """
    from dfs_merge.stitch import stitch

    pool = reference() if callable(reference) else reference
    device = pool.device
    vocab = int(pool.base.config.get_text_config(decoder=True).vocab_size)
    prompts = [ids.to(device) for ids in _verify_inputs(pool, vocab)]
    stitched = stitch(pool, route)
    if not full:
        rows = [torch.cat(prompts, dim=1)]
        return Reference(rows, [stitched(input_ids=rows[0]).logits.float()], pool.dtype, device)
    rows = [*prompts, torch.tensor([[(3 + 37 * i) % vocab for i in range(32)]], device=device)]
    pad = getattr(pool.tokenizer, "pad_token_id", None) if pool.tokenizer is not None else None
    kw = dict(max_new_tokens=VERIFY_NEW_TOKENS, do_sample=False, num_beams=1, pad_token_id=pad if pad is not None else 0)
    logits = [stitched(input_ids=ids).logits.float() for ids in rows]
    generated = [stitched.generate(ids, attention_mask=torch.ones_like(ids), **kw) for ids in prompts]
    return Reference(rows, logits, pool.dtype, device, generated, kw)


@torch.no_grad()
def compare_written(ref: Reference, folder: str | Path, dtype: torch.dtype | None = None,
                    tolerance: float | None = None, *, gguf_file: str | None = None) -> VerifyResult:
    """The checkpoint in `folder` (loaded by transformers in `dtype`, default the reference's, as a user loads
    it) on the reference's rows, against the stitched model's logits; for a full reference, then its greedy
    continuations, unless the logits already miss `tolerance`. With `gguf_file`, the checkpoint is that GGUF
    file in `folder`, read by transformers' GGUF loader."""
    new_tokens = VERIFY_NEW_TOKENS if ref.generated is not None else 0
    loaded = _load_written(folder, dtype or ref.dtype, ref.device, gguf_file)
    diff = top = 0.0
    for ids, a in zip(ref.rows, ref.logits, strict=True):
        b = loaded(input_ids=ids).logits.float()
        for name, logits in (("the stitched model", a), ("the written checkpoint", b)):
            problem = logits_problem(name, logits)
            if problem is not None:
                return VerifyResult(math.nan, math.nan, None, new_tokens, problem)
        if a.shape != b.shape:
            return VerifyResult(math.nan, math.nan, None, new_tokens, f"the written checkpoint gives logits of "
                                f"shape {list(b.shape)}, the stitched model {list(a.shape)}")
        diff = max(diff, float((a - b).abs().max()))
        top = max(top, float(a.abs().max()))
    if ref.generated is None or (tolerance is not None and not diff <= tolerance * top):
        return VerifyResult(diff, top, None, new_tokens)
    same = True
    for ids, ga in zip(ref.rows[: len(ref.generated)], ref.generated, strict=True):  # the prompts
        gb = loaded.generate(ids, attention_mask=torch.ones_like(ids), **(ref.generate_kwargs or {}))
        same = same and ga.shape == gb.shape and bool((ga == gb).all())
    return VerifyResult(diff, top, same, new_tokens)


def verify_export(reference: SourcePool | Callable[[], SourcePool], route: Route, folder: str | Path,
                  tolerance: float | None = None, *, gguf_file: str | None = None) -> VerifyResult:
    """The full check: the checkpoint in `folder` against the stitched model over `reference` on a fixed batch.

    Logits are compared on every prompt and on a 32-token id sequence; each prompt is then continued greedily
    for `VERIFY_NEW_TOKENS` tokens by both models (the checkpoint's skipped when its logits already miss
    `tolerance`). The stitched model runs first; a callable `reference` is loaded for it and dropped before
    the checkpoint is loaded, so that the two models are never in memory together. With `gguf_file`, the
    checkpoint is that GGUF file in `folder`, read by transformers' GGUF loader.
    """
    return compare_written(reference_outputs(reference, route, full=True), folder, tolerance=tolerance,
                           gguf_file=gguf_file)


def _load_written(folder: str | Path, dtype: torch.dtype, device: torch.device, gguf_file: str | None = None) -> Any:
    """The written checkpoint as transformers loads it (`from_pretrained`, no remote code), in eval mode."""
    from transformers import AutoModelForCausalLM

    placement: dict[str, Any] = {} if device.type == "cpu" else {"device_map": str(device)}
    if gguf_file is not None:
        placement["gguf_file"] = gguf_file
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"the written checkpoint does not load ({one_line(err)})") from None
    return loaded.to(device).eval()


def compare_logits(reference: SourcePool | Callable[[], SourcePool], route: Route, folder: str | Path,
                   dtype: torch.dtype | None = None) -> VerifyResult:
    """The quick logit check: the verify prompts, as one row, through the stitched model over `reference` and
    through the checkpoint in `folder` (loaded in `dtype`, default the reference's), logits only.

    A callable `reference` is loaded, used and dropped before the checkpoint is loaded, so that the two
    models are never in memory together.
    """
    return compare_written(reference_outputs(reference, route), folder, dtype)


@dataclass(frozen=True)
class TensorCheck:
    """What `check_tensors` read back."""

    tensors: int
    nbytes: int

    def text(self) -> str:
        """One line for the log and the model card."""
        return (f"{self.tensors} tensors ({self.nbytes / 2**20:.0f} MB) read back equal bit for bit to their "
                "sources' (cast and scales folded as planned)")


_SAME_WIDTH = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (a NaN equals itself, -0.0 differs from 0.0), compared as integers: the widest that the
    bytes of both split into (fewer, wider comparisons; the same bits either way)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    x, y = (t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b))
    width = next(w for w in _SAME_WIDTH if x.numel() % w == 0
                 and all(t.data_ptr() % w == 0 and t.storage_offset() % w == 0 for t in (x, y)))
    return torch.equal(x.view(_SAME_WIDTH[width]), y.view(_SAME_WIDTH[width]))


def check_tensors(folder: Path, entries: Sequence[Entry], feed: FoldedLayers, *,
                  hold: Callable[[Entry], contextlib.AbstractContextManager[object]] | None = None) -> TensorCheck:
    """Read every tensor written in `folder` back and compare it bit for bit with what `feed` computes from the
    sources for its entry; the files must hold exactly the planned names, dtypes and shapes (and the index,
    where there is one, name the file that holds each). An ExportError names the first tensor that differs.

    The files are read with safetensors, as a user reads them, in the order of `entries`, through a memory map
    opened for each run of one hop's entries in one file (each tensor outside the layers: one of its own) and
    closed after it, so that the check holds one layer (and the feed's one layer) at a time. `hold(entry)`, where
    given, is held while that entry is read and compared (a memory gate: `overlap.MemoryGate`).
    """
    from safetensors import safe_open

    files = safetensors_files(folder) or []
    where: dict[str, tuple[Path, torch.dtype, tuple[int, ...]]] = {}
    for file in files:
        for name, (dt, shape) in read_header(file).items():
            where[name] = (file, dt, shape)
    planned = {e.name for e in entries}
    extra, missing = sorted(set(where) - planned), sorted(planned - set(where))
    if extra or missing:
        what = f"holds {extra[0]}, which was not planned" if extra else f"lacks {missing[0]}"
        raise ExportError(f"verify failed: the written checkpoint {what}; nothing was written")
    index = folder / INDEX_NAME
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    for e in entries:
        file, dt, shape = where[e.name]
        if weight_map is not None and weight_map.get(e.name) != file.name:
            raise ExportError(f"verify failed: the index names {weight_map.get(e.name)} for {e.name}, which "
                              f"{file.name} holds; nothing was written")
        if (dt, shape) != (e.dtype, e.shape):
            raise ExportError(f"verify failed: {e.name} in {file.name} is {dt} {list(shape)}, planned "
                              f"{e.dtype} {list(e.shape)}; nothing was written")

    def run_of(e: Entry) -> tuple[Path, int | None, str | None]:
        return where[e.name][0], e.hop, e.name if e.hop is None else None

    for (file, *_), run in itertools.groupby(entries, key=run_of):
        with safe_open(str(file), framework="pt") as f:
            for e in run:
                with hold(e) if hold is not None else contextlib.nullcontext():
                    written, expected = f.get_tensor(e.name), feed.tensor(e)
                    if not _same_bits(written, expected):
                        raise ExportError(f"verify failed: {e.name} in {file.name} differs from its source tensor "
                                          f"({_origin(e, feed)}) in {_differing(written, expected)} of "
                                          f"{expected.numel()} values; nothing was written")
                    del written, expected
    return TensorCheck(len(entries), sum(e.nbytes for e in entries))


def _origin(e: Entry, feed: FoldedLayers) -> str:
    """Where an entry's tensor comes from, for an error message."""
    if e.hop is None:
        return f"source {e.source}'s {e.key}"
    return f"source {e.source} layer {feed.route[e.hop].layer}, scale product {feed.products[e.hop]:.6g}"


def _differing(written: torch.Tensor, expected: torch.Tensor) -> int | str:
    """How many values of two tensors differ (`all` where their shapes do)."""
    return int((written.float() != expected.float()).sum()) if written.shape == expected.shape else "all"


def check_verified(result: VerifyResult, dtype: torch.dtype) -> None:
    """Refuse an export whose logits or greedy generations differ from the stitched model's.

    In float32/float64 differing generations are an error; in half precision they are near-ties
    and only logged, as long as the logits agree.
    """
    tol = verify_tolerance(dtype)
    if result.problem is not None:
        raise ExportError(f"verify failed: {result.problem} (a NaN, inf or huge scale or weight?); nothing was written")
    if not math.isfinite(result.rel_error) or result.rel_error > tol:
        raise ExportError(f"verify failed: the checkpoint's logits differ from the stitched model's, {result.text()} "
                          f"(tolerance {tol:g}); nothing was written")
    if result.generations_equal is False:
        if dtype in VERIFY_TOLERANCE:
            raise ExportError(f"verify failed: the checkpoint's greedy generations differ from the stitched model's, "
                              f"{result.text()}; nothing was written")
        log.warning("verify: greedy generations differ in %s (near-ties); logits agree: %s", dtype, result.text())
