"""Hostile input, round 2 (issue 30): one writer per run folder, resumes that cannot mix unlike scores, finite
numbers everywhere, bounded sizes and reads, bounded waits on the network.

Each refusal is asserted as the user sees it: exit code 2, one line (at most three besides progress bars), no
traceback, and (where the command is refused before it starts) nothing under the work folder written or changed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from builders import assert_refused, deadline, run_cli, tree_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import QUIET, TargetRoute, write_fake_sources

from dfs_merge.config import load_config
from dfs_merge.errors import ConfigError, DfsMergeError, ExportError, GenomeError
from dfs_merge.evaluation import Evaluation, TaskResult
from dfs_merge.export.verify import VerifyResult, check_verified, logits_problem
from dfs_merge.genome_files import load_genome, save_genome
from dfs_merge.inputs import MAX_DEPTH, parse_json, parse_yaml, read_json
from dfs_merge.merging.recipe import MAX_MAGNITUDE, initial_recipe
from dfs_merge.network import check_reachable
from dfs_merge.search.evolution import run_evolution
from dfs_merge.search.ledger import finite
from dfs_merge.search.rundir import LOCK_NAME, RunLock

_TMP = tempfile.TemporaryDirectory(prefix="dfs-round2-")  # for hypothesis examples (no function fixtures there)
# a bundled task: `evolve` looks every task name up before it starts (in-process runs score with `TargetRoute`)
RUN = {"repeats": 2, "scaling": "slot", "tasks": {"prose_ppl_dev": 1.0}, "population": 6, "generations": 1, "seed": 0}


@pytest.fixture()
def work(tmp_path: Path) -> dict[str, Path]:
    """Two config-only sources (4 layers each) and a run config over them (out: work/run)."""
    sources = write_fake_sources(tmp_path / "sources")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"sources": sources, **RUN, "out": str(tmp_path / "run")}))
    return {"root": tmp_path, "config": config, "run": tmp_path / "run"}


def config_with(work: dict[str, Path], name: str = "edited.yaml", **changes: Any) -> Path:
    """A copy of the work config with `changes` (a value None removes the key)."""
    data = yaml.safe_load(work["config"].read_text())
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not None}
    path = work["root"] / name
    path.write_text(yaml.safe_dump(data))
    return path


def finished_run(work: dict[str, Path]) -> Path:
    """The work config run to its end with the synthetic fitness; returns the run folder."""
    run_evolution(load_config(work["config"]), evaluate=TargetRoute(), **QUIET)
    return work["run"]


def refused_unchanged(work: dict[str, Path], *argv: Any, phrases: tuple[str, ...] = ()) -> str:
    """Run the command; assert it is refused in one line and writes nothing under the work folder."""
    before = tree_state(work["root"])
    result = run_cli(*argv)
    assert_refused(result, *phrases)
    assert tree_state(work["root"]) == before
    return result.err


def free_port() -> int:
    """A local TCP port that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- one writer per run folder

def test_a_second_evolve_on_a_live_run_folder_is_refused(work):
    """While a run holds the folder, `evolve` and `evolve --resume` there are refused in one line, and the live
    run finishes with each key logged once."""
    seen: list[Any] = []

    class SecondWhileRunning(TargetRoute):
        def __call__(self, genome):
            if not seen:  # the first evaluation of the live run: try a second run on its folder
                seen.append(run_cli("evolve", work["config"]))
                seen.append(run_cli("evolve", work["config"], "--resume"))
            return super().__call__(genome)

    run_evolution(load_config(work["config"]), evaluate=SecondWhileRunning(), **QUIET)
    for result in seen:
        assert_refused(result, "is in use by another run (process", str(os.getpid()))
    keys = [json.loads(line)["key"] for line in (work["run"] / "evals.jsonl").read_text().splitlines()]
    assert keys and len(keys) == len(set(keys))
    assert (work["run"] / LOCK_NAME).read_text() == ""  # released at the end: no holder named


def test_a_lock_held_by_another_process_refuses_and_a_dead_ones_is_taken_over(work):
    finished_run(work)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from dfs_merge.search.rundir import RunLock;"
         " lock = RunLock(Path(sys.argv[1])); lock.acquire(); lock.mark(); print('held', flush=True); time.sleep(60)",
         str(work["run"])], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused_unchanged(work, "evolve", work["config"], "--resume",
                          phrases=("is in use by another run", f"process {holder.pid}"))
    finally:
        holder.kill()  # killed while holding: its name stays in the lock file, the kernel drops the lock
        holder.wait()
    lines: list[str] = []
    cfg = load_config(config_with(work, generations=2))
    run_evolution(cfg, resume=True, evaluate=TargetRoute(), progress=False, log=lines.append)
    took = [line for line in lines if "took over the lock" in line]
    assert len(took) == 1 and f"process {holder.pid}" in took[0] and "no longer running" in took[0]


def test_a_lock_without_flock_is_decided_by_the_holders_pid(tmp_path, monkeypatch):
    from dfs_merge.search import rundir

    monkeypatch.setattr(rundir, "fcntl", None)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "since": "then"}))
    with pytest.raises(ConfigError, match="in use by another run"):
        RunLock(tmp_path).acquire()  # pid 1 is alive
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname(), "since": "then"}))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert "process 4194311" in lock.previous
    lock.release()


@pytest.mark.parametrize("key, value", [("limit", 7), ("population", 8)])
def test_resume_refuses_a_search_change_made_in_both_configs(work, key, value):
    """Editing the run folder's config.yaml along with the config does not hide the change: the checkpoint
    recorded the search config (and without the checkpoint, each evaluation line its digest)."""
    run = finished_run(work)
    edited = config_with(work, **{key: value})
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, key: value}))
    refused_unchanged(work, "evolve", edited, "--resume", phrases=(f"resume: {key} differs from the checkpoint",))
    (run / "checkpoint.json").unlink()
    refused_unchanged(work, "evolve", edited, "--resume", phrases=("holds evaluations made under another search config",))


def test_resume_with_a_damaged_sources_json_is_refused_with_the_way_out(work):
    run = finished_run(work)
    for damaged in ("garbage{", "[1, 2]", '[{"path": "x", "fingerprint": NaN}, {}]'):
        (run / "sources.json").write_text(damaged)
        refused_unchanged(work, "evolve", work["config"], "--resume",
                          phrases=("sources.json", "delete it to resume without checking"))


@pytest.mark.parametrize("resume", [False, True])
def test_a_foreign_folder_is_never_written_into(work, resume):
    foreign = work["root"] / "a-model"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    (foreign / "model.safetensors").write_bytes(b"\0" * 16)
    refused_unchanged(work, "evolve", work["config"], "--out", foreign, *(["--resume"] if resume else []),
                      phrases=("is not empty: it holds files that are not a run's", "config.json"))


# --------------------------------------------------------------------------- finite everywhere

def recipe_file(work: dict[str, Path], **changes: Any) -> Path:
    """A recipe file over the work sources, with `changes` written into it."""
    sources = yaml.safe_load(work["config"].read_text())["sources"]
    path = work["root"] / "r.recipe.yaml"
    save_genome(initial_recipe(sources, 4, "task_arithmetic", 0, 2), path)
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes, phrase", [
    ({"weights": {1: [1e38, 0.5]}}, "weights[1][0]: 1e+38 is beyond the ±10000"),
    ({"lambda": 1e30}, "lambda: 1e+30 is beyond the ±10000"),
])
def test_a_recipe_of_huge_values_is_refused_before_any_work(work, changes, phrase):
    bad = recipe_file(work, **changes)
    refused_unchanged(work, "show", bad, phrases=(phrase,))
    refused_unchanged(work, "export", bad, "--out", work["root"] / "exported", phrases=(phrase,))


@pytest.mark.parametrize("merge, phrase", [
    ({"weight_range": [-1e308, 1e308]}, "weight_range: -1e+308 is beyond"),
    ({"init_weight": -1e308}, "init_weight: -1e+308 is beyond"),
    ({"lambda": 1e308}, "lambda: 1e+308 is beyond"),
    ({"lambda": 20000.0}, "lambda: 20000.0 is beyond"),
])
def test_merge_config_values_a_merge_cannot_represent_are_refused(work, merge, phrase):
    config = config_with(work, repeats=None, scaling=None,
                         merge={"method": "task_arithmetic", "base": 0, "layer_groups": 2, **merge})
    refused_unchanged(work, "evolve", config, phrases=(phrase,))


@pytest.mark.parametrize("key, value", [("repeats", 2), ("scaling", "transition")])
def test_data_flow_keys_beside_merge_are_refused_not_ignored(work, key, value):
    config = config_with(work, **{"repeats": None, "scaling": None, key: value},
                         merge={"method": "task_arithmetic", "base": 0, "layer_groups": 2})
    refused_unchanged(work, "evolve", config, phrases=(f"{key}: a parameter-space search (merge:)",))


def test_a_hop_scale_beyond_the_bound_is_refused(work):
    sources = yaml.safe_load(work["config"].read_text())["sources"]
    from dfs_merge.genome import ConstraintsConfig, Genome
    from dfs_merge.route import Route

    path = work["root"] / "g.genome.yaml"
    save_genome(Genome.from_route(Route.parse("0:0-3"), sources[:1], [4], 1, "slot", ConstraintsConfig()), path)
    data = yaml.safe_load(path.read_text())
    data["scales"] = [1e300, 1.0, 1.0, 1.0]  # one per slot
    path.write_text(yaml.safe_dump(data))
    refused_unchanged(work, "show", path, phrases=("1e+300 is beyond the 10000",))
    with pytest.raises(GenomeError):
        load_genome(path)


class NonFiniteSometimes(TargetRoute):
    """TargetRoute whose routes of an odd hop count score NaN (the task's value, as a broken model gives) and
    of 5 hops infinitely well."""

    def __call__(self, genome):
        ev = super().__call__(genome)
        if ev.hops % 2:
            task = TaskResult("synthetic", "neg_distance", math.nan, True, 1, 0.0)
            return Evaluation.failed("task synthetic: neg_distance is nan", ev.hops, 0.0, {"synthetic": task})
        if ev.hops == 6:
            return Evaluation(math.inf, ev.hops, ev.tasks)
        return ev


def test_a_non_finite_metric_is_a_failed_evaluation_and_the_run_goes_on(work):
    cfg = load_config(config_with(work, generations=3, population=8))
    result = run_evolution(cfg, evaluate=NonFiniteSometimes(), **QUIET)
    lines = (work["run"] / "evals.jsonl").read_text().splitlines()
    records = [parse_json(line, finite=True) for line in lines]  # NaN or Infinity would be refused
    assert result.generations == 3 and records
    failed = [r for r in records if r["hops"] % 2 or r["hops"] == 6]
    assert failed and all(r["error"] for r in failed)
    assert all(r["score"] == -1e9 for r in failed)
    assert read_json(work["run"] / "checkpoint.json", finite=True)["generation"] == 3


def test_finite_keeps_a_finite_evaluation_and_names_the_first_non_finite_number():
    ok = Evaluation(0.5, 3, {"t": TaskResult("t", "acc", 0.5, True, 10, 1.0)})
    assert finite(ok) is ok
    bad = finite(Evaluation(0.5, 3, {"t": TaskResult("t", "acc", 0.5, True, 10, math.inf)}))
    assert bad.error == "tasks.t.seconds is inf, not a finite number" and not bad.ok and bad.tasks == {}


def test_verification_of_all_zero_or_non_finite_logits_is_a_failure():
    assert math.isnan(VerifyResult(0.0, 0.0, True, 16).rel_error)  # 0/0 is no agreement
    with pytest.raises(ExportError, match="verify failed"):
        check_verified(VerifyResult(0.0, 0.0, True, 16), torch.float32)
    assert logits_problem("the written checkpoint", torch.zeros(1, 3, 8)) == \
        "the written checkpoint gives logits that are all zero"
    assert logits_problem("x", torch.tensor([1.0, math.nan])) == "x gives non-finite logits"
    assert logits_problem("x", torch.tensor([0.0, 1e-3])) is None
    with pytest.raises(ExportError, match="all zero"):
        check_verified(VerifyResult(math.nan, math.nan, None, 0, "x gives logits that are all zero"), torch.float32)


# --------------------------------------------------------------------------- bounded sizes and reads

@pytest.mark.parametrize("changes, phrase", [
    ({"population": 1_000_000_000}, "population: Input should be less than or equal to 10000"),
    ({"repeats": 100_000}, "repeats: Input should be less than or equal to 65536"),
    ({"repeats": 20_000}, "repeats: 20000 repeats of the sources' 8 layers are 160000 slots, more than the 65536"),
    ({"generations": 10**12}, "generations: Input should be less than or equal to 1000000"),
    ({"limit": 10**30}, "limit"),
    ({"tournament": 10**9}, "tournament: Input should be less than or equal to 10000"),
    ({"workers": 10**9}, "workers: Input should be less than or equal to 1024"),
    ({"resample_duplicates": 10**9}, "resample_duplicates"),
    ({"scale_range": [0.5, 1e300]}, "scale_range must satisfy 0 < low <= high <= 10000"),
    ({"cma_sigma": float("inf")}, "cma_sigma"),
])
def test_sizes_that_make_a_run_impossible_are_one_line(work, changes, phrase):
    refused_unchanged(work, "evolve", config_with(work, **changes), phrases=(phrase,))


def test_a_repeated_yaml_key_is_refused(work):
    text = work["config"].read_text() + "population: 9\n"
    (work["root"] / "twice.yaml").write_text(text)
    refused_unchanged(work, "evolve", work["root"] / "twice.yaml",
                      phrases=("the key population is given twice in one mapping (line",))
    assert parse_yaml("a: 1\nb: {a: 1}\n") == {"a": 1, "b": {"a": 1}}  # the same key in two mappings is fine


@pytest.mark.parametrize("checkpoint, phrase", [
    ('{"format": "dfs-merge/checkpoint@1", "generation": NaN}', "NaN is not a number JSON allows"),
    ('{"format": "dfs-merge/checkpoint@1", "generation": 1e999}', "beyond the largest float"),
    ('{"format": "dfs-merge/checkpoint@1", "generation": "0"}', "generation: '0' is not a generation number"),
    ('{"format": "dfs-merge/checkpoint@1", "generation": 0.5}', "generation: 0.5 is not a generation number"),
    ("[" * 100_000 + "]" * 100_000, f"nested more than {MAX_DEPTH} deep"),
])
def test_a_damaged_checkpoint_is_one_line(work, checkpoint, phrase):
    run = finished_run(work)
    (run / "checkpoint.json").write_text(checkpoint)
    refused_unchanged(work, "evolve", work["config"], "--resume", phrases=("checkpoint.json", phrase))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("special", ["fifo", "device"])
def test_a_run_log_that_is_a_pipe_or_a_device_is_refused_without_waiting(work, special):
    run = finished_run(work)
    (run / "evals.jsonl").unlink()
    if special == "fifo":
        os.mkfifo(run / "evals.jsonl")
    else:
        (run / "evals.jsonl").symlink_to("/dev/zero")
    with deadline(30):
        refused_unchanged(work, "evolve", work["config"], "--resume",
                          phrases=("evals.jsonl: is not a regular file (a pipe, device or socket)",))


def test_a_deeply_nested_log_line_is_left_out_with_a_warning(work, caplog):
    run = finished_run(work)
    with open(run / "evals.jsonl", "a") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n")
        f.write("[1, 2]\n")
    cfg = load_config(config_with(work, generations=2))
    result = run_evolution(cfg, resume=True, evaluate=TargetRoute(), **QUIET)
    assert result.generations == 2
    assert any(f"nested more than {MAX_DEPTH} deep" in r.getMessage() for r in caplog.records)
    assert any("not a JSON object" in r.getMessage() for r in caplog.records)


def test_parse_json_refuses_what_json_dumps_would_refuse_to_write():
    for text, phrase in [("NaN", "NaN is not a number"), ("[-Infinity]", "-Infinity is not a number"),
                         ('{"a": 1e400}', "beyond the largest float"), ("[" * 5000, "nested more than")]:
        with pytest.raises(ConfigError, match=phrase) as err:
            parse_json(text, ConfigError, "x.json", finite=True)
        assert str(err.value).startswith("x.json: not valid JSON (") and "\n" not in str(err.value)
    assert parse_json('{"a": "[[[[", "b": [1.5, {"c": null}]}') == {"a": "[[[[", "b": [1.5, {"c": None}]}
    assert math.isnan(parse_json('{"eps": NaN}')["eps"])  # a model's config.json may hold one: only `finite` refuses
    nested = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert parse_json(nested) is not None and parse_json(f'["{"[" * 5000}"]') == ["[" * 5000]


# --------------------------------------------------------------------------- bounded waits

def test_a_ray_address_where_nothing_listens_is_one_line_before_anything_is_written(work):
    port = free_port()
    refused_unchanged(work, "evolve", config_with(work, ray=f"127.0.0.1:{port}"),
                      phrases=(f"ray: 127.0.0.1:{port}: cannot reach 127.0.0.1:{port}",))
    assert not work["run"].exists()


def test_check_reachable_waits_at_most_its_timeout():
    with socket.socket() as server:  # listening, never accepting: a connection is queued, so it answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        check_reachable(f"http://127.0.0.1:{server.getsockname()[1]}/x", "here", ConfigError, timeout=5)
    with pytest.raises(ConfigError, match=r"^there: nothing answered at 192\.0\.2\.1:9 within 0\.2 s$|cannot reach"):
        check_reachable("192.0.2.1:9", "there", ConfigError, timeout=0.2)  # TEST-NET-1: never answers
    check_reachable("file:///tmp/mlruns", "a file store", ConfigError)  # no endpoint: nothing to wait for
    check_reachable("databricks", "a bare name", ConfigError)


def test_an_unreachable_mlflow_server_with_tracking_optional_goes_on_with_a_warning(work):
    pytest.importorskip("mlflow")
    port = free_port()
    cfg = load_config(config_with(work, tracking="mlflow", tracking_uri=f"http://127.0.0.1:{port}",
                                  tracking_optional=True))
    lines: list[str] = []
    result = run_evolution(cfg, evaluate=TargetRoute(), progress=False, log=lines.append)
    assert result.generations == 1
    warnings = [line for line in lines if line.startswith("warning: tracking: mlflow cannot start")]
    assert len(warnings) == 1 and f"cannot reach 127.0.0.1:{port}" in warnings[0]
    assert "the run goes on without it" in warnings[0]


def test_an_unreachable_or_garbage_tracking_uri_is_one_line(work, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(work["root"])
    port = free_port()
    result = run_cli("evolve", config_with(work, tracking="mlflow", tracking_uri=f"http://127.0.0.1:{port}"))
    assert_refused(result, "tracking: mlflow cannot start", f"cannot reach 127.0.0.1:{port}")
    result = run_cli("evolve", config_with(work, tracking="mlflow", tracking_uri="not a uri", out=str(work["root"] / "r2")))
    assert_refused(result, "tracking_uri: 'not a uri' is neither a URI")
    assert not (work["root"] / "not a uri").exists()


def test_the_lock_is_released_when_a_run_is_refused_after_taking_it(work):
    """A refusal after the lock was taken (a changed key) lets it go: the next resume in this process runs."""
    finished_run(work)
    with pytest.raises(ConfigError, match="seed differs"):
        run_evolution(load_config(config_with(work, seed=1)), resume=True, evaluate=TargetRoute(), **QUIET)
    result = run_evolution(load_config(config_with(work, generations=2)), resume=True, evaluate=TargetRoute(), **QUIET)
    assert result.generations == 2


def test_the_lock_is_held_across_threads_of_one_process(work):
    """flock is per open file: a second acquisition in the same process (another thread, a second run object)
    is refused too."""
    work["run"].mkdir()
    first = RunLock(work["run"])
    first.acquire()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            RunLock(work["run"]).acquire()
        except ConfigError as err:
            errors.append(err)

    t = threading.Thread(target=second)
    t.start()
    t.join()
    first.release()
    assert len(errors) == 1 and "in use by another run" in str(errors[0])


def test_a_full_disk_during_a_run_is_one_line_and_a_resume_finishes_the_run(work, monkeypatch):
    from dfs_merge.search import rundir

    real, calls = rundir.append_jsonl, []

    def fills_up(f, record):
        calls.append(record["key"])
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, record)

    monkeypatch.setattr(rundir, "append_jsonl", fills_up)
    cfg = load_config(config_with(work, generations=2))
    with pytest.raises(DfsMergeError) as err:
        run_evolution(cfg, evaluate=TargetRoute(), **QUIET)
    assert str(err.value) == (f"no space left on {work['run']}; nothing was published (every finished evaluation is "
                              "logged): free some space and resume the run (--resume)")
    monkeypatch.setattr(rundir, "append_jsonl", real)
    result = run_evolution(cfg, resume=True, evaluate=TargetRoute(), **QUIET)
    assert result.generations == 2
    keys = [json.loads(line)["key"] for line in (work["run"] / "evals.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) and set(calls[:3]) <= set(keys)


# --------------------------------------------------------------------------- properties (hypothesis)

PROPS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON_TEXT = st.one_of(
    st.text(max_size=200),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                 lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                 max_leaves=20).map(lambda v: json.dumps(v)),  # allow_nan: NaN and Infinity appear
    st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "]" * n),
)


@PROPS
@given(JSON_TEXT)
def test_parse_json_returns_finite_json_or_one_line(text):
    try:
        value = parse_json(text, ConfigError, "f.json", finite=True)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith("f.json: not valid JSON (")
        return
    json.dumps(value, allow_nan=False)  # what was read can be written back: no NaN, no infinity


@PROPS
@given(st.lists(st.one_of(JSON_TEXT, st.binary(max_size=60).map(lambda b: b.decode("latin-1"))), max_size=6),
       st.booleans())
def test_read_jsonl_returns_objects_or_one_line(lines, cut):
    from dfs_merge.atomic import read_jsonl

    path = Path(_TMP.name) / "log.jsonl"
    path.write_bytes(("\n".join(lines) + ("" if cut else "\n")).encode("utf-8", "surrogatepass"))
    try:
        records = read_jsonl(path, ConfigError)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    assert all(isinstance(r, dict) for r in records)
    json.dumps(records, allow_nan=False)


@PROPS
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=2, max_size=2),
       st.floats(allow_nan=True, allow_infinity=True))
def test_a_recipe_takes_finite_values_within_the_bound_and_refuses_others(weights, lam):
    try:
        recipe = initial_recipe(["a", "b"], 4, "task_arithmetic", 0, 2, weights[0], lam=lam)
        recipe = recipe.with_bits((), weights)
    except GenomeError as err:
        assert "\n" not in str(err) and ("not a finite number" in str(err) or "beyond the" in str(err))
        assert not all(math.isfinite(x) and abs(x) <= MAX_MAGNITUDE for x in [*weights, lam])
        return
    assert all(math.isfinite(x) and abs(x) <= MAX_MAGNITUDE for x in [*recipe.scales, recipe.lam])


def test_flags_that_would_be_ignored_are_refused(work):
    genome = work["root"] / "g.genome.yaml"
    genome.write_text("not read")
    refused_unchanged(work, "eval", work["config"], "--genome", genome, "--sources-only",
                      phrases=("--genome and --sources-only contradict each other",))
    for flag in ("--quant", "--max-shard-size"):
        refused_unchanged(work, "export", genome, "--out", work["root"] / "x", flag, "",
                          phrases=(f"{flag}: an empty value",))
