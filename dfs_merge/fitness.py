"""Fitness: lm-eval tasks built once per process, then a stitched model scored per candidate.

`Fitness(tasks={...})` finds each task in the bundled `eval_suites/` folders (and any
extra suite folders), loads its data and builds its requests **once**. `score(model,
tokenizer)` then runs `lm_eval.evaluator.evaluate` on those same task objects for every
candidate and combines each task's primary metric into one weighted score (higher is
better). A candidate that raises, runs out of memory or produces NaN/inf gets
`WORST_SCORE` and a one-line `error`; it never stops the run.

How lm-eval is used, and why (measured with lm-eval 0.4.13; see also OFFLINE.md):

- `TaskManager(include_path=<suite dirs>, include_defaults=False)` indexes only the suite
  folders (milliseconds). A name not found there is looked up in lm-eval's own registry,
  which takes seconds to index, so it is built only then, and only after a quick scan of
  the registry's YAML text shows the name can be there at all.
- Relative `data_files` in a suite YAML are resolved against the YAML's own folder (then
  the suite root) before the task is built: lm-eval would hand them to `datasets`, which
  resolves them against the current directory. The YAML is read with lm-eval's own loader
  (includes, `!function`), its `dataset_kwargs.data_files` made absolute, and the
  resulting config given to the public `TaskManager.load`. No temporary files, no chdir.
  (The bundled suites also load through `eval_suites/local_data.py` as `custom_dataset`,
  which resolves its own paths and accepts absolute ones; the rewrite covers any suite
  that uses plain `dataset_path: json`.)
- Every row of a local data file must have every field (`datasets` silently fills a missing
  JSON key with null, which a Jinja template renders as "None"); checked at build time.
- `evaluate()` calls `task.build_all_requests()` every time: it re-renders every prompt
  (a fresh Jinja compile per template per document) and re-samples few-shot examples.
  With a fixed few-shot seed the result is identical for every candidate, so the requests
  are built once here and each later `evaluate()` gets the same `Instance` objects with
  their responses cleared (`reuse_requests=True`; clearing matters: `evaluate` *appends*
  responses, and stale ones would be read first). lm-eval's own `cache_requests=True`
  does the same through a pickle keyed on the task name only, never the data, so it is
  not used.
- `HFLM(pretrained=<model object>)` is cheap to construct (about 1 ms: no config or
  weights are loaded for a model object). A small subclass memoises tokenisation across
  candidates (the tokenizer is the base's, shared by all) and turns off its progress bars.
- `use_cache` is never passed: its cache is keyed on the request, not the model.
- Few-shot examples are drawn from the task's sampler RNG, which keeps advancing across
  `evaluate()` calls: without `set_fewshot_seed(seed)` before each call, every candidate
  would see other examples (seen). It is reset before every candidate.

Measured (bench/bench_fitness.py, 100 cloze documents, 2 busy CPU cores): per candidate,
lm-eval's request building costs about 0.08 s and tokenisation 0.25-0.28 s, both removed
here; fitness time / raw forward time over the same token batches is 1.17 for a tiny
random Llama (2.2 s vs 1.9 s) and 1.04-1.05 for SmolLM2-135M (62 s vs 60 s).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import math
import os
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dfs_merge.errors import FitnessError

if TYPE_CHECKING:
    from dfs_merge.config import RunConfig

log = logging.getLogger(__name__)

WORST_SCORE: float = -1e9
"""The score of a failed candidate: finite (JSON-safe) and below any real weighted score."""
WORST_HOPS: float = 1e9
"""The hops objective of a failed candidate, so that it is dominated on every objective."""
SUITES_ENV = "DFS_MERGE_SUITES"
OBJECTIVES = ("score", "hops")
_ROLLING_DEFAULT_METRIC = "bits_per_byte"
_LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow"}


# --------------------------------------------------------------------------- results


@dataclass
class TaskResult:
    """One task's primary metric for one candidate."""

    task: str
    metric: str
    value: float
    higher_is_better: bool
    docs: int
    seconds: float

    @property
    def signed(self) -> float:
        """The value as it enters the score: negated when lower is better."""
        return self.value if self.higher_is_better else -self.value


@dataclass
class Evaluation:
    """A candidate's score, its hop count, per-task results, and an error line if it failed."""

    score: float
    hops: int
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def objectives(self, names: Sequence[str]) -> tuple[float, ...]:
        """Objective values in the order of `names` (from "score", maximised, and "hops", minimised).

        A failed candidate gets the worst value on every objective (`WORST_SCORE`, `WORST_HOPS`).
        """
        out = []
        for name in names:
            if name == "score":
                out.append(float(self.score) if self.ok else WORST_SCORE)
            elif name == "hops":
                out.append(float(self.hops) if self.ok else WORST_HOPS)
            else:
                raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe mapping (finite floats only)."""
        return {
            "score": float(self.score),
            "hops": int(self.hops),
            "seconds": round(float(self.seconds), 4),
            "error": self.error,
            "tasks": {name: asdict(r) for name, r in self.tasks.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Evaluation:
        """Inverse of `to_dict`."""
        return cls(
            score=float(d["score"]),
            hops=int(d["hops"]),
            tasks={name: TaskResult(**r) for name, r in (d.get("tasks") or {}).items()},
            seconds=float(d.get("seconds", 0.0)),
            error=d.get("error"),
        )


# --------------------------------------------------------------------------- environment


def default_suites_dir() -> Path:
    """The bundled `eval_suites/` folder (beside the package), or `$DFS_MERGE_SUITES` when set."""
    env = os.environ.get(SUITES_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "eval_suites"


def _default_cache_dir() -> Path:
    from dfs_merge.model_store import cache_root

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
    """Make already-imported `huggingface_hub` / `datasets` honour the environment set above."""
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


@functools.cache
def _quiet_lm_eval() -> None:
    """lm-eval logs INFO lines per task and per call: keep WARNING and above, minus per-candidate chatter."""
    logger = logging.getLogger("lm_eval")
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    for name in ("lm_eval.models.huggingface", "lm_eval.api.task"):
        logging.getLogger(name).addFilter(_DropChatter())


@contextlib.contextmanager
def _no_request_bars() -> Iterator[None]:
    """Hide the progress bar that `Task.build_all_requests` draws (lm-eval offers no switch for it)."""
    import lm_eval.api.task as task_module

    original = task_module.tqdm
    task_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = original


# --------------------------------------------------------------------------- the LM wrapper


@functools.cache
def _candidate_lm_class() -> type:
    """HFLM, minus progress bars, plus tokenisation memoised across candidates (built lazily)."""
    from lm_eval.models.huggingface import HFLM

    class CandidateLM(HFLM):
        """An `HFLM` over a model object whose tokenisations are shared through `memo`."""

        def __init__(self, *args: Any, memo: dict[Any, list[int] | tuple[list[int], list[int]]], **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._memo = memo

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
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

    return CandidateLM


# --------------------------------------------------------------------------- building tasks


@dataclass
class _TaskSpec:
    """What is needed to read one task's primary metric out of lm-eval's results."""

    name: str
    task: Any  # lm_eval.api.task.Task
    metric: str  # metric name as lm-eval keys it, without the filter
    filter: str  # filter name ("none" unless the task defines filters)
    higher_is_better: bool
    docs: int

    @property
    def key(self) -> str:
        return f"{self.metric},{self.filter}"

    @property
    def label(self) -> str:
        return self.metric if self.filter == "none" else self.key


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or repr(err)
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(err).__name__}: {text}"


def _suite_dirs(suites: Sequence[str | Path]) -> list[Path]:
    """The bundled suites folder (if present) then the given ones; later folders override earlier."""
    dirs: list[Path] = []
    bundled = default_suites_dir()
    if bundled.is_dir():
        dirs.append(bundled.resolve())
    for s in suites:
        p = Path(s).expanduser()
        if not p.is_dir():
            raise FitnessError(f"eval suite folder {s} does not exist")
        if p.resolve() not in dirs:
            dirs.append(p.resolve())
    return dirs


def _yaml_files(dirs: Sequence[Path]) -> list[Path]:
    return [p for d in dirs for p in sorted(d.glob("**/*.yaml")) if "__pycache__" not in p.parts]


def _unreadable_yamls(dirs: Sequence[Path]) -> dict[Path, str]:
    """Suite YAMLs that lm-eval's loader cannot read (its index skips them silently)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    bad = {}
    for path in _yaml_files(dirs):
        try:
            load_yaml(path, resolve_func=False)
        except Exception as err:  # noqa: BLE001 - any failure makes the file useless
            bad[path] = _one_line(err)
    return bad


def _resolve_data_files(value: Any, yaml_dir: Path, roots: Sequence[Path]) -> tuple[Any, bool]:
    """`data_files` with each relative path made absolute against the YAML's folder or a suite root."""
    if isinstance(value, str):
        p = Path(value).expanduser()
        if p.is_absolute() or "://" in value:
            return value, False
        for base in (yaml_dir, *roots):
            cand = base / p
            if (glob.has_magic(value) and glob.glob(str(cand))) or cand.exists():
                return str(cand.resolve() if not glob.has_magic(value) else cand), True
        return value, False
    if isinstance(value, list):
        parts = [_resolve_data_files(v, yaml_dir, roots) for v in value]
        return [v for v, _ in parts], any(c for _, c in parts)
    if isinstance(value, dict):
        parts = {k: _resolve_data_files(v, yaml_dir, roots) for k, v in value.items()}
        return {k: v for k, (v, _) in parts.items()}, any(c for _, c in parts.values())
    return value, False


def _registry_may_have(name: str) -> bool:
    """A quick scan of lm-eval's bundled YAML text: a task, group or tag name always appears literally."""
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    needle = name.encode()
    return any(needle in p.read_bytes() for p in root.rglob("*.yaml"))


def _primary_metric(name: str, task: Any, override: str | None) -> tuple[str, str, bool]:
    """(metric, filter, higher_is_better) of the metric that scores `task`."""
    hib: dict[str, bool] = dict(task.higher_is_better())
    filters = [getattr(f, "name", "none") for f in getattr(task, "_filters", [])] or ["none"]
    if override:
        metric, _, filt = override.partition(",")
        if metric not in hib:
            raise FitnessError(f"task {name}: metric {metric!r} is not one of its metrics ({', '.join(hib)})")
        if filt and filt not in filters:
            raise FitnessError(f"task {name}: filter {filt!r} is not one of its filters ({', '.join(filters)})")
        return metric, filt or filters[0], bool(hib[metric])
    if getattr(task, "OUTPUT_TYPE", None) == "loglikelihood_rolling" and _ROLLING_DEFAULT_METRIC in hib:
        metric = _ROLLING_DEFAULT_METRIC
    else:
        metric_list = task.config.metric_list or []
        first = metric_list[0].get("metric") if metric_list else None
        metric = first if isinstance(first, str) and first in hib else next(iter(hib), None)
    if metric is None:
        raise FitnessError(f"task {name}: defines no metric")
    return metric, filters[0], bool(hib[metric])


def _is_local(task: Any) -> bool:
    cfg = task.config
    kwargs = cfg.dataset_kwargs or {}
    return bool(kwargs.get("data_files")) or str(cfg.dataset_path) in _LOCAL_BUILDERS


def _check_rows(name: str, task: Any) -> None:
    """Refuse a local data file in which some row lacks a field that other rows have."""
    if not _is_local(task):
        return
    seen: set[int] = set()
    for docs in (task.eval_docs, task.fewshot_docs()):
        if docs is None or id(docs) in seen or not hasattr(docs, "column_names"):
            continue
        seen.add(id(docs))
        columns = list(docs.column_names)
        for i, row in enumerate(docs):
            missing = [c for c in columns if row.get(c) is None]
            if missing:
                where = (task.config.dataset_kwargs or {}).get("data_files", task.config.dataset_path)
                raise FitnessError(
                    f"task {name}: row {i + 1} of its data ({where}) lacks field(s) {', '.join(missing)}"
                )


def _freeze_requests(task: Any, limit: int | None) -> None:
    """Build the task's requests now; each later `build_all_requests` hands back the same ones, responses cleared.

    `evaluate()` appends each candidate's responses to the Instances, so they are cleared
    before every reuse. The requests depend only on the documents, the prompt templates and
    the (fixed) few-shot seed, never on the model, so reuse gives identical results.
    """
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    frozen = list(task.instances)

    def build_all_requests(**_ignored: Any) -> None:
        for inst in frozen:
            inst.resps = []
            inst.filtered_resps = {}
        task._instances = list(frozen)

    task.build_all_requests = build_all_requests


# --------------------------------------------------------------------------- Fitness


class Fitness:
    """lm-eval tasks built once; `score(model, tokenizer)` evaluates one candidate on all of them."""

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
        self.metric_overrides = dict(metrics or {})
        self.limits: dict[str, int | None] = {name: limits.get(name) for name in tasks}
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.num_fewshot = num_fewshot
        self.seed = int(seed)
        self.reuse_requests = reuse_requests
        self.cache_dir = offline_env(cache_dir)
        self.suite_dirs = _suite_dirs(suites)
        self.build_count = 0
        self._memos: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()
        self.build_seconds = 0.0
        self._specs: dict[str, _TaskSpec] = self._build()

    # ---- construction -------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        cfg: RunConfig,
        split: Literal["dev", "val", "test"] = "dev",
        cache_dir: str | Path | None = None,
        **overrides: Any,
    ) -> Fitness:
        """The fitness of a run config: `dev` scores `cfg.tasks`, `val` `cfg.select_tasks`, `test` `cfg.report_tasks`.

        Validation and report tasks take the weight of the dev task whose name they are with `_dev` for
        `_val` / `_test` (`arith_test` <- `arith_dev`), else 1; metric overrides map the same way.
        Each split uses its own limit (`limit`, `select_limit`, `report_limit`; every document when unset).
        A limit is one number for all tasks or a mapping task -> number (tasks it omits use every document).
        """
        if split == "dev":
            tasks = dict(cfg.tasks)
            metrics = {k: v for k, v in cfg.metrics.items() if k in tasks}
            limit = cfg.limit
        elif split in ("val", "test"):
            names, limit, key = ((cfg.select_tasks, cfg.select_limit, "select_tasks") if split == "val"
                                 else (cfg.report_tasks, cfg.report_limit, "report_tasks"))
            if not names:
                raise FitnessError(f"the config lists no {key} to score on the {split} split")
            suffix = f"_{split}"
            dev_of = {t: t[: -len(suffix)] + "_dev" for t in names if t.endswith(suffix)}
            tasks = {t: float(cfg.tasks.get(dev_of.get(t, ""), 1.0)) for t in names}
            metrics = {}
            for t in tasks:
                m = cfg.metrics.get(t) or cfg.metrics.get(dev_of.get(t, ""))
                if m:
                    metrics[t] = m
        else:
            raise ValueError(f"split must be 'dev', 'val' or 'test', got {split!r}")
        kwargs: dict[str, Any] = dict(
            metrics=metrics,
            limit=limit,
            suites=cfg.eval_suites,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            num_fewshot=cfg.num_fewshot,
            seed=cfg.seed,
            cache_dir=cache_dir,
        )
        kwargs.update(overrides)
        return cls(tasks, **kwargs)

    def _build(self) -> dict[str, _TaskSpec]:
        """Index the suites, load every task and its data, check it, and build its requests: once."""
        t0 = time.perf_counter()
        _quiet_lm_eval()
        import datasets

        self.build_count += 1
        bars_were_on = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            with _no_request_bars():
                specs = self._build_specs()
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
        self.build_seconds = time.perf_counter() - t0
        return specs

    def _build_specs(self) -> dict[str, _TaskSpec]:
        from lm_eval.tasks import TaskManager

        include = [str(d) for d in self.suite_dirs]
        manager = TaskManager(include_path=include, include_defaults=False)
        registry: Any = None
        specs: dict[str, _TaskSpec] = {}
        for name in self.weights:
            entry, source = manager.task_index.get(name), manager
            if entry is None:
                self._refuse_unreadable(name)
                if registry is None and _registry_may_have(name):
                    log.info("task %s is not in the eval suites; indexing lm-eval's task registry", name)
                    registry = TaskManager(include_path=include)
                entry, source = (registry.task_index.get(name) if registry is not None else None), registry
            if entry is None:
                listed = ", ".join(sorted(manager.all_subtasks)) or "(none)"
                raise FitnessError(
                    f"unknown task {name!r}: not in the eval suites nor lm-eval's registry; bundled tasks: {listed}"
                )
            kind = getattr(getattr(entry, "kind", None), "name", "TASK")
            if kind not in ("TASK", "PY_TASK"):
                raise FitnessError(f"task {name}: is an lm-eval {kind.lower()}; list its tasks, each with a weight")
            specs[name] = self._load_task(name, entry, source)
        return specs

    def _refuse_unreadable(self, name: str) -> None:
        """A missing task whose YAML is in a suite but unreadable: say so instead of 'unknown'."""
        for path, reason in _unreadable_yamls(self.suite_dirs).items():
            try:
                text = path.read_text(errors="replace")
            except OSError:
                text = ""
            if path.stem == name or name in text:
                raise FitnessError(f"task {name}: {path} cannot be read ({reason})")

    def _load_task(self, name: str, entry: Any, manager: Any) -> _TaskSpec:
        spec: Any = name
        yaml_path = getattr(entry, "yaml_path", None)
        where = f" ({yaml_path})" if yaml_path else ""
        try:
            if yaml_path is not None and any(Path(yaml_path).resolve().is_relative_to(d) for d in self.suite_dirs):
                spec = self._config_with_absolute_data(name, Path(yaml_path))
            loaded = manager.load([spec])
            task = loaded["tasks"][name] if name in loaded["tasks"] else next(iter(loaded["tasks"].values()))
            if self.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            task.set_fewshot_seed(self.seed)
        except FitnessError:
            raise
        except Exception as err:  # noqa: BLE001 - lm-eval/datasets raise many types for a bad task
            hint = ""
            if "offline" in str(err).lower():
                hint = "; its data is not cached here (HF_HUB_OFFLINE=0 lets a connected machine download it)"
            raise FitnessError(f"task {name}{where}: cannot be built ({_one_line(err)}){hint}") from None
        _check_rows(name, task)
        metric, filt, hib = _primary_metric(name, task, self.metric_overrides.get(name))
        try:
            if self.reuse_requests:
                _freeze_requests(task, self.limits[name])
                docs = len({inst.doc_id for inst in task.instances})
            else:
                task.build_all_requests(limit=self.limits[name], rank=0, world_size=1)  # fail here, not per candidate
                docs = len({inst.doc_id for inst in task.instances})
        except Exception as err:  # noqa: BLE001
            raise FitnessError(f"task {name}{where}: cannot build its requests ({_one_line(err)})") from None
        return _TaskSpec(name, task, metric, filt, hib, docs)

    def _config_with_absolute_data(self, name: str, yaml_path: Path) -> str | dict[str, Any]:
        """The task's config with relative `data_files` made absolute, or its name when nothing changes."""
        from lm_eval.tasks._yaml_loader import load_yaml

        cfg = load_yaml(yaml_path, resolve_func=True)
        kwargs = dict(cfg.get("dataset_kwargs") or {})
        if "data_files" not in kwargs:
            return name
        roots = [d for d in self.suite_dirs if yaml_path.resolve().is_relative_to(d)]
        resolved, changed = _resolve_data_files(kwargs["data_files"], yaml_path.parent, roots)
        if not changed:
            return name
        kwargs["data_files"] = resolved
        cfg["dataset_kwargs"] = kwargs
        cfg["task"] = name
        for key in ("group", "tag", "task_list"):
            cfg.pop(key, None)
        cfg.setdefault("metadata", {})
        if isinstance(cfg["metadata"], dict):
            cfg["metadata"]["config_source"] = str(yaml_path)
        return cfg

    # ---- scoring --------------------------------------------------------------------

    @property
    def tasks(self) -> dict[str, Any]:
        """The built lm-eval task objects, by name."""
        return {name: s.task for name, s in self._specs.items()}

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per task: weight, metric, whether higher is better, number of documents."""
        return {
            name: {"weight": self.weights[name], "metric": s.label, "higher_is_better": s.higher_is_better,
                   "docs": s.docs}
            for name, s in self._specs.items()
        }

    def score(self, model: Any, tokenizer: Any, hops: int | None = None) -> Evaluation:
        """Evaluate one candidate on every task; a failure yields `WORST_SCORE` and `error`, never an exception."""
        t0 = time.perf_counter()
        if hops is None:
            hops = _hops_of(model)
        try:
            results = self._evaluate(model, tokenizer)
        except Exception as err:  # noqa: BLE001 - a candidate's failure must not stop the run
            reason = _one_line(err)
            _release_memory(err)
            log.warning("candidate with %d hops failed: %s", hops, reason)
            return Evaluation(WORST_SCORE, hops, {}, time.perf_counter() - t0, error=reason)
        bad = [r for r in results.values() if not math.isfinite(r.value)]
        if bad:
            reason = "; ".join(f"task {r.task}: {r.metric} is {r.value}" for r in bad)
            log.warning("candidate with %d hops failed: %s", hops, reason)
            return Evaluation(WORST_SCORE, hops, results, time.perf_counter() - t0, error=reason)
        total = math.fsum(self.weights[name] * r.signed for name, r in results.items())
        return Evaluation(total, hops, results, time.perf_counter() - t0)

    def _lm(self, model: Any, tokenizer: Any) -> Any:
        memo = self._memos.get(tokenizer)
        if memo is None:
            memo = self._memos[tokenizer] = {}
        max_length = self.max_length
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            max_length = min(max_length, positions)
        return _candidate_lm_class()(
            pretrained=model, tokenizer=tokenizer, backend="causal", max_length=max_length,
            batch_size=self.batch_size, memo=memo,
        )

    def _evaluate(self, model: Any, tokenizer: Any) -> dict[str, TaskResult]:
        import torch
        from lm_eval.evaluator import evaluate

        lm = self._lm(model, tokenizer)
        out: dict[str, TaskResult] = {}
        with torch.inference_mode(), _no_request_bars():
            for name, spec in self._specs.items():
                t = time.perf_counter()
                spec.task.set_fewshot_seed(self.seed)
                res = evaluate(
                    lm=lm,
                    task_dict={"tasks": {name: spec.task}, "groups": {}, "group_map": {}},
                    limit=self.limits[name],
                    bootstrap_iters=0,
                    log_samples=False,
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
                    docs=spec.docs,
                    seconds=time.perf_counter() - t,
                )
        return out


def _hops_of(model: Any) -> int:
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

