"""Experiment trackers (config `tracking:`): each new evaluation, each generation's summary and the best genome,
sent to Weights & Biases or MLflow, and the registry that names them.

- `wandb`: `wandb.init` with the run folder's `tracking/` as its dir (`WANDB_MODE=offline` writes a local run
  there to `wandb sync` later); each evaluation's metrics against `eval/index`, each generation's against
  `gen/generation`; the config; at the end the best scores in the summary and `best.genome.yaml` as an artifact.
- `mlflow`: a run in `tracking_uri` (else `MLFLOW_TRACKING_URI`, else a SQLite store in the run folder,
  `sqlite:///<run>/tracking/mlflow.db`, artifacts in `tracking/mlartifacts`; a run folder made with the old
  file store, `tracking/mlruns`, resumes into it); metrics with step = the evaluation's index, or the
  generation; the config as params and as `config.yaml`; the best genome as an artifact.

A resumed run continues the same tracker run: its id is kept in `tracking/<tracker>.json` in the run folder.

The libraries are imported only when their tracker starts: a run without `tracking` imports neither.
`Tracking` is what the loop calls: a tracker that cannot start stops the run in one line (`TrackingError`),
or, with `tracking_optional: true`, is one warning line; a `tracking_uri` server that does not answer within
`CONNECT_TIMEOUT_S` cannot start (its library would retry for minutes), and MLflow's requests are bounded too
(`MLFLOW_HTTP_REQUEST_TIMEOUT` and `_MAX_RETRIES`, unless the user set them); a tracker that fails later is one
warning line and tracking stops there; the run never does. A new tracker is one class here and its row in
`dfs_merge.registry.TRACKERS` (the name table the run config is checked against); one defined elsewhere is one
class with `@register`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from dfs_merge.atomic import write_atomic
from dfs_merge.errors import DfsMergeError, TrackingError, one_line
from dfs_merge.inputs import read_json
from dfs_merge.network import check_reachable
from dfs_merge.registry import TRACKERS

if TYPE_CHECKING:
    from dfs_merge.config import RunConfig
    from dfs_merge.evaluation import Evaluation
    from dfs_merge.search.rundir import RunDir

Status = Literal["finished", "failed", "killed"]

register = TRACKERS.register  # class decorator: a tracker under its `name` (config `tracking:`)
tracker_class = TRACKERS.lookup  # the tracker of a name; ConfigError naming the known ones otherwise
DEFAULT_PROJECT = "dfs-merge"
MLFLOW_REQUESTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
"""MLflow's request limits for a run (its defaults, 120 s and 7 retries with backoff, stall a run for minutes)."""
BARE_URIS = ("databricks",)
"""MLflow tracking URIs without `scheme:`."""
INSTALL_HINT = "pip install 'dfs-merge[tracking]'"


# ---- what is logged ------------------------------------------------------------------------
def _name(text: str) -> str:
    """A metric name both libraries take: letters, digits, `_ - . /` and spaces."""
    return re.sub(r"[^\w\-. /]", "_", text)


def _numbers(items: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among `items` (None, text and NaN are left out)."""
    return {k: float(v) for k, v in items.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)}


def evaluation_metrics(index: int, generation: int, ev: Evaluation) -> dict[str, float]:
    """One evaluation's metrics: `eval/index` (1-based, the run's evaluation count), generation, failed; for a
    candidate that did not fail its score, hops, seconds and each task's metric (`eval/TASK/METRIC`)."""
    out: dict[str, Any] = {"eval/index": index, "eval/generation": generation, "eval/failed": int(not ev.ok)}
    if ev.ok:  # a failed candidate's WORST_SCORE would flatten every chart
        out.update({"eval/score": ev.score, "eval/hops": ev.hops, "eval/seconds": ev.seconds})
        out.update({_name(f"eval/{t}/{r.metric}"): r.value for t, r in ev.tasks.items()})
    return _numbers(out)


def generation_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """A generation's history record as metrics: `gen/generation`, `gen/best`, `gen/mean`, counters, seconds."""
    return _numbers({_name(f"gen/{k}"): v for k, v in summary.items()})


def best_metrics(scores: dict[str, Any]) -> dict[str, float]:
    """The best genome's scores per split (`best/dev/score`, `best/test/TASK/METRIC`, ...)."""
    out: dict[str, Any] = {}
    for split, s in scores.items():
        out[f"best/{split}/score"] = s.get("score")
        out[f"best/{split}/hops"] = s.get("hops")
        for task, t in s.get("tasks", {}).items():
            out[_name(f"best/{split}/{task}/{t.get('metric')}")] = t.get("value")
    return _numbers(out)


def flat_config(cfg: RunConfig) -> dict[str, str]:
    """The config as flat text parameters (`constraints.min_hops`, `tasks.prose_ppl_dev`), each at most 500
    characters (the whole config is also logged as a file)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            text = json.dumps(value) if not isinstance(value, str) else value
            out[_name(prefix)] = text if len(text) <= 500 else text[:497] + "..."

    walk("", cfg.model_dump(mode="json"))
    return out


# ---- the trackers --------------------------------------------------------------------------
class Tracker(ABC):
    """One tracking library's run. Any method may raise: `Tracking` turns that into a warning line."""

    name: ClassVar[str]

    def state_path(self, rundir: RunDir) -> Path:
        """Where this tracker keeps its run's id in the run folder."""
        return rundir.path / "tracking" / f"{self.name}.json"

    def read_state(self, rundir: RunDir) -> dict[str, Any]:
        """What an earlier start of this run wrote ({} if none, or unreadable: a pipe, a damaged file)."""
        try:
            data = read_json(self.state_path(rundir), TrackingError)
        except DfsMergeError:
            return {}
        return data if isinstance(data, dict) else {}

    def write_state(self, rundir: RunDir, state: dict[str, Any]) -> None:
        path = self.state_path(rundir)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(state, indent=1))

    @abstractmethod
    def start(self, cfg: RunConfig, rundir: RunDir, resume: bool) -> str:
        """Open (or, when resuming, reopen) the tracker's run; returns a line saying where it logs."""

    @abstractmethod
    def log_evaluation(self, generation: int, key: str, genome: dict[str, Any], evaluation: Evaluation,
                       index: int) -> None:
        """One new evaluation (never a cache hit nor one recovered from evals.jsonl); `index` is 1-based."""

    @abstractmethod
    def log_generation(self, summary: dict[str, Any]) -> None:
        """A finished generation's history record (generation, best, mean, counters, seconds)."""

    @abstractmethod
    def log_best(self, genome_path: Path, scores: dict[str, Any]) -> None:
        """The run's result: the best genome file and its scores per split (dev, and val / test if scored)."""

    @abstractmethod
    def finish(self, status: Status) -> None:
        """Close the tracker's run."""


class WandbTracker(Tracker):
    """Weights & Biases. `tracking_project` names the project (default dfs-merge), `tracking_uri` the server
    (W&B's `base_url`; default: the user's W&B settings). Resume: `wandb.init(id=..., resume="allow")` with the
    id kept in the run folder, so a resumed run logs into the same W&B run (offline: a new local run folder
    with the same id, which `wandb sync` adds to that run)."""

    name = "wandb"

    def start(self, cfg: RunConfig, rundir: RunDir, resume: bool) -> str:
        import wandb

        state = self.read_state(rundir) if resume else {}
        folder = rundir.path / "tracking"
        folder.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(base_url=cfg.tracking_uri) if cfg.tracking_uri else None
        self.wandb = wandb
        self.run = wandb.init(project=cfg.tracking_project or DEFAULT_PROJECT, name=rundir.path.resolve().name,
                              id=state.get("run_id"), resume="allow", dir=str(folder), settings=settings,
                              tags=["resumed"] if state else None)
        self.run.config.update(cfg.model_dump(mode="json"), allow_val_change=True)
        self.run.define_metric("eval/index")
        self.run.define_metric("eval/*", step_metric="eval/index")
        self.run.define_metric("gen/generation")
        self.run.define_metric("gen/*", step_metric="gen/generation")
        self.write_state(rundir, {"run_id": self.run.id, "project": self.run.project})
        return (f"wandb run {self.run.id}{' (resumed)' if state else ''} in project {self.run.project}, "
                f"{'offline: ' if self.run.settings.mode == 'offline' else ''}{self.run.dir}")

    def log_evaluation(self, generation: int, key: str, genome: dict[str, Any], evaluation: Evaluation,
                       index: int) -> None:
        self.run.log(evaluation_metrics(index, generation, evaluation))

    def log_generation(self, summary: dict[str, Any]) -> None:
        self.run.log(generation_metrics(summary))

    def log_best(self, genome_path: Path, scores: dict[str, Any]) -> None:
        self.run.summary.update(best_metrics(scores))
        artifact = self.wandb.Artifact("best-genome", type="genome",
                                       metadata={"dev_score": scores.get("dev", {}).get("score")})
        artifact.add_file(str(genome_path), name=genome_path.name)
        self.run.log_artifact(artifact)

    def finish(self, status: Status) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


class MlflowTracker(Tracker):
    """MLflow, through `MlflowClient` (no global active run). `tracking_uri`, else `MLFLOW_TRACKING_URI`, else a
    SQLite store in the run folder (`default_uri`), which MLflow's client and UI open with their defaults.
    A file store (a `file:` URI, or a run folder that an older dfs-merge tracked in `tracking/mlruns`) is
    still written: MLflow 3 asks `MLFLOW_ALLOW_FILE_STORE=true` for it, set for the process unless the user
    set it. `tracking_project` names the experiment (default dfs-merge); an experiment this tracker creates
    keeps its artifacts in the run folder (`tracking/mlartifacts`) when the store is the default one (MLflow
    would put them under the working directory). Resume: the same MLflow run, its id kept in the run folder,
    marked running again."""

    name = "mlflow"
    STATUS: ClassVar[dict[str, str]] = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

    @staticmethod
    def default_uri(rundir: RunDir, resume: bool) -> tuple[str, Path | None]:
        """The run folder's own store and where its artifacts go (None: the store decides): SQLite in
        `tracking/mlflow.db`, or the legacy file store `tracking/mlruns` when a resumed folder has one and no
        database."""
        folder = (rundir.path / "tracking").resolve()
        legacy, db = folder / "mlruns", folder / "mlflow.db"
        if resume and legacy.is_dir() and not db.exists():
            return legacy.as_uri(), None
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{db}", folder / "mlartifacts"

    def start(self, cfg: RunConfig, rundir: RunDir, resume: bool) -> str:
        uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        artifacts: Path | None = None
        if not uri:
            uri, artifacts = self.default_uri(rundir, resume)
        if "://" not in uri and ":" not in uri and uri not in BARE_URIS and not Path(uri).is_dir():
            # MLflow would make a file store of any other text, a folder named after it
            raise TrackingError(f"tracking_uri: {uri!r} is neither a URI (http://, https://, file://, databricks, "
                                "...) nor an existing folder")
        if "://" not in uri or uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        for name, value in MLFLOW_REQUESTS.items():
            os.environ.setdefault(name, value)
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        self.client = client = MlflowClient(tracking_uri=uri)
        state = self.read_state(rundir) if resume else {}
        run, note = None, ""
        if state.get("run_id") and state.get("uri") == uri:
            try:
                run = client.get_run(state["run_id"])
            except Exception as err:  # deleted, or the store was moved: a new run, said so
                note = f" (run {state['run_id']} of this run folder not found there: {one_line(err, 100)})"
            else:
                client.update_run(run.info.run_id, status="RUNNING")
        elif state.get("run_id"):
            note = f" (not resuming run {state['run_id']}: it is at {state.get('uri')})"
        resumed = run is not None
        if run is None:
            experiment = cfg.tracking_project or DEFAULT_PROJECT
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(
                experiment, artifact_location=artifacts.as_uri() if artifacts else None)
            run = client.create_run(experiment_id, run_name=rundir.path.resolve().name,
                                    tags={"dfs_merge.out": str(rundir.path.resolve())})
        self.run_id = run.info.run_id
        self.write_state(rundir, {"run_id": self.run_id, "uri": uri})
        # params cannot change once logged: a resumed run adds the keys it lacks (config.yaml holds them all)
        params = {k: v for k, v in flat_config(cfg).items() if k not in run.data.params}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(self.run_id, params=items[i:i + 100])
        client.log_dict(self.run_id, cfg.model_dump(mode="json"), "config.yaml")
        return f"mlflow run {self.run_id}{' (resumed)' if resumed else ''} at {uri}{note}"

    def _metrics(self, values: dict[str, float], step: int) -> None:
        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, ms, step) for k, v in values.items()])

    def log_evaluation(self, generation: int, key: str, genome: dict[str, Any], evaluation: Evaluation,
                       index: int) -> None:
        self._metrics(evaluation_metrics(index, generation, evaluation), index)

    def log_generation(self, summary: dict[str, Any]) -> None:
        self._metrics(generation_metrics(summary), int(summary.get("generation", 0)))

    def log_best(self, genome_path: Path, scores: dict[str, Any]) -> None:
        self._metrics(best_metrics(scores), 0)
        self.client.log_artifact(self.run_id, str(genome_path))

    def finish(self, status: Status) -> None:
        self.client.set_terminated(self.run_id, self.STATUS[status])


# ---- what the loop calls -------------------------------------------------------------------
class Tracking:
    """The run's tracker (or none), behind calls that never raise once it has started."""

    def __init__(self, cfg: RunConfig | None = None, rundir: RunDir | None = None,
                 log: Callable[[str], Any] = print):
        self.cfg = cfg
        self.rundir = rundir
        self.log = log
        name = cfg.tracking if cfg is not None else None
        self.tracker: Tracker | None = tracker_class(name)() if name else None
        self.started = False

    def start(self, resume: bool) -> None:
        """Start the tracker before the first evaluation. A tracker that cannot start raises `TrackingError`
        (one line), or with `tracking_optional` logs one warning and the run goes on untracked."""
        if self.tracker is None or self.started:
            return
        assert self.cfg is not None and self.rundir is not None
        name = self.tracker.name
        try:
            if self.cfg.tracking_uri:
                check_reachable(self.cfg.tracking_uri, f"{self.cfg.tracking_uri} (tracking_uri)", TrackingError)
            line = self.tracker.start(self.cfg, self.rundir, resume)
        except Exception as err:  # a missing library, a bad URI, a refused login: the library's own exception
            self._drop()
            reason = str(err) if isinstance(err, DfsMergeError) else one_line(err)
            if isinstance(err, ImportError):
                reason += f" ({INSTALL_HINT})"
            if not self.cfg.tracking_optional:
                raise TrackingError(f"tracking: {name} cannot start: {reason}; set tracking_optional: true "
                                    "to run without it") from None
            self.log(f"warning: tracking: {name} cannot start: {reason}; the run goes on without it")
            return
        self.started = True
        self.log(f"tracking: {line}")

    def _drop(self) -> None:
        """Forget the tracker, closing what it opened as well as it can."""
        tracker, self.tracker = self.tracker, None
        try:
            if tracker is not None:
                tracker.finish("failed")
        except Exception:  # it is already the broken one
            pass

    def _call(self, what: str, method: str, *args: Any) -> None:
        if self.tracker is None or not self.started:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as err:
            name = self.tracker.name
            self._drop()
            self.log(f"warning: tracking: {name} failed logging {what} ({one_line(err)}); tracking is off for "
                     "the rest of the run, which goes on")

    def evaluation(self, generation: int, key: str, genome: dict[str, Any], evaluation: Evaluation,
                   index: int) -> None:
        """A new evaluation, as the ledger records it."""
        self._call("an evaluation", "log_evaluation", generation, key, genome, evaluation, index)

    def generation(self, summary: dict[str, Any]) -> None:
        """A finished generation's history record."""
        self._call(f"generation {summary.get('generation')}", "log_generation", summary)

    def best(self, genome_path: Path, scores: dict[str, Any]) -> None:
        """The best genome file at the end of the run, and its scores."""
        self._call("the best genome", "log_best", genome_path, scores)

    def close(self, error: BaseException | None = None) -> None:
        """Close the tracker's run: finished, or failed / killed when `error` ends the run."""
        if self.tracker is None or not self.started:
            return
        status: Status = ("finished" if error is None else
                          "killed" if isinstance(error, KeyboardInterrupt | SystemExit) else "failed")
        tracker, self.tracker = self.tracker, None
        try:
            tracker.finish(status)
        except Exception as err:
            self.log(f"warning: tracking: {tracker.name} failed closing its run ({one_line(err)})")
