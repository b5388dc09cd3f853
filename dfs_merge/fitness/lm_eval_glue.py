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


@functools.cache
def compile_templates_once() -> None:
    """Keep each Jinja template lm-eval compiles: `lm_eval.utils.apply_template` compiles its template string anew
    for every document (the target of every scored document, the prompt of every request), which cost a quarter
    of a zoo search's time. A compiled template renders as the string does; the cache holds one per distinct
    template string of the tasks built (a few per task)."""
    import lm_eval.utils

    env = lm_eval.utils.env
    compile_string = env.from_string

    @functools.lru_cache(maxsize=4096)
    def compiled(source: str) -> Any:
        return compile_string(source)

    def from_string(source: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(source, str) and not args and not kwargs:
            return compiled(source)
        return compile_string(source, *args, **kwargs)

    env.from_string = from_string


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


def shared_context_groups(requests: Any, max_length: int) -> tuple[list[list[int]], list[int]]:
    """Split loglikelihood requests `(strings, context tokens, continuation tokens)` by their context: the groups
    of 2 or more requests with the same context tokens (as indices into `requests`), and every other request's
    index. A request HFLM would left-truncate (context + continuation over `max_length + 1` tokens) or with an
    empty context is among the others: its model input is not its context followed by its continuation."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (_, context, continuation) in enumerate(requests):
        if context and len(context) + len(continuation) <= max_length + 1:
            by_context.setdefault(tuple(context), []).append(i)
    groups = [g for g in by_context.values() if len(g) > 1]
    grouped = {i for g in groups for i in g}
    return groups, [i for i in range(len(requests)) if i not in grouped]


def context_batches(requests: Any, groups: list[list[int]], limit: int,
                    mixed_lengths: bool = False) -> list[list[list[int]]]:
    """The groups of `shared_context_groups` in batches for one forward each, longest context first. With
    `mixed_lengths`, up to `limit` contexts a batch (and at most 4 x `limit` requests), right-padded to the longest;
    without, only contexts of one length together (up to `limit` requests), so that no padding sits between a
    context and its continuations. A group over the request bound goes alone."""
    batches: list[list[list[int]]] = []
    rows = 0
    for g in sorted(groups, key=lambda g: -len(requests[g[0]][1])):
        if not batches:
            fits = False
        elif mixed_lengths:
            fits = len(batches[-1]) < limit and rows + len(g) <= 4 * limit
        else:
            fits = len(requests[batches[-1][0][0]][1]) == len(requests[g[0]][1]) and rows + len(g) <= limit
        if fits:
            batches[-1].append(g)
            rows += len(g)
        else:
            batches.append([g])
            rows = len(g)
    return batches


def same_attention_everywhere(config: Any) -> bool:
    """Whether every layer attends over the whole sequence (no sliding window): then a row's keys can be told apart
    by an attention mask alone, and contexts of different lengths can share a padded batch. A sliding window
    counts distances in cache positions, which padding between a context and its continuation would stretch."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return all(t == "full_attention" for t in layer_types)
    return getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False


def gold_answer(task: Any, doc: Any) -> str | None:
    """The answer a generation task compares its generation with, as lm-eval's `process_results` takes it (a choice
    named by its index where the task has choices); None for a task with several right answers."""
    target = task.doc_to_target(doc)
    if task.config.doc_to_choice is not None and isinstance(target, int):
        target = task.doc_to_choice(doc)[target]
    if getattr(task, "multiple_target", False) or isinstance(target, (list, tuple, dict, bool)) or target is None:
        return None
    return str(target)


@functools.cache
def candidate_lm_class() -> type:
    """HFLM, minus progress bars, plus tokenisation memoised across candidates, plus logits only where they are
    scored, plus each shared context run once (built lazily).

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

    Shared contexts: lm-eval scores a multiple-choice item as one request per choice, each running the whole
    question again (with 4 choices of 1-3 tokens after a question of 20, nearly 3/4 of the positions are
    a repeat). Here the requests with the same context tokens (`shared_context_groups`) run it once, keeping its
    KV cache and its last position's logits (the first continuation token's), then every continuation but its
    last token as one right-padded batch over that cache, repeated per request: the same attention over the same
    keys as the full sequence, so the same scores within float rounding, summed and compared with the greedy
    tokens as lm-eval does, in lm-eval's order. Questions of different lengths share a batch, right-padded (the
    padding after a question changes nothing before it; over the cache, an attention mask hides it and each row's
    positions go on from its own question's length), except in a model with sliding-window layers, whose batches hold
    questions of one length. A context alone (answer tasks), a request lm-eval would truncate,
    rolling perplexity (whose windows share at most a one-token prefix) and a model that keeps no KV cache go
    the way above. A stitched model's prefix cache (`stitch.ActivationCache`) sits out these forwards, as it does
    any forward with a KV cache. `shared_contexts=False` runs every request whole (the reference in tests).
    """
    from lm_eval.models.huggingface import HFLM

    class CandidateLM(HFLM):
        """An `HFLM` over a model object whose tokenisations are shared through `memo`."""

        def __init__(self, *args: Any, memo: dict[Any, list[int] | tuple[list[int], list[int]]],
                     scored_logits_only: bool = True, shared_contexts: bool = True, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._memo = memo
            self._first_scored: dict[tuple[int, ...], int] | None = None
            params = inspect.signature(self.model.forward).parameters
            self._keeps_logits = "logits_to_keep" in params
            self._trim = scored_logits_only and self._keeps_logits
            self._share = shared_contexts and "past_key_values" in params and "use_cache" in params
            self._rolling = False
            # answer tasks (generate_until) whose gold answer's log-likelihood `generate_until` also records, by
            # context: racing's smooth statistic for them (`score.right_probabilities`)
            self.answer_tasks: dict[str, Any] = {}
            self.answer_loglikelihoods: dict[str, float] = {}
            self._first_token_wanted: dict[tuple[int, ...], int] = {}
            self._first_token_seen: dict[tuple[int, ...], float] = {}

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
            self._rolling = True
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=True)
            finally:
                self._rolling = False

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            """lm-eval's generations; for the requests of `answer_tasks` also the log-likelihood of each gold answer
            (the task's target after its delimiter, as a loglikelihood request would put it), into
            `answer_loglikelihoods`. A one-token answer is read off the generation's own first forward (the log-
            softmax at the context's last position); a longer one, or a context the generation encoded otherwise,
            costs one more forward of context and answer (logits where scored)."""
            answers = {}
            for r in requests:
                task = self.answer_tasks.get(getattr(r, "task_name", None))
                target = gold_answer(task, r.doc) if task is not None else None
                if target is not None:
                    context = r.args[0]
                    answers[context] = self._encode_pair(context, f"{task.config.target_delimiter}{target}")
            self._first_token_wanted = {tuple(c): a[0] for c, a in answers.values() if len(a) == 1}
            self._first_token_seen = {}
            try:
                out = super().generate_until(requests, disable_tqdm=True)
            finally:
                self._first_token_wanted = {}
            rest = []
            for context, (context_enc, answer_enc) in answers.items():
                seen = self._first_token_seen.get(tuple(context_enc)) if len(answer_enc) == 1 else None
                if seen is None:
                    rest.append(((context, None), context_enc, answer_enc))
                else:
                    self.answer_loglikelihoods[context] = seen
            if rest:
                for (key, _, _), (ll, _) in zip(rest, self._loglikelihood_tokens(rest), strict=True):
                    self.answer_loglikelihoods[key[0]] = ll
            return out

        def _model_generate(self, context: Any, max_length: int, stop: list[str], **generation_kwargs: Any) -> Any:
            """HFLM's generation; the log-probability of each wanted first answer token taken from its first
            forward (a forward hook, removed after that forward)."""
            import torch.nn.functional as F

            mask = generation_kwargs.get("attention_mask")
            rows = {}
            for i, row in enumerate(context.tolist() if self._first_token_wanted else ()):
                key = tuple(row if mask is None else [t for t, m in zip(row, mask[i].tolist(), strict=True) if m])
                if key in self._first_token_wanted:
                    rows[i] = key
            if not rows:
                return super()._model_generate(context, max_length, stop, **generation_kwargs)

            def first_forward(module: Any, args: Any, output: Any) -> None:
                handle.remove()
                logits = output.logits if hasattr(output, "logits") else output[0]
                logp = F.log_softmax(logits[:, -1].float(), dim=-1)
                for i, key in rows.items():
                    self._first_token_seen[key] = float(logp[i, self._first_token_wanted[key]])

            handle = self.model.register_forward_hook(first_forward)
            try:
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            finally:
                handle.remove()

        def _loglikelihood_tokens(self, requests: Any, disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> Any:
            results: list[tuple[float, bool] | None] = [None] * len(requests)
            rest = list(range(len(requests)))
            if self._share and self.backend == "causal" and not self._rolling:
                groups, rest = shared_context_groups(requests, self.max_length)
                limit = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 1)
                mixed = same_attention_everywhere(self.model.config)
                for batch in context_batches(requests, groups, limit, mixed_lengths=mixed):
                    answers = self._shared_context_scores(requests, batch) if self._share else None
                    if answers is None:  # the model kept no KV cache: this batch and the next go the plain way
                        self._share = False
                        rest.extend(i for g in batch for i in g)
                        continue
                    for i, answer in answers.items():
                        results[i] = answer
                rest.sort()
            if rest:
                plain = self._whole_requests([requests[i] for i in rest], override_bs)
                for i, answer in zip(rest, plain, strict=True):
                    results[i] = answer
            return results

        def _whole_requests(self, requests: Any, override_bs: int | None) -> Any:
            """HFLM's scoring, each request's context and continuation in one forward (logits where scored)."""
            if self._trim and self.backend == "causal":
                self._first_scored = first_scored_positions(requests, self.max_length)
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            finally:
                self._first_scored = None

        def _shared_context_scores(self, requests: Any, batch: list[list[int]]) -> dict[int, tuple[float, bool]] | None:
            """(log-likelihood, is greedy) of each request of `batch`'s groups, by index; None where the model returns
            no KV cache. Contexts of different lengths are right-padded; their continuations then run under an
            attention mask that hides the padding, at positions that go on from each context's own length."""
            import torch
            import torch.nn.functional as F

            lengths = [len(requests[g[0]][1]) for g in batch]
            width_ctx = max(lengths)
            padded = min(lengths) < width_ctx
            contexts = torch.zeros(len(batch), width_ctx, dtype=torch.long, device=self.device)
            for k, g in enumerate(batch):
                contexts[k, :lengths[k]] = torch.tensor(requests[g[0]][1], dtype=torch.long)
            keep = width_ctx - min(lengths) + 1  # the trailing positions that hold every context's last one
            # the requests that score more than their first token: their continuations run over their group's cache
            longer = [(k, i) for k, g in enumerate(batch) for i in g if len(requests[i][2]) > 1]
            with self._forward_context():
                out = self.model(contexts, use_cache=True, **({"logits_to_keep": keep} if self._keeps_logits else {}))
                cache = out.past_key_values
                if cache is None or not hasattr(cache, "batch_select_indices"):
                    return None
                offset = out.logits.shape[1] - width_ctx  # position p is logits row p + offset
                last = torch.tensor([n - 1 + offset for n in lengths], device=self.device)
                first = F.log_softmax(out.logits[torch.arange(len(batch), device=self.device), last], dim=-1,
                                      dtype=self.softmax_dtype)  # [groups, vocab]
                if longer:
                    width = max(len(requests[i][2]) - 1 for _, i in longer)
                    inps = torch.zeros(len(longer), width, dtype=torch.long, device=self.device)  # right-padded
                    for row, (_, i) in enumerate(longer):
                        cont = requests[i][2][:-1]
                        inps[row, :len(cont)] = torch.tensor(cont, dtype=torch.long)
                    cache.batch_select_indices(torch.tensor([k for k, _ in longer], device=self.device))
                    extra: dict[str, Any] = {}
                    if padded:  # hide each row's padding after its context; its positions follow its context
                        starts = torch.tensor([lengths[k] for k, _ in longer], device=self.device)
                        mask = (torch.arange(width_ctx + width, device=self.device)[None] < starts[:, None]).long()
                        mask[:, width_ctx:] = 1
                        extra = {"attention_mask": mask,
                                 "position_ids": starts[:, None] + torch.arange(width, device=self.device)[None]}
                    after = F.log_softmax(self.model(inps, past_key_values=cache, use_cache=True, **extra).logits,
                                          dim=-1, dtype=self.softmax_dtype)  # [longer requests, width, vocab]
                del cache, out
            row_of = {i: row for row, (_, i) in enumerate(longer)}
            answers: dict[int, tuple[float, bool]] = {}
            for k, g in enumerate(batch):
                for i in g:
                    request_str, _, continuation = requests[i]
                    logits = first[k:k + 1]
                    if i in row_of:
                        logits = torch.cat([logits, after[row_of[i], :len(continuation) - 1]])
                    cont = torch.tensor(continuation, dtype=torch.long, device=self.device)
                    greedy = bool((logits.argmax(dim=-1) == cont).all())
                    answer = (float(torch.gather(logits, 1, cont.unsqueeze(-1)).sum()), greedy)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    answers[i] = answer
            return answers

        def _forward_context(self) -> Any:
            """What `HFLM._model_call` runs the model under: no gradients, autocast where mixed precision is set."""
            import torch

            stack = contextlib.ExitStack()
            stack.enter_context(torch.no_grad())
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                               enabled=self.mixed_precision_dtype is not None))
            return stack

        def _model_call(self, inps: Any, attn_mask: Any = None, labels: Any = None) -> Any:
            if self._first_scored is None or attn_mask is not None or labels is not None:
                return super()._model_call(inps, attn_mask, labels)
            keep = logits_to_keep(inps.tolist(), self._first_scored)
            with self._forward_context():
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
