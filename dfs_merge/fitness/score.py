"""Fitness: a stitched model scored on lm-eval tasks that were built once per process.

`Fitness(tasks={...})` finds each task in the bundled `eval_suites/` folders (and any
extra suite folders), loads its data and builds its requests **once** (`tasks.py`).
`score(model, tokenizer)` then runs `lm_eval.evaluator.evaluate` on those same task objects
for every candidate and combines each task's primary metric into one weighted score (higher
is better). A candidate that raises, runs out of memory or produces NaN/inf gets
`WORST_SCORE` and a one-line `error`; it never stops the run.

Tasks that show images (a `doc_to_image` in their YAML, such as the bundled `image_qa_*`) are scored through
lm-eval's multimodal model type (`hf-multimodal`) over a vision-language model, with its processor passed as
the tokenizer; the other tasks of the same candidate through the text model type, with the processor's tokenizer.

This module owns `Fitness` (its construction, `from_config`, `score`, `describe`, `tasks`);
how lm-eval is adapted to it lives in `lm_eval_glue.py`.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dfs_merge.errors import FitnessError, one_line
from dfs_merge.evaluation import Evaluation, TaskResult
from dfs_merge.fitness.lm_eval_glue import (
    candidate_lm_class,
    candidate_vlm_class,
    compile_templates_once,
    no_build_bars,
    no_request_bars,
    offline_env,
    quiet_lm_eval,
    scoring_task,
)
from dfs_merge.fitness.tasks import TaskSpec, build_tasks, default_suites_dir, suite_dirs

if TYPE_CHECKING:
    from lm_eval.api.task import Task
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

    from dfs_merge.config import RunConfig

__all__ = ["Fitness", "default_suites_dir", "offline_env"]  # the last two: re-exported for their importers

log = logging.getLogger(__name__)


class Fitness:
    """lm-eval tasks built once; `score(model, tokenizer)` evaluates one candidate on all of them.

    `tasks` maps each task name to its weight; `guards` makes some of them constraints (see `term`);
    `metrics` overrides a task's primary metric
    (`metric` or `metric,filter`); `limit` caps the documents, for every task or per task; `suites`
    adds suite folders after the bundled one; `cache_dir` is where `offline_env` points Hugging Face
    and lm-eval. `reuse_requests=False` lets lm-eval rebuild every request per candidate (same results,
    slower); `scored_logits_only=False` computes the LM head at every position, as lm-eval's HFLM does, and
    `shared_contexts=False` runs a context once per request that shares it (a multiple-choice item's question
    once per choice), as HFLM does (each: the same scores within float rounding, slower; see
    `candidate_lm_class`).
    """

    def __init__(
        self,
        tasks: Mapping[str, float],
        *,
        metrics: Mapping[str, str] | None = None,
        limit: int | Mapping[str, int] | None = None,
        suites: Sequence[str | Path] = (),
        batch_size: int = 8,
        max_length: int = 2048,
        num_fewshot: int | None = None,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        reuse_requests: bool = True,
        guards: Mapping[str, float] | None = None,
        scored_logits_only: bool = True,
        shared_contexts: bool = True,
    ):
        if not tasks:
            raise FitnessError("no tasks given: fitness needs at least one lm-eval task")
        for name, w in tasks.items():
            if not isinstance(w, (int, float)) or not math.isfinite(w):
                raise FitnessError(f"task {name}: weight {w!r} is not a finite number")
        unknown = set(metrics or {}) - set(tasks)
        if unknown:
            raise FitnessError(f"metrics names tasks that are not scored: {', '.join(sorted(unknown))}")
        limits = dict(limit) if isinstance(limit, Mapping) else dict.fromkeys(tasks, limit)
        for name, n in limits.items():
            if name not in tasks:
                raise FitnessError(f"limit names task {name!r}, which is not scored")
            if n is not None and n < 1:
                raise FitnessError(f"limit must be at least 1, got {n} for task {name}")
        self.weights: dict[str, float] = {k: float(v) for k, v in tasks.items()}
        self.guards: dict[str, float] = {k: float(v) for k, v in (guards or {}).items() if k in tasks}
        self.metric_overrides = dict(metrics or {})
        self.limits: dict[str, int | None] = {name: limits.get(name) for name in tasks}
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.num_fewshot = num_fewshot
        self.seed = int(seed)
        self.reuse_requests = reuse_requests
        self.scored_logits_only = scored_logits_only
        self.shared_contexts = shared_contexts
        self.cache_dir = offline_env(cache_dir)
        self.suite_dirs = suite_dirs(suites)
        self.build_count = 0
        # per tokenizer: its tokenisations, shared by the candidates (`candidate_lm_class`)
        self._memos: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[Any, Any]] = weakref.WeakKeyDictionary()
        self.build_seconds = 0.0
        self._specs: dict[str, TaskSpec] = self._build()

    # ---- construction -------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        cfg: RunConfig,
        split: Literal["dev", "val", "test"] = "dev",
        cache_dir: str | Path | None = None,
        **overrides: Any,
    ) -> Fitness:
        """The fitness of a run config on one split; which tasks, weights, metrics and limits that means is
        `RunConfig.split_tasks`'s rule."""
        tasks, metrics, limit = cfg.split_tasks(split)
        kwargs: dict[str, Any] = dict(
            metrics=metrics,
            limit=limit,
            suites=cfg.eval_suites,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            num_fewshot=cfg.num_fewshot,
            seed=cfg.seed,
            cache_dir=cache_dir,
            guards=cfg.split_guards(split),
        )
        kwargs.update(overrides)
        return cls(tasks, **kwargs)

    def _build(self) -> dict[str, TaskSpec]:
        """Index the suites, load every task and its data, check it, and build its requests: once."""
        t0 = time.perf_counter()
        quiet_lm_eval()
        compile_templates_once()
        self.build_count += 1
        with no_build_bars():
            specs = build_tasks(
                self.weights, self.suite_dirs, metrics=self.metric_overrides, limits=self.limits,
                num_fewshot=self.num_fewshot, seed=self.seed, reuse_requests=self.reuse_requests,
            )
        self.build_seconds = time.perf_counter() - t0
        return specs

    # ---- scoring --------------------------------------------------------------------

    @property
    def tasks(self) -> dict[str, Task]:
        """The built lm-eval task objects, by name."""
        return {name: s.task for name, s in self._specs.items()}

    def image_tasks(self) -> list[str]:
        """The tasks that show the model images (lm-eval's multimodal tasks): they need a vision-language model."""
        return [name for name, s in self._specs.items() if getattr(s.task, "MULTIMODAL", False)]

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per task: weight, metric, whether higher is better, number of documents."""
        return {
            name: {"weight": self.weights[name], "metric": s.label, "higher_is_better": s.higher_is_better,
                   "docs": s.docs}
            for name, s in self._specs.items()
        }

    def documents(self) -> dict[str, int] | None:
        """Each task's number of documents (what `racing: auto` decides by); None when a task's aggregation is not
        one racing can combine over stages (`aggregation_name`)."""
        try:
            for s in self._specs.values():
                aggregation_name(s.task, s.metric)
        except FitnessError:
            return None
        return {name: s.docs for name, s in self._specs.items()}

    def window(self, name: str, docs: tuple[float, float]) -> range:
        """The documents of task `name` in a race stage `docs` = (from, to), fractions of its documents:
        [ceil(from x N), ceil(to x N)), each bound at least 1 document where it is above 0."""
        n = self._specs[name].docs
        return range(prefix_size(docs[0], n), prefix_size(docs[1], n))

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | ProcessorMixin,
              hops: int | None = None, docs: tuple[float, float] | None = None) -> Evaluation:
        """Evaluate one candidate on every task; a failure yields `WORST_SCORE` and `error`, never an exception.
        `tokenizer` is a vision-language model's processor where tasks show images.

        `docs` (racing): only each task's documents in `window(task, docs)`; the Evaluation then also holds their
        per-document results (`per_doc`), which `search/racing.py` combines over the stages."""
        t0 = time.perf_counter()
        if hops is None:
            hops = _hops_of(model)
        per_doc: dict[str, Any] | None = {} if docs is not None else None
        try:
            results = self._evaluate(model, tokenizer, docs, per_doc)
        except Exception as err:  # noqa: BLE001 - a candidate's failure must not stop the run
            reason = one_line(err)
            _release_memory(err)
            log.warning("candidate with %d hops failed: %s", hops, reason)
            return Evaluation.failed(reason, hops, time.perf_counter() - t0)
        bad = [r for r in results.values() if not math.isfinite(r.value)]
        if bad:
            reason = "; ".join(f"task {r.task}: {r.metric} is {r.value}" for r in bad)
            log.warning("candidate with %d hops failed: %s", hops, reason)
            return Evaluation.failed(reason, hops, time.perf_counter() - t0, results)
        total = weighted_score(results, self.weights, self.guards)
        return Evaluation(total, hops, results, time.perf_counter() - t0, per_doc=per_doc)

    def matches(self, ev: Evaluation) -> bool:
        """Whether a full score `ev` was made on this fitness's documents (the same tasks, each on as many
        documents): a log of scores made under another limit or task list must not be reused as this one's."""
        return set(ev.tasks) == set(self._specs) and all(ev.tasks[n].docs == s.docs for n, s in self._specs.items())

    def per_document(self) -> bool:
        """Whether every task's metric aggregates with one of lm-eval's registered aggregations, so that
        `score(..., docs=(0, 1))` can keep each document's result (what `difference_interval` resamples)."""
        try:
            for spec in self._specs.values():
                aggregation_name(spec.task, spec.metric)
        except FitnessError:
            return False
        return True

    def difference_interval(self, a: Evaluation, b: Evaluation, confidence: float = 0.95, resamples: int = 2000,
                            seed: int = 0) -> tuple[float, float] | None:
        """A paired bootstrap interval of score(a) - score(b): each resample draws every task's documents with
        replacement, the same draw for both, and aggregates each task as lm-eval does (a mean, bits per byte,
        ...). How far a difference between two candidates on these documents could be their luck.

        None unless both were scored whole with per-document results (`score(..., docs=(0, 1))`)."""
        import numpy as np

        docs = {}
        for name, spec in self._specs.items():
            pa, pb = (ev.per_doc.get(name) if ev.ok and ev.per_doc else None for ev in (a, b))
            if not (pa and pb and len(pa["items"]) == len(pb["items"]) == spec.docs):
                return None
            docs[name] = (aggregator(pa["aggregation"]), logged_items(pa["items"]), logged_items(pb["items"]))
        rng = np.random.default_rng(seed)
        diffs = []
        for _ in range(resamples):
            total = 0.0
            for name, (agg, items_a, items_b) in docs.items():
                draw = rng.integers(0, len(items_a), len(items_a))
                for sign, ev, items in ((1.0, a, items_a), (-1.0, b, items_b)):
                    value = float(agg([items[i] for i in draw]))
                    total += sign * self.term(name, replace(ev.tasks[name], value=value))
            diffs.append(total)
        low, high = np.quantile(diffs, [(1 - confidence) / 2, (1 + confidence) / 2])
        return float(low), float(high)

    def term(self, name: str, r: TaskResult) -> float:
        """What a task adds to the score (`task_term` with this fitness's weights and guards)."""
        return task_term(r, self.weights[name], self.guards.get(name))

    def _lm(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | ProcessorMixin,
            images: bool = False) -> HFLM:
        """A fresh `CandidateLM` over `model`, sharing the tokenisations memoised for `tokenizer`; with `images`,
        lm-eval's multimodal LM over a vision-language model, `tokenizer` its processor (for text tasks, the
        processor's tokenizer tokenises).

        `use_cache` is never passed: lm-eval's cache is keyed on the request, not the model.
        """
        max_length = self.max_length
        config = getattr(model, "config", None)
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        positions = getattr(text_config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            max_length = min(max_length, positions)
        if images:
            if not hasattr(tokenizer, "image_processor"):
                raise FitnessError(f"tasks {', '.join(self.image_tasks())} show images: the model must be a "
                                   "vision-language model scored with its processor")
            return candidate_vlm_class()(pretrained=model, tokenizer=tokenizer, backend="causal", max_length=max_length,
                                         batch_size=self.batch_size)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer) if hasattr(tokenizer, "image_processor") else tokenizer
        memo = self._memos.get(tokenizer)
        if memo is None:
            memo = self._memos[tokenizer] = {}
        return candidate_lm_class()(
            pretrained=model, tokenizer=tokenizer, backend="causal", max_length=max_length,
            batch_size=self.batch_size, memo=memo, scored_logits_only=self.scored_logits_only,
            shared_contexts=self.shared_contexts,
        )

    def _evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | ProcessorMixin,
                  docs: tuple[float, float] | None = None, per_doc: dict[str, Any] | None = None,
                  ) -> dict[str, TaskResult]:
        """Each task's primary metric for one candidate (on the race window `docs`, filling `per_doc`);
        raises on any failure (`score` contains it)."""
        import torch
        from lm_eval.evaluator import evaluate

        lms: dict[bool, HFLM] = {}  # by whether the task shows images: made on first use
        out: dict[str, TaskResult] = {}
        with torch.inference_mode(), no_request_bars():
            for name, spec in self._specs.items():
                t = time.perf_counter()
                images = bool(getattr(spec.task, "MULTIMODAL", False))
                if images not in lms:
                    lms[images] = self._lm(model, tokenizer, images)
                lm = lms[images]
                window = self.window(name, docs) if docs is not None else None
                if window is not None and not window:
                    continue  # this stage adds no document of this task
                # The sampler's RNG keeps advancing across evaluate() calls: without this reset every
                # candidate would see other few-shot examples.
                spec.task.set_fewshot_seed(self.seed)
                # before a race's last stage an answer task also records its gold answers' log-likelihoods
                answers = (window is not None and window.stop < spec.docs
                           and getattr(spec.task, "OUTPUT_TYPE", None) == "generate_until")
                if hasattr(lm, "answer_tasks"):
                    lm.answer_tasks = {name: spec.task} if answers else {}
                    lm.answer_loglikelihoods = {}
                with scoring_task(name):
                    res = evaluate(
                        lm=lm,
                        task_dict={"tasks": {name: spec.task}, "groups": {}, "group_map": {}},
                        limit=self.limits[name] if window is None else None,
                        samples={name: list(window)} if window is not None else None,
                        bootstrap_iters=0,
                        log_samples=window is not None,
                    )
                if res is None:
                    raise RuntimeError("lm-eval returned no results (not rank 0?)")
                metrics = res["results"][name]
                if spec.key not in metrics:
                    raise RuntimeError(f"task {name}: lm-eval reported no {spec.key} (has {', '.join(metrics)})")
                out[name] = TaskResult(
                    task=name,
                    metric=spec.label,
                    value=float(metrics[spec.key]),
                    higher_is_better=spec.higher_is_better,
                    docs=spec.docs if window is None else len(window),
                    seconds=time.perf_counter() - t,
                )
                if window is not None and per_doc is not None:
                    samples = res.get("samples", {}).get(name, [])
                    per_doc[name] = {"aggregation": aggregation_name(spec.task, spec.metric),
                                     "start": window.start, "total": spec.docs,
                                     "items": document_items(samples, spec, window)}
                    probs = right_probabilities(samples, spec, window, getattr(lm, "answer_loglikelihoods", None))
                    if probs is not None:
                        per_doc[name]["probability"] = probs
        return out


def prefix_size(fraction: float, n: int) -> int:
    """How many of a task's `n` documents the prefix `fraction` holds: ceil(fraction x n), at least 1 when the
    fraction is above 0 (racing's stages)."""
    return 0 if fraction <= 0 else min(n, max(1, math.ceil(fraction * n - 1e-9)))


def task_term(r: TaskResult, weight: float, bound: float | None = None) -> float:
    """What a task adds to the score: weight x its signed value; for a guarded task (`bound`), nothing while it
    stays within its bound and -weight x the excess beyond it."""
    if bound is None:
        return weight * r.signed
    excess = bound - r.value if r.higher_is_better else r.value - bound
    return -weight * max(0.0, excess)


def weighted_score(results: Mapping[str, TaskResult], weights: Mapping[str, float],
                   guards: Mapping[str, float]) -> float:
    """The candidate's score: the sum of its tasks' terms (`task_term`)."""
    return math.fsum(task_term(r, weights[name], guards.get(name)) for name, r in results.items())


def aggregation_name(task: Task, metric: str) -> str:
    """The name in lm-eval's aggregation registry of how `task` aggregates `metric` over documents (`mean`,
    `bits_per_byte`, ...): racing combines the per-document results of its stages with it."""
    import lm_eval.api.metrics  # noqa: F401 - registers lm-eval's aggregations
    from lm_eval.api.registry import AGGREGATION_REGISTRY

    fn = task.aggregation()[metric]
    for name, registered in AGGREGATION_REGISTRY.items():
        if registered is fn:
            return name
    raise FitnessError(f"racing: the aggregation of {metric} is not one of lm-eval's registered aggregations; "
                       "racing cannot combine its documents (turn racing off)")


def aggregator(name: str) -> Callable[[Sequence[Any]], float]:
    """lm-eval's aggregation function `name` (as `aggregation_name` named it)."""
    import lm_eval.api.metrics  # noqa: F401 - registers lm-eval's aggregations
    from lm_eval.api.registry import AGGREGATION_REGISTRY

    return AGGREGATION_REGISTRY.get(name)


def logged_items(items: Sequence[Any]) -> list[Any]:
    """Per-document items as logged, in the form lm-eval's aggregations take (JSON lists read back as tuples)."""
    return [tuple(x) if isinstance(x, list) else x for x in items]


def aggregate(name: str, items: Sequence[Any]) -> float:
    """lm-eval's aggregation `name` over per-document items as logged."""
    return float(aggregator(name)(logged_items(items)))


def logged_documents(samples: Sequence[Mapping[str, Any]], spec: TaskSpec) -> dict[int, Mapping[str, Any]]:
    """lm-eval's logged samples of the task's primary filter, by document id."""
    return {int(s["doc_id"]): s for s in samples if s.get("filter") == spec.filter}


def document_items(samples: Sequence[Mapping[str, Any]], spec: TaskSpec, window: range) -> list[Any]:
    """The per-document metric items of a window (lm-eval's logged samples, in document order), JSON-safe."""
    items: dict[int, Any] = {}
    for doc, s in logged_documents(samples, spec).items():
        if spec.metric in s:
            v = s[spec.metric]
            items[doc] = [float(x) for x in v] if isinstance(v, (tuple, list)) else float(v)
    missing = [d for d in window if d not in items]
    if missing:
        raise RuntimeError(f"task {spec.name}: lm-eval logged no result for documents {missing[:5]}")
    return [items[d] for d in window]


def right_probabilities(samples: Sequence[Mapping[str, Any]], spec: TaskSpec, window: range,
                        answers: Mapping[str, float] | None = None) -> list[float] | None:
    """Per document of a task scored by `acc` (or, generating, by `exact_match`), the probability the model gives
    the right answer: for a multiple-choice task its choices' loglikelihoods normalised over the choices, for a
    loglikelihood (answer) task the answer's own likelihood, for a generation task the gold answer's likelihood
    (`answers`, the log-likelihoods the LM recorded by context). A smoother measure of the same answers than 0/1,
    which racing ranks (`keep_by`) and bounds (`bound_by`) by; None for any other task, or when they are unknown."""
    kind = getattr(spec.task, "OUTPUT_TYPE", None)
    if kind == "generate_until" and spec.metric == "exact_match" and spec.higher_is_better and answers:
        return answer_probabilities(samples, spec, window, answers)
    if spec.metric != "acc" or kind not in ("multiple_choice", "loglikelihood"):
        return None
    probs: dict[int, float] = {}
    for doc, s in logged_documents(samples, spec).items():
        try:
            lls = [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in s["filtered_resps"]]
            if kind == "loglikelihood":
                if len(lls) != 1:
                    return None
                probs[doc] = math.exp(lls[0])
                continue
            target = s.get("target")
            golds = target if isinstance(target, list) else [target]
            if not lls or not all(isinstance(g, int) and 0 <= g < len(lls) for g in golds):
                return None
        except (KeyError, TypeError, ValueError, IndexError):
            return None
        top = max(lls)
        weights = [math.exp(x - top) for x in lls]
        probs[doc] = math.fsum(weights[g] for g in set(golds)) / math.fsum(weights)
    return in_window(probs, window)


def answer_probabilities(samples: Sequence[Mapping[str, Any]], spec: TaskSpec, window: range,
                         answers: Mapping[str, float]) -> list[float] | None:
    """Per document of a generation task, the likelihood of its gold answer after the context it was generated
    from (`answers`: log-likelihood by context); None unless every document of `window` has it."""
    probs: dict[int, float] = {}
    for doc, s in logged_documents(samples, spec).items():
        try:
            ll = answers.get(s["arguments"][0][0])
        except (KeyError, TypeError, IndexError):
            return None
        if ll is not None:
            probs[doc] = math.exp(ll)
    return in_window(probs, window)


def in_window(values: Mapping[int, float], window: range) -> list[float] | None:
    """The values of the documents of `window`, in order; None unless every one of them has a value."""
    if any(d not in values for d in window):
        return None
    return [values[d] for d in window]


def _hops_of(model: PreTrainedModel) -> int:
    """A candidate's hops: the length of its route, else the decoder layers of a plain model."""
    route = getattr(model, "route", None)
    if route is not None:
        return len(route)
    return int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)


def _release_memory(err: BaseException) -> None:
    """After an out-of-memory failure, give the allocator's cached blocks back before the next candidate."""
    import gc

    gc.collect()
    if "out of memory" in str(err).lower():
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass

