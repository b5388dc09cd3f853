"""Checking a written checkpoint against the in-memory stitched model before it is published.

`verify_export` loads the folder with transformers and compares it with `stitch(pool,
route)` on a fixed batch (logits, then greedy generations); `check_verified` turns a
result outside the dtype's tolerance (`verify_tolerance`) into an ExportError.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dfs_merge.errors import ExportError, one_line
from dfs_merge.genome import Route
from dfs_merge.models.sources import SourcePool

log = logging.getLogger(__name__)

VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
VERIFY_TOLERANCE_HALF = 5e-2
VERIFY_NEW_TOKENS = 16
VERIFY_PROMPTS = ("The capital of France is", "def add(a, b):\n    return")


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
        """max|Δlogit| / max|logit| (NaN when a model gave non-finite logits)."""
        if self.problem is not None or not math.isfinite(self.max_abs_diff):
            return math.nan
        return self.max_abs_diff / max(self.max_abs_logit, 1e-30)

    def text(self) -> str:
        """One line for the log and the model card."""
        if self.problem is not None:
            return self.problem
        gen = {True: "identical", False: "DIFFERENT", None: "not compared"}[self.generations_equal]
        return (
            f"max|Δlogit|/max|logit| = {self.rel_error:.2e} (max|Δ| {self.max_abs_diff:.2e}); "
            f"greedy generations ({self.new_tokens} new tokens) {gen}"
        )


def verify_tolerance(dtype: torch.dtype) -> float:
    """The largest max|Δlogit|/max|logit| an export in `dtype` may show."""
    return VERIFY_TOLERANCE.get(dtype, VERIFY_TOLERANCE_HALF)


def _verify_inputs(pool: SourcePool, vocab: int) -> list[torch.Tensor]:
    """Prompts as token ids (1 x n each): the fixed text prompts, or fixed id rows without a tokenizer."""
    tok = pool.tokenizer
    if tok is not None:
        rows = [tok(p, return_tensors="pt")["input_ids"] for p in VERIFY_PROMPTS]
        if all(r.numel() and int(r.max()) < vocab for r in rows):
            return rows
    return [torch.tensor([[(7 + 31 * i + 101 * j) % vocab for i in range(12)]]) for j in range(2)]


@torch.no_grad()
def verify_export(pool: SourcePool, route: Route, folder: str | Path, tolerance: float | None = None, *,
                  gguf_file: str | None = None) -> VerifyResult:
    """Load the checkpoint in `folder` and compare it with the stitched model on a fixed batch.

    Logits are compared on every prompt and on a 32-token id sequence; each prompt is then
    continued greedily for `VERIFY_NEW_TOKENS` tokens by both models (skipped when the
    logits already miss `tolerance`). With `gguf_file`, the checkpoint is that GGUF file in `folder`,
    read by transformers' GGUF loader.
    """
    from transformers import AutoModelForCausalLM

    from dfs_merge.stitch import stitch

    stitched = stitch(pool, route)
    placement = {} if pool.device.type == "cpu" else {"device_map": str(pool.device)}
    try:
        if gguf_file is not None:
            placement["gguf_file"] = gguf_file
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=pool.dtype, **placement)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"the written checkpoint does not load ({one_line(err)})") from None
    loaded = loaded.to(pool.device).eval()
    vocab = int(loaded.config.get_text_config(decoder=True).vocab_size)
    prompts = _verify_inputs(pool, vocab)
    batch = [*prompts, torch.tensor([[(3 + 37 * i) % vocab for i in range(32)]])]
    diff = top = 0.0
    for ids in batch:
        ids = ids.to(pool.device)
        a = stitched(input_ids=ids).logits.float()
        b = loaded(input_ids=ids).logits.float()
        for name, logits in (("the stitched model", a), ("the written checkpoint", b)):
            if not bool(torch.isfinite(logits).all()):  # max() would drop a NaN and call the export identical
                del loaded
                return VerifyResult(math.nan, math.nan, None, VERIFY_NEW_TOKENS, f"{name} gives non-finite logits")
        diff = max(diff, float((a - b).abs().max()))
        top = max(top, float(a.abs().max()))
    if tolerance is not None and not diff <= tolerance * top:
        del loaded
        return VerifyResult(diff, top, None, VERIFY_NEW_TOKENS)
    same = True
    pad = getattr(pool.tokenizer, "pad_token_id", None) if pool.tokenizer is not None else None
    for ids in prompts:
        ids = ids.to(pool.device)
        kw = dict(
            attention_mask=torch.ones_like(ids), max_new_tokens=VERIFY_NEW_TOKENS, do_sample=False,
            num_beams=1, pad_token_id=pad if pad is not None else 0,
        )
        ga = stitched.generate(ids, **kw)
        gb = loaded.generate(ids, **kw)
        same = same and ga.shape == gb.shape and bool((ga == gb).all())
    del loaded
    return VerifyResult(diff, top, same, VERIFY_NEW_TOKENS)


def check_verified(result: VerifyResult, dtype: torch.dtype) -> None:
    """Refuse an export whose logits or greedy generations differ from the stitched model's.

    In float32/float64 differing generations are an error; in half precision they are near-ties
    and only logged, as long as the logits agree.
    """
    tol = verify_tolerance(dtype)
    if result.problem is not None:
        raise ExportError(f"verify failed: {result.problem} (a NaN or inf scale or weight?); nothing was written")
    if not math.isfinite(result.rel_error) or result.rel_error > tol:
        raise ExportError(f"verify failed: the checkpoint's logits differ from the stitched model's, {result.text()} "
                          f"(tolerance {tol:g}); nothing was written")
    if result.generations_equal is False:
        if dtype in VERIFY_TOLERANCE:
            raise ExportError(f"verify failed: the checkpoint's greedy generations differ from the stitched model's, "
                              f"{result.text()}; nothing was written")
        log.warning("verify: greedy generations differ in %s (near-ties); logits agree: %s", dtype, result.text())
