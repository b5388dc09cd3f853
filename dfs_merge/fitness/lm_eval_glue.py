"""What adapts lm-eval (0.4.13) to scoring many candidates in one process: the offline environment,
quieter logs and progress bars, and the `HFLM` subclass each candidate is wrapped in.

lm-eval, `datasets` and `huggingface_hub` are imported lazily, inside the functions, so that importing
this module (or the fitness package) stays cheap and `offline_env` can run before any of them is loaded.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import inspect
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _default_cache_dir() -> Path:
    from dfs_merge.models.store import cache_root

    return cache_root() / "lm-eval"


def offline_env(cache_dir: str | Path | None = None) -> Path:
    """Point Hugging Face and lm-eval at `cache_dir` and turn off hub access; returns the folder.

    Sets HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, HF_HOME, HF_DATASETS_CACHE and
    LM_HARNESS_CACHE_PATH (under `cache_dir`, default `<dfs-merge cache>/lm-eval`), each only
    where the environment does not set it already: `HF_HUB_OFFLINE=0` lets registry tasks
    download on a machine that can. Call it before lm-eval is imported (this module imports
    lm-eval lazily); where `datasets` or `huggingface_hub` were imported already, their
    offline switches and the datasets cache path are updated too.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    wanted = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(root / "hf"),
        "HF_DATASETS_CACHE": str(root / "hf" / "datasets"),
        "LM_HARNESS_CACHE_PATH": str(root / "requests"),
    }
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    _sync_imported_hf_modules()
    return root


def _sync_imported_hf_modules() -> None:
    """Make already-imported `huggingface_hub` / `datasets` honour the environment set above.

    Both read their offline switches and cache path into module constants at import time, so a
    change to the environment after that import is not seen unless the constants are updated too.
    """
    import sys

    true = {"1", "ON", "YES", "TRUE"}
    hub_offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in true
    ds_offline = os.environ.get("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "")).upper() in true
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and hasattr(hub, "HF_HUB_OFFLINE"):
        hub.HF_HUB_OFFLINE = hub_offline
    ds = sys.modules.get("datasets.config")
    if ds is not None:
        ds.HF_HUB_OFFLINE = ds_offline
        ds.HF_DATASETS_OFFLINE = ds_offline
        ds.HF_DATASETS_CACHE = Path(os.environ["HF_DATASETS_CACHE"])


# --------------------------------------------------------------------------- logs and progress bars


class _DropChatter(logging.Filter):
    """Drops lm-eval warnings that are noise here: HFLM's two for every candidate built from a model
    object, and the hint about the `--metadata` CLI flag for every task with a `custom_dataset`."""

    PHRASES = (
        "model kwarg is not of type `str`",
        "Passed an already-initialized model",
        "Custom kwargs can be passed to `--metadata`",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p in msg for p in self.PHRASES)


class _TruncationsOncePerTask(logging.Filter):
    """Lets lm-eval's warning that a document was cut to `max_length` through once per task, and counts the rest.

    HFLM warns for every request whose context is too long, so a task with long documents gives the same
    warning for each of its requests for every candidate, and the lines bury the progress bar. The task is the
    one `scoring_task` names (None outside it); `counts` holds every truncation warning seen, by task.
    """

    PHRASES = (
        "exceeds model's maximum length",  # HFLM._loglikelihood_tokens: context + continuation too long
        "Left truncation applied",  # HFLM.tok_batch_encode: a generation prompt too long
        "exceeds model's max length",  # lm_eval.models.utils.maybe_truncate
    )

    def __init__(self) -> None:
        super().__init__()
        self.task: contextvars.ContextVar[str | None] = contextvars.ContextVar("lm_eval_task", default=None)
        self.counts: collections.Counter[str | None] = collections.Counter()

    def reset(self) -> None:
        """Forget the tasks already warned about (the next truncation of each is shown again)."""
        self.counts.clear()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not any(p in msg for p in self.PHRASES):
            return True
        task = self.task.get()
        self.counts[task] += 1
        if self.counts[task] > 1:
            return False
        where = f"task {task}" if task else "lm-eval"
        record.msg = f"{msg} [{where}: documents longer than max_length are cut; shown once, not per request]"
        record.args = ()
        return True


TRUNCATIONS = _TruncationsOncePerTask()
"""The filter `quiet_lm_eval` installs; `TRUNCATIONS.counts` is how many truncation warnings each task gave."""


@contextlib.contextmanager
def scoring_task(name: str) -> Iterator[None]:
    """Attribute lm-eval's truncation warnings inside the block to task `name` (see `TRUNCATIONS`)."""
    token = TRUNCATIONS.task.set(name)
    try:
        yield
    finally:
        TRUNCATIONS.task.reset(token)


@functools.cache
def quiet_lm_eval() -> None:
    """lm-eval logs INFO lines per task and per call: keep WARNING and above, minus per-candidate chatter, and
    its truncation warnings once per task."""
    logger = logging.getLogger("lm_eval")
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    for name in ("lm_eval.models.huggingface", "lm_eval.api.task"):
        logging.getLogger(name).addFilter(_DropChatter())
    for name in ("lm_eval.models.huggingface", "lm_eval.models.utils", "lm_eval.utils"):
        logging.getLogger(name).addFilter(TRUNCATIONS)


@contextlib.contextmanager
def no_request_bars() -> Iterator[None]:
    """Hide the progress bar that `Task.build_all_requests` draws (lm-eval offers no switch for it)."""
    import lm_eval.api.task as task_module

    original = task_module.tqdm
    task_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = original


@contextlib.contextmanager
def no_build_bars() -> Iterator[None]:
    """Hide the progress bars drawn while tasks are built: `datasets`' (loading data) and lm-eval's
    request bar; `datasets`' bars are turned back on afterwards if they were on."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with no_request_bars():
            yield
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------- the LM wrapper


def first_scored_positions(requests: Any, max_length: int) -> dict[tuple[int, ...], int]:
    """For each model input HFLM builds from a loglikelihood request (context + continuation, left-truncated to
    `max_length + 1` tokens, its last token dropped): the first position whose logits are scored, i.e. where
    the continuation's predictions start. Equal inputs keep the earliest such position."""
    first: dict[tuple[int, ...], int] = {}
    for _, context, continuation in requests:
        window = tuple((context + continuation)[-(max_length + 1):][:-1])
        start = max(len(window) - len(continuation), 0)
        first[window] = min(start, first.get(window, start))
    return first


def logits_to_keep(rows: list[list[int]], first: dict[tuple[int, ...], int]) -> int:
    """How many trailing positions of a right-padded batch hold every scored logit (0: all of them, also when a
    row is not one of the requests). A row is found by its unpadded tokens: HFLM pads with 0, which may also
    be a real token, so every request length from the row's last non-zero token to its width is tried and
    the earliest scored position among the matches is kept."""
    lengths = {len(k) for k in first}
    width = len(rows[0]) if rows else 0
    start = width
    for row in rows:
        nonzero = len(row)
        while nonzero and row[nonzero - 1] == 0:
            nonzero -= 1
        hits = [first[key] for end in range(nonzero, len(row) + 1)
                if end in lengths and (key := tuple(row[:end])) in first]
        if not hits:
            return 0
        start = min(start, *hits)
    return width - start if start > 0 else 0


@functools.cache
def candidate_lm_class() -> type:
    """HFLM, minus progress bars, plus tokenisation memoised across candidates, plus logits only where they are
    scored (built lazily).

    `HFLM(pretrained=<model object>)` is cheap to construct (about 1 ms: no config or weights are
    loaded for a model object), so each candidate gets a fresh one. Every candidate shares the base's
    tokenizer, so a tokenisation made for one candidate holds for all: it is kept in `memo`, a dict the
    caller keeps per tokenizer.

    Logits where scored: for a loglikelihood request lm-eval keeps only the continuation's positions of the
    model's logits, after a log-softmax over every position. Here the model computes its LM head (and lm-eval
    its log-softmax) only over the trailing positions of the batch that hold a continuation, through
    transformers' `logits_to_keep`; lm-eval's own arithmetic for a shorter logits tensor (its "virtual
    tokens" offset) then picks the same positions. Rolling perplexity scores every position and keeps them
    all. `scored_logits_only=False` restores the full computation (the reference in tests and benchmarks).
    """
    from lm_eval.models.huggingface import HFLM

    class CandidateLM(HFLM):
        """An `HFLM` over a model object whose tokenisations are shared through `memo`."""

        def __init__(self, *args: Any, memo: dict[Any, list[int] | tuple[list[int], list[int]]],
                     scored_logits_only: bool = True, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._memo = memo
            self._first_scored: dict[tuple[int, ...], int] | None = None
            self._trim = scored_logits_only and "logits_to_keep" in inspect.signature(self.model.forward).parameters

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
            if kwargs:
                return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            key = ("encode", string, add_special_tokens, left_truncate_len)
            hit = self._memo.get(key)
            if hit is None:
                hit = self._memo[key] = super().tok_encode(string, add_special_tokens, left_truncate_len)
            return list(hit)

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            key = ("pair", context, continuation)
            hit = self._memo.get(key)
            if hit is None:
                hit = self._memo[key] = super()._encode_pair(context, continuation)
            return list(hit[0]), list(hit[1])

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests: Any, disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> Any:
            if self._trim and self.backend == "causal":
                self._first_scored = first_scored_positions(requests, self.max_length)
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            finally:
                self._first_scored = None

        def _model_call(self, inps: Any, attn_mask: Any = None, labels: Any = None) -> Any:
            if self._first_scored is None or attn_mask is not None or labels is not None:
                return super()._model_call(inps, attn_mask, labels)
            import torch

            keep = logits_to_keep(inps.tolist(), self._first_scored)
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                return self.model(inps, logits_to_keep=keep).logits

    return CandidateLM


@functools.cache
def candidate_vlm_class() -> type:
    """lm-eval's multimodal LM (`hf-multimodal`, `HFMultimodalLM`) over a vision-language model object and its
    processor, minus progress bars (built lazily).

    lm-eval 0.4.13 drops a processor object given as `tokenizer=` (its `_create_tokenizer` returns it unset); here
    it becomes the LM's `processor`, its tokenizer the LM's `tokenizer`, as they are for a model lm-eval loads
    itself. A task's `<image>` becomes the placeholder the processor expands (its `image_token`), not the token
    the model's config names: Gemma 3's processor expands `<start_of_image>` into the `<image_soft_token>`s its
    config names. lm-eval scores image tasks by generation (`generate_until`); its multimodal loglikelihood is not
    implemented there, so an image task must be a generation task.
    """
    from lm_eval.models.hf_vlms import HFMultimodalLM

    class CandidateVLM(HFMultimodalLM):
        """An `HFMultimodalLM` over a vision-language model object, its processor given as `tokenizer`."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.image_token = getattr(self.processor, "image_token", None) or self.image_token

        def _create_tokenizer(self, pretrained: Any, tokenizer: Any, **kwargs: Any) -> None:
            self.processor = tokenizer
            self.tokenizer = tokenizer.tokenizer

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=True)

    return CandidateVLM
