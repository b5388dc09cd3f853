"""Trackers (`tracking: wandb | mlflow`), offline: W&B's offline run and MLflow's local stores are read back.

Runs use the synthetic fitness (tests/synthetic.py), so no model is loaded. W&B's offline run is read from its
`run-ID.wandb` log (W&B's LevelDB-style record log of protobuf `Record`s; wandb 0.31 writes no
`wandb-summary.json` offline and has no offline reader), MLflow's through `MlflowClient`.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from synthetic import TargetRoute, evals, make_config, outcome

from dfs_merge.config import load_config
from dfs_merge.errors import ConfigError, TrackingError
from dfs_merge.search import tracking
from dfs_merge.search.evolution import run_evolution

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch) -> Path:
    """W&B offline and quiet, with every folder it writes outside the run (staging, cache, config) under tmp."""
    home = tmp_path / "wandb-home"
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_DATA_DIR": home / "data", "WANDB_CACHE_DIR": home / "cache",
                       "WANDB_CONFIG_DIR": home / "config", "WANDB_ARTIFACT_DIR": home / "artifacts"}.items():
        monkeypatch.setenv(var, str(value))
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    return home


def run(cfg, lines: list[str] | None = None, **kw: Any):
    return run_evolution(cfg, evaluate=TargetRoute(), progress=False,
                         log=(lines.append if lines is not None else lambda *_: None), **kw)


def wandb_records(run_folder: Path, timeout: float = 30.0) -> list[Any]:
    """The records of an offline W&B run, once its last one (`exit`) is on disk: `run.finish()` returns when
    wandb-core has handled the exit, and its writer may flush the file a moment later."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_log(run_folder)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def read_wandb_log(run_folder: Path) -> list[Any]:
    """The protobuf records of an offline W&B run's log: 7-byte file header, then 32 KiB blocks of chunks
    (crc32 4 bytes, length 2, type 1: full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run_folder.glob("run-*.wandb")
    data, pos, block, part, out = log.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # zero padding, or a chunk not yet all on disk
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def wandb_content(run_folder: Path) -> tuple[list[dict[str, Any]], dict[str, Any], list[Any], Any, dict[str, Any]]:
    """(history rows, final summary, artifact records, the run record, config) of an offline W&B run."""
    history, summary, artifacts, run_record, config = [], {}, [], None, {}
    for r in wandb_records(run_folder):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "artifact":
            artifacts.append(r.artifact)
        elif kind == "run":
            run_record = r.run
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    return history, summary, artifacts, run_record, config


@pytest.mark.slow  # MLflow / W&B: their imports alone take seconds
def test_wandb_offline_run_holds_every_evaluation_generation_and_the_best_and_resumes_its_id(
        sources, tmp_path, wandb_offline):
    out = tmp_path / "run"
    lines: list[str] = []
    res = run(make_config(sources, out, tracking="wandb", generations=1), lines)
    state = json.loads((out / "tracking" / "wandb.json").read_text())
    assert any(line.startswith(f"tracking: wandb run {state['run_id']}") and "offline" in line for line in lines)
    (first,) = (out / "tracking" / "wandb").glob(f"offline-run-*-{state['run_id']}")
    history, summary, artifacts, run_record, config = wandb_content(first)

    logged = evals(out)
    per_eval = [h for h in history if "eval/index" in h]
    assert [h["eval/index"] for h in per_eval] == list(range(1, len(logged) + 1))
    assert [h["eval/score"] for h in per_eval] == [e["score"] for e in logged]
    assert all(h["eval/synthetic/neg_distance"] == h["eval/score"] for h in per_eval)
    per_gen = [h for h in history if "gen/generation" in h]
    assert [h["gen/generation"] for h in per_gen] == [0, 1]
    assert per_gen[-1]["gen/best"] == res.best_eval.score and per_gen[-1]["gen/evaluations"] == len(logged)
    assert summary["best/dev/score"] == res.best_eval.score and summary["best/dev/hops"] == res.best_eval.hops
    (artifact,) = artifacts
    assert artifact.name == "best-genome" and artifact.type == "genome"
    (entry,) = artifact.manifest.contents
    assert entry.path == "best.genome.yaml"
    assert Path(entry.local_path).read_bytes() == (out / "best.genome.yaml").read_bytes()  # staged copy
    assert str(wandb_offline) in entry.local_path  # staged under WANDB_DATA_DIR, not the home folder
    assert config["algorithm"] == "ga" and config["tasks"] == {"synthetic": 1.0} and config["generations"] == 1

    # resume: the same W&B run id (offline: a second local folder with that id, tagged resumed)
    lines.clear()
    res2 = run(make_config(sources, out, tracking="wandb", generations=2), lines, resume=True)
    assert json.loads((out / "tracking" / "wandb.json").read_text())["run_id"] == state["run_id"]
    assert any(f"wandb run {state['run_id']} (resumed)" in line for line in lines)
    folders = sorted((out / "tracking" / "wandb").glob(f"offline-run-*-{state['run_id']}"))
    assert len(folders) == 2
    second = next(f for f in folders if f != first)
    history, summary, _, run_record, config = wandb_content(second)
    assert config["generations"] == 2
    assert "resumed" in run_record.tags
    per_eval = [h for h in history if "eval/index" in h]
    assert [h["eval/index"] for h in per_eval] == list(range(len(logged) + 1, res2.evaluations + 1))
    assert [h["gen/generation"] for h in history if "gen/generation" in h] == [2]
    assert summary["best/dev/score"] == res2.best_eval.score


@pytest.mark.slow  # MLflow / W&B: their imports alone take seconds
def test_mlflow_file_store_holds_one_metric_per_evaluation_and_the_best_genome_and_resumes_the_run(
        sources, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = (tmp_path / "store").as_uri()
    out = tmp_path / "run"
    res = run(make_config(sources, out, tracking="mlflow", tracking_uri=store, tracking_project="exp",
                          generations=1))
    run_id = json.loads((out / "tracking" / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=store)
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and client.get_experiment(info.info.experiment_id).name == "exp"
    assert info.data.params["algorithm"] == "ga" and info.data.params["tasks.synthetic"] == "1.0"
    logged = evals(out)
    failed = client.get_metric_history(run_id, "eval/failed")
    assert sorted(m.step for m in failed) == list(range(1, len(logged) + 1))  # one per evaluation
    scores = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/score"))
    assert scores == [(i, e["score"]) for i, e in enumerate(logged, start=1)]
    assert sorted(m.step for m in client.get_metric_history(run_id, "gen/best")) == [0, 1]
    assert info.data.metrics["best/dev/score"] == res.best_eval.score
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"best.genome.yaml", "config.yaml"} <= artifacts
    staged = Path(client.download_artifacts(run_id, "best.genome.yaml", str(tmp_path / "dl")))
    assert staged.read_bytes() == (out / "best.genome.yaml").read_bytes()

    # resume, with a run option changed: the same MLflow run goes on, steps continue
    res2 = run(make_config(sources, out, tracking="mlflow", tracking_uri=store, tracking_project="exp",
                           generations=2), resume=True)
    assert json.loads((out / "tracking" / "mlflow.json").read_text())["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(run_id, "eval/failed")) == res2.evaluations == len(evals(out))
    assert sorted(m.step for m in client.get_metric_history(run_id, "gen/best")) == [0, 1, 2]
    assert client.get_run(run_id).data.params["generations"] == "1"  # params stay as first logged


class Interrupted(TargetRoute):
    """TargetRoute that is interrupted (Ctrl-C) at its `at`-th call."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def __call__(self, genome):
        if len(self.calls) + 1 == self.at:
            raise KeyboardInterrupt
        return super().__call__(genome)


@pytest.mark.slow  # MLflow / W&B: their imports alone take seconds
def test_an_interrupted_run_is_killed_in_mlflow_and_its_resume_finishes_the_same_run(sources, tmp_path,
                                                                                     monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    cfg = make_config(sources, out, tracking="mlflow", generations=1)
    with pytest.raises(KeyboardInterrupt):
        run_evolution(cfg, evaluate=Interrupted(at=11), progress=False, log=lambda *_: None)
    state = json.loads((out / "tracking" / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=state["uri"])
    assert client.get_run(state["run_id"]).info.status == "KILLED"
    assert len(client.get_metric_history(state["run_id"], "eval/failed")) == len(evals(out)) == 10
    res = run(cfg, resume=True)
    assert client.get_run(state["run_id"]).info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(state["run_id"], "eval/failed"))
    assert steps == list(range(1, res.evaluations + 1))  # none twice: recovered evaluations are not logged again


def read_mlflow_store(uri: str, run_id: str, cwd: Path) -> dict[str, Any]:
    """What MLflow's own client, with its defaults and no MLFLOW_* variable, reads of a run: its name, status,
    every metric's history as sorted (step, value) pairs, and its artifact paths (in a fresh process)."""
    script = f"""
import json
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri={uri!r})
run = client.get_run({run_id!r})
history = {{k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
           for k in run.data.metrics}}
print(json.dumps({{"name": run.info.run_name, "status": run.info.status, "metrics": history,
                  "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id))}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    read = json.loads(done.stdout.strip().splitlines()[-1])
    read["metrics"] = {k: [tuple(p) for p in v] for k, v in read["metrics"].items()}
    return read


@pytest.fixture
def mlflow_logged(monkeypatch) -> dict[str, list[tuple[int, float]]]:
    """Every metric the MLflow tracker logs, as sorted (step, value) pairs per name."""
    logged: dict[str, list[tuple[int, float]]] = {}
    send = tracking.MlflowTracker._metrics

    def spy(self, values, step):
        for k, v in values.items():
            logged.setdefault(k, []).append((step, v))
        send(self, values, step)

    monkeypatch.setattr(tracking.MlflowTracker, "_metrics", spy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return logged


@pytest.mark.slow  # MLflow / W&B: their imports alone take seconds
def test_mlflow_default_store_is_sqlite_in_the_run_folder_and_mlflows_own_client_reads_every_metric(
        sources, tmp_path, mlflow_logged):
    out, elsewhere = tmp_path / "run", tmp_path / "cwd"
    elsewhere.mkdir()
    run(make_config(sources, out, tracking="mlflow", generations=1))
    state = json.loads((out / "tracking" / "mlflow.json").read_text())
    assert state["uri"] == f"sqlite:///{(out / 'tracking' / 'mlflow.db').resolve()}"
    assert not (out / "tracking" / "mlruns").exists()
    read = read_mlflow_store(state["uri"], state["run_id"], elsewhere)
    assert read["name"] == "run" and read["status"] == "FINISHED"
    assert read["metrics"] == {k: sorted(v) for k, v in mlflow_logged.items()}  # every metric, every step
    assert len(read["metrics"]["eval/failed"]) == len(evals(out)) and "best/dev/score" in read["metrics"]
    assert {"best.genome.yaml", "config.yaml"} <= set(read["artifacts"])
    assert (out / "tracking" / "mlartifacts").is_dir() and not any(elsewhere.iterdir())  # none in the cwd


@pytest.mark.slow  # MLflow / W&B: their imports alone take seconds
def test_a_run_tracked_in_the_old_file_store_resumes_into_it(sources, tmp_path, mlflow_logged, monkeypatch):
    out = tmp_path / "run"
    legacy = (out / "tracking" / "mlruns").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", legacy)  # how an older dfs-merge wrote its default store
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run(make_config(sources, out, tracking="mlflow", generations=1))
    run_id = json.loads((out / "tracking" / "mlflow.json").read_text())["run_id"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    lines: list[str] = []
    res = run(make_config(sources, out, tracking="mlflow", generations=2), lines, resume=True)
    assert json.loads((out / "tracking" / "mlflow.json").read_text()) == {"run_id": run_id, "uri": legacy}
    assert any(f"mlflow run {run_id} (resumed) at {legacy}" in line for line in lines)
    assert not (out / "tracking" / "mlflow.db").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=legacy)
    assert len(client.get_metric_history(run_id, "eval/failed")) == res.evaluations == len(evals(out))
    assert sorted(m.step for m in client.get_metric_history(run_id, "gen/best")) == [0, 1, 2]


def test_an_unknown_tracker_is_refused_in_one_line(sources, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"sources": sources, "tasks": {"synthetic": 1.0}, "tracking": "comet"}))
    with pytest.raises(ConfigError, match="tracking: .*unknown tracker 'comet'; expected one of wandb, mlflow") as e:
        load_config(path)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        tracking.tracker_class("comet")


def test_a_tracker_that_cannot_start_stops_the_run_before_any_evaluation(sources, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # the library missing: `import wandb` raises ImportError
    out = tmp_path / "run"
    with pytest.raises(TrackingError, match=r"^tracking: wandb cannot start: \w*Error: .*dfs-merge\[tracking\]"
                                            r".*tracking_optional: true") as e:
        run(make_config(sources, out, tracking="wandb"))
    assert "\n" not in str(e.value) and not (out / "evals.jsonl").exists()
    # a bad URI: the same, and the folder may start again (nothing was evaluated)
    with pytest.raises(TrackingError, match=r"^tracking: mlflow cannot start: .*bogus") as e:
        run(make_config(sources, out, tracking="mlflow", tracking_uri="bogus://nowhere"))
    assert "\n" not in str(e.value) and not (out / "evals.jsonl").exists()

    lines: list[str] = []
    res = run(make_config(sources, out, tracking="wandb", tracking_optional=True, generations=1), lines)
    warnings = [line for line in lines if "tracking" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: tracking: wandb cannot start: ModuleNotFoundError")
    assert warnings[0].endswith("the run goes on without it") and res.evaluations == len(evals(out)) > 0


class Flaky(tracking.Tracker):
    """A tracker that breaks at its third evaluation; `calls` records what it was told."""

    name = "flaky"
    calls: list[str] = []

    def start(self, cfg, rundir, resume):
        Flaky.calls = ["start"]
        return "flaky, in memory"

    def log_evaluation(self, generation, key, genome, evaluation, index):
        Flaky.calls.append(f"eval {index}")
        if index == 3:
            raise RuntimeError("connection reset\nby peer")

    def log_generation(self, summary):
        Flaky.calls.append("generation")

    def log_best(self, genome_path, scores):
        Flaky.calls.append("best")

    def finish(self, status):
        Flaky.calls.append(f"finish {status}")


def test_a_tracker_failing_mid_run_is_one_warning_and_the_run_is_the_same(sources, tmp_path, monkeypatch):
    monkeypatch.setitem(tracking.TRACKERS, "flaky", Flaky)
    lines: list[str] = []
    run(make_config(sources, tmp_path / "tracked", tracking="flaky", generations=2), lines)
    run(make_config(sources, tmp_path / "plain", generations=2))
    assert outcome(tmp_path / "tracked") == outcome(tmp_path / "plain")
    assert Flaky.calls == ["start", "eval 1", "eval 2", "eval 3", "finish failed"]
    warnings = [line for line in lines if line.startswith("warning")]
    assert warnings == ["warning: tracking: flaky failed logging an evaluation (RuntimeError: connection reset by "
                        "peer); tracking is off for the rest of the run, which goes on"]
    assert "tracking: flaky, in memory" in lines


@pytest.mark.slow  # MLflow / W&B: their imports alone take seconds
def test_a_run_without_tracking_imports_neither_library(sources, tmp_path):
    script = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import dfs_merge.cli, dfs_merge.fitness.lm_eval_glue, lm_eval.evaluator, transformers
from synthetic import TargetRoute, make_config
from dfs_merge.search.evolution import run_evolution
run_evolution(make_config({sources!r}, {str(tmp_path / 'run')!r}, generations=1), evaluate=TargetRoute(),
              progress=False, log=lambda *_: None)
print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'mlflow')))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    run(make_config(sources, tmp_path / "here", generations=1))  # the same run in this process
    assert evals(tmp_path / "run") and outcome(tmp_path / "run") == outcome(tmp_path / "here")
