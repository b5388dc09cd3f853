"""Finding and loading the lm-eval tasks a fitness scores, once per process.

It owns the suite folders (the bundled `eval_suites/`, `$DFS_MERGE_SUITES`, extra folders), the
lookup of each task in them and then, only if needed, in lm-eval's own registry; the loading of a
task with its local data files resolved next to its YAML; the checks of its rows and its metric; and
building its requests once (`TaskSpec`: a built task and the metric that scores it).
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfs_merge.bundled import suites_dir
from dfs_merge.errors import FitnessError, one_line

log = logging.getLogger(__name__)

SUITES_ENV = "DFS_MERGE_SUITES"
_ROLLING_DEFAULT_METRIC = "bits_per_byte"
_LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow"}


@dataclass
class TaskSpec:
    """What is needed to read one task's primary metric out of lm-eval's results."""

    name: str
    task: Any  # lm_eval.api.task.Task
    metric: str  # metric name as lm-eval keys it, without the filter
    filter: str  # filter name ("none" unless the task defines filters)
    higher_is_better: bool
    docs: int

    @property
    def key(self) -> str:
        """The key of the metric in lm-eval's results: `metric,filter`."""
        return f"{self.metric},{self.filter}"

    @property
    def label(self) -> str:
        """The metric as reported: its name, with the filter only when there is one."""
        return self.metric if self.filter == "none" else self.key


# --------------------------------------------------------------------------- suite folders


def default_suites_dir() -> Path:
    """The bundled `eval_suites/` folder (beside the package in a clone, its copy in an installed wheel), or
    `$DFS_MERGE_SUITES` when set."""
    env = os.environ.get(SUITES_ENV)
    if env:
        return Path(env).expanduser()
    return suites_dir()


def suite_dirs(suites: Sequence[str | Path]) -> list[Path]:
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
            bad[path] = one_line(err)
    return bad


def _refuse_unreadable(name: str, dirs: Sequence[Path]) -> None:
    """A missing task whose YAML is in a suite but unreadable: say so instead of 'unknown'."""
    for path, reason in _unreadable_yamls(dirs).items():
        try:
            text = path.read_text(errors="replace")
        except OSError:
            text = ""
        if path.stem == name or name in text:
            raise FitnessError(f"task {name}: {path} cannot be read ({reason})")


def _registry_may_have(name: str) -> bool:
    """A quick scan of lm-eval's bundled YAML text: a task, group or tag name always appears literally.

    Indexing lm-eval's registry takes seconds, so a name that cannot be there is refused without it.
    """
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    needle = name.encode()
    return any(needle in p.read_bytes() for p in root.rglob("*.yaml"))


# --------------------------------------------------------------------------- local data files


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


def _config_with_absolute_data(name: str, yaml_path: Path, dirs: Sequence[Path]) -> str | dict[str, Any]:
    """The task's config with relative `data_files` made absolute, or its name when nothing changes.

    lm-eval hands `data_files` to `datasets`, which resolves a relative path against the current
    directory; here it is resolved against the YAML's own folder, then the suite root. The YAML is
    read with lm-eval's own loader (includes, `!function`) and the resulting config is given to the
    public `TaskManager.load`: no temporary files, no chdir. (The bundled suites also load through
    `eval_suites/local_data.py` as `custom_dataset`, which resolves its own paths and accepts absolute
    ones; this rewrite covers any suite that uses plain `dataset_path: json`.)
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(yaml_path, resolve_func=True)
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if "data_files" not in kwargs:
        return name
    roots = [d for d in dirs if yaml_path.resolve().is_relative_to(d)]
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


def _is_local(task: Any) -> bool:
    cfg = task.config
    kwargs = cfg.dataset_kwargs or {}
    return bool(kwargs.get("data_files")) or str(cfg.dataset_path) in _LOCAL_BUILDERS


def _check_rows(name: str, task: Any) -> None:
    """Refuse a local data file in which some row lacks a field that other rows have.

    `datasets` silently fills a missing JSON key with null, which a Jinja template renders as "None".
    """
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


# --------------------------------------------------------------------------- metric and requests


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


def _freeze_requests(task: Any, limit: int | None) -> None:
    """Build the task's requests now; each later `build_all_requests` hands back the same ones, responses cleared.

    `evaluate()` calls `task.build_all_requests()` every time: it re-renders every prompt (a fresh
    Jinja compile per template per document) and re-samples few-shot examples. The requests depend
    only on the documents, the prompt templates and the (fixed) few-shot seed, never on the model,
    so reuse gives identical results. `evaluate()` *appends* each candidate's responses to the
    Instances, and stale ones would be read first, so they are cleared before every reuse.
    lm-eval's own `cache_requests=True` does the same through a pickle keyed on the task name only,
    never the data, so it is not used.
    """
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    frozen = [(inst, inst.doc_id) for inst in task.instances]

    def build_all_requests(samples: list[int] | None = None, **_ignored: Any) -> None:
        # With `samples` (racing's document windows) lm-eval numbers the chosen documents 0, 1, ... in order.
        position = {doc: i for i, doc in enumerate(samples)} if samples is not None else None
        chosen = []
        for inst, doc in frozen:
            if position is not None and doc not in position:
                continue
            inst.resps = []
            inst.filtered_resps = {}
            inst.doc_id = doc if position is None else position[doc]
            chosen.append(inst)
        task._instances = chosen

    task.build_all_requests = build_all_requests
    _keep_documents(task, limit)


def _keep_documents(task: Any, limit: int | None) -> None:
    """Decode the task's documents once: `evaluate()` walks them every time (`doc_iterator`) to score the responses,
    and a `datasets.Dataset` decodes each row it yields anew (with racing's `samples`, every row of the split for a
    window of them). The same documents in the same order, numbered as lm-eval numbers them; each document's target
    rendered once (`doc_to_target`, a Jinja template, asked for every document of every candidate). Only the first
    `limit` documents are kept: no evaluation of the task goes further."""
    from itertools import islice

    from lm_eval import utils

    docs = list(islice(task.eval_docs, limit))
    targets: dict[int, tuple[Any, Any]] = {}  # id(doc) -> (doc, target): the doc kept, so its id stays its own
    render = task.doc_to_target

    def doc_iterator(*, rank: int = 0, limit: int | None = None, world_size: int = 1,
                     samples: list[int] | None = None) -> Any:
        if samples:
            chosen = set(samples)
            return utils.create_iterator(enumerate(d for i, d in enumerate(docs) if i in chosen), rank=int(rank),
                                         limit=None, world_size=int(world_size))
        return utils.create_iterator(enumerate(docs), rank=int(rank), limit=int(limit) if limit else None,
                                     world_size=int(world_size))

    def doc_to_target(doc: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return render(doc, *args, **kwargs)
        hit = targets.get(id(doc))
        if hit is None or hit[0] is not doc:
            hit = targets[id(doc)] = (doc, render(doc))
        return hit[1]

    task.doc_iterator = doc_iterator
    task.doc_to_target = doc_to_target


# --------------------------------------------------------------------------- building the tasks


def build_tasks(
    names: Iterable[str],
    dirs: Sequence[Path],
    *,
    metrics: Mapping[str, str] | None = None,
    limits: Mapping[str, int | None] | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    reuse_requests: bool = True,
) -> dict[str, TaskSpec]:
    """Find every task of `names` in the suite folders `dirs` (else in lm-eval's registry), load it and
    its data, check it, pick its metric (`metrics` overrides, `metric` or `metric,filter`) and build its
    requests (at most `limits[name]` documents; frozen for reuse with `reuse_requests`).

    `TaskManager(include_path=dirs, include_defaults=False)` indexes only the suite folders
    (milliseconds). lm-eval's own registry takes seconds to index, so it is indexed only for a name
    not found in the suites, and only once a quick scan of its YAML text shows the name can be there.
    """
    metrics = dict(metrics or {})
    limits = dict(limits or {})
    finder = _TaskFinder(dirs)
    specs: dict[str, TaskSpec] = {}
    for name in names:
        entry, source = finder.find(name)
        specs[name] = _load_task(
            name, entry, source, dirs, metric_override=metrics.get(name), limit=limits.get(name),
            num_fewshot=num_fewshot, seed=seed, reuse_requests=reuse_requests,
        )
    return specs


def check_task_names(names: Iterable[str], dirs: Sequence[Path]) -> None:
    """Each of `names` found as `build_tasks` finds it (in the suite folders `dirs`, else in lm-eval's registry),
    indexed but not loaded; the first that is not a task is a FitnessError naming it. For a check before any
    work starts (a search that would find a misspelt task only at its end)."""
    finder = _TaskFinder(dirs)
    for name in dict.fromkeys(names):
        finder.find(name)


class _TaskFinder:
    """Where a task of the suite folders, else of lm-eval's registry, is indexed (`find`)."""

    def __init__(self, dirs: Sequence[Path]) -> None:
        from lm_eval.tasks import TaskManager

        self.dirs = dirs
        self.include = [str(d) for d in dirs]
        self.manager = TaskManager(include_path=self.include, include_defaults=False)
        self.registry: Any = None

    def find(self, name: str) -> tuple[Any, Any]:
        """(index entry, the TaskManager that indexed it) of the task `name`; a name that is no task (or a group
        or tag) is a FitnessError."""
        from lm_eval.tasks import TaskManager

        entry, source = self.manager.task_index.get(name), self.manager
        if entry is None:
            _refuse_unreadable(name, self.dirs)
            if self.registry is None and _registry_may_have(name):
                log.info("task %s is not in the eval suites; indexing lm-eval's task registry", name)
                self.registry = TaskManager(include_path=self.include)
            entry, source = (self.registry.task_index.get(name) if self.registry is not None else None), self.registry
        if entry is None:
            listed = ", ".join(sorted(self.manager.all_subtasks)) or "(none)"
            raise FitnessError(
                f"unknown task {name!r}: not in the eval suites nor lm-eval's registry; bundled tasks: {listed}"
            )
        kind = getattr(getattr(entry, "kind", None), "name", "TASK")
        if kind not in ("TASK", "PY_TASK"):
            raise FitnessError(f"task {name}: is an lm-eval {kind.lower()}; list its tasks, each with a weight")
        return entry, source


def _load_task(
    name: str,
    entry: Any,
    manager: Any,
    dirs: Sequence[Path],
    *,
    metric_override: str | None,
    limit: int | None,
    num_fewshot: int | None,
    seed: int,
    reuse_requests: bool,
) -> TaskSpec:
    """Load one indexed task from `manager`, check its rows and metric, and build its requests."""
    spec: Any = name
    yaml_path = getattr(entry, "yaml_path", None)
    where = f" ({yaml_path})" if yaml_path else ""
    try:
        if yaml_path is not None and any(Path(yaml_path).resolve().is_relative_to(d) for d in dirs):
            spec = _config_with_absolute_data(name, Path(yaml_path), dirs)
        loaded = manager.load([spec])
        task = loaded["tasks"][name] if name in loaded["tasks"] else next(iter(loaded["tasks"].values()))
        if num_fewshot is not None:
            task.set_config(key="num_fewshot", value=num_fewshot)
        task.set_fewshot_seed(seed)
    except FitnessError:
        raise
    except Exception as err:  # noqa: BLE001 - lm-eval/datasets raise many types for a bad task
        hint = ""
        if "offline" in str(err).lower():
            hint = "; its data is not cached here (HF_HUB_OFFLINE=0 lets a connected machine download it)"
        raise FitnessError(f"task {name}{where}: cannot be built ({one_line(err)}){hint}") from None
    _check_rows(name, task)
    metric, filt, hib = _primary_metric(name, task, metric_override)
    try:
        if reuse_requests:
            _freeze_requests(task, limit)
            docs = len({inst.doc_id for inst in task.instances})
        else:
            task.build_all_requests(limit=limit, rank=0, world_size=1)  # fail here, not per candidate
            docs = len({inst.doc_id for inst in task.instances})
    except Exception as err:  # noqa: BLE001
        raise FitnessError(f"task {name}{where}: cannot build its requests ({one_line(err)})") from None
    return TaskSpec(name, task, metric, filt, hib, docs)
