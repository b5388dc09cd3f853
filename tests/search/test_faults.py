"""Placement and fault handling of the evaluation backends (issue 18): workers placed on GPUs (tested through the
resources each asks for, no GPU needed), a dead worker, actor or node is no fitness, a two-node Ray cluster that
loses a node in the middle of a generation, a process-pool worker killed with SIGKILL."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
from synthetic import QUIET, Logged, TargetRoute, calls, evals, make_config, outcome
from test_backends import CrashesOn, genomes

from dfs_merge.search.backends import (
    InProcessEvaluator,
    ProcessPoolEvaluator,
    RayEvaluator,
    make_evaluator,
    ray_actor_options,
    visible_gpus,
)
from dfs_merge.search.evolution import run_evolution


def scored_keys(out) -> list[str]:
    """The keys of evals.jsonl, each line once; asserts that none is an infrastructure fault."""
    records = evals(out)
    assert not [r for r in records if (r["error"] or "").startswith("infrastructure")]
    return [r["key"] for r in records]


# ---- placement ----------------------------------------------------------------------------------------
def test_gpu_count_sets_the_pool_and_each_worker_sees_its_own_gpu(sources, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus(3) == ["0", "1", "2"] and visible_gpus(0) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus(2) == ["3", "5"] and visible_gpus(1) == ["3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    cpu = make_evaluator(make_config(sources, tmp_path), TargetRoute(), gpu_count=2)
    assert isinstance(cpu, InProcessEvaluator)  # cpu: one worker unless `workers` says more
    log = tmp_path / "calls.log"
    ev = make_evaluator(make_config(sources, tmp_path, device="cuda"), Logged(log, sleep=0.3), gpu_count=2)
    assert isinstance(ev, ProcessPoolEvaluator) and ev.workers == 2 and ev.gpus == ["0", "1"]
    assert ev.slots() == [(0, "0"), (1, "1")]
    with ev:
        results = dict(ev.submit(genomes(sources)))
    assert all(e.ok or e.hops == 3 for e in results.values())
    gpu_of = {pid: gpu for _, _, pid, gpu in calls(log)}
    assert sorted(gpu_of.values()) == ["0", "1"]  # two processes, one GPU each
    none = make_evaluator(make_config(sources, tmp_path, device="cuda"), TargetRoute(), gpu_count=0)
    assert isinstance(none, InProcessEvaluator)  # no GPU: its setup says so in one line (test below)


def test_cuda_without_cuda_is_one_line_and_exit_2(tiny_source_dirs, tmp_path, capsys):
    import torch
    import yaml

    from dfs_merge import cli

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "sources": [str(p) for p in tiny_source_dirs], "repeats": 2, "tasks": {"cloze_mc_dev": 1.0}, "limit": 1,
        "population": 4, "generations": 1, "device": "cuda", "out": str(tmp_path / "run"),
    }))
    assert cli.main(["evolve", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no CUDA device" in err, err


@pytest.mark.slow
def test_each_ray_actor_asks_for_its_gpus_or_its_threads(sources, tmp_path):
    ray = pytest.importorskip("ray")
    assert ray_actor_options(4) == {"num_cpus": 4, "max_restarts": 0, "max_task_retries": 0}
    assert ray_actor_options(4, 0.5) == {"num_cpus": 1, "num_gpus": 0.5, "max_restarts": 0, "max_task_retries": 0}
    ray.init(num_cpus=3, num_gpus=1, include_dashboard=False, log_to_driver=False)  # one logical GPU, no card
    try:
        cfg = make_config(sources, tmp_path, ray="local", device="cuda", gpus_per_worker=0.5, threads=1)
        with make_evaluator(cfg, TargetRoute()) as ev:  # workers: as many as the cluster's GPU holds, 2
            assert isinstance(ev, RayEvaluator) and ev.workers == 2
            assert ev.wait_ready(120) == 2  # both placed: Ray had room for two halves of its one GPU
            results = dict(ev.submit(genomes(sources)))
            assert len(results) == 5
            placed = list(ev.placements.values())
        assert len(placed) == 2  # both share the one GPU, each given half of it by Ray itself
        assert all(p["resources"] == {"CPU": 1.0, "GPU": 0.5} and p["cuda_visible_devices"] == "0" for p in placed)
        with RayEvaluator(TargetRoute(), 1, threads=2) as ev:  # a CPU actor asks for as many CPUs as threads
            dict(ev.submit(genomes(sources)[:1]))
            ((info),) = ev.placements.values()
        assert info["resources"] == {"CPU": 2.0}
    finally:
        ray.shutdown()


# ---- faults are not fitness ---------------------------------------------------------------------------
def test_a_genome_that_kills_every_worker_is_lost_not_scored_and_retried_on_resume(sources, tmp_path):
    """Its worker dies every time: after the bounded tries it is lost ("infrastructure: ..."), not in evals.jsonl,
    not known; restarted from evals.jsonl with healthy workers, the run equals one that never had a fault."""
    with ProcessPoolEvaluator(CrashesOn(hops=6), workers=2, threads=1, retries=1) as ev:
        results = dict(ev.submit(genomes(sources)))
    lost = [e for e in results.values() if e.error]
    assert [e.hops for e in lost] == [6] and lost[0].infrastructure and "worker process died" in lost[0].error
    assert sum(e.ok for e in results.values()) == 4  # the genomes beside it were scored
    kw = {"generations": 2, "population": 6, "seed": 2, "workers": 2, "threads": 1}
    run_evolution(make_config(sources, tmp_path / "clean", **kw), evaluate=TargetRoute(), **QUIET)
    faulty = make_config(sources, tmp_path / "faulty", infrastructure_retries=0, **kw)
    run_evolution(faulty, evaluate=CrashesOn(hops=7), **QUIET)
    state = json.loads((tmp_path / "faulty" / "checkpoint.json").read_text())
    assert state["lost"], "no 7-hop genome was asked for: pick another hop count"
    keys = scored_keys(tmp_path / "faulty")
    assert len(keys) == len(set(keys)) and not set(state["lost"]) & set(keys)
    (tmp_path / "faulty" / "checkpoint.json").rename(tmp_path / "faulty.checkpoint.json")
    run_evolution(faulty, resume=True, evaluate=TargetRoute(), **QUIET)
    assert set(state["lost"]) <= set(scored_keys(tmp_path / "faulty"))  # evaluated again, this time scored
    assert outcome(tmp_path / "faulty") == outcome(tmp_path / "clean")


def test_process_pool_worker_killed_mid_generation(sources, tmp_path):
    """A worker SIGKILLed in the middle of generation 1: its genome (and the one beside it) is evaluated again;
    no fault in evals.jsonl, every key once, the outcome of the fault-free run."""
    t0 = time.perf_counter()
    kw = {"generations": 3, "population": 6, "seed": 3}
    run_evolution(make_config(sources, tmp_path / "clean", **kw), evaluate=TargetRoute(), **QUIET)
    log = tmp_path / "calls.log"
    run_evolution(make_config(sources, tmp_path / "killed", workers=2, threads=1, **kw),
                  evaluate=Logged(log, sleep=0.05, kill_after=8), **QUIET)
    victim = (tmp_path / "calls.log.killed").read_text()
    counts = Counter(c[0] for c in calls(log))
    keys = scored_keys(tmp_path / "killed")
    assert counts[victim] >= 2 and len(keys) == len(set(keys)) == len(counts)
    assert outcome(tmp_path / "killed") == outcome(tmp_path / "clean")
    print(f"\npool SIGKILL: {len(keys)} evaluations, {sum(counts.values()) - len(counts)} retried, "
          f"{time.perf_counter() - t0:.1f}s")


@pytest.mark.slow
def test_two_node_ray_cluster_loses_a_node_mid_generation(sources, tmp_path):
    """Two Ray nodes of one CPU each, one actor on each; the second node is removed while its actor holds a
    genome of generation 1 (the actor waits inside the evaluation until its node is gone). That genome is evaluated again on the head; the actor's replacement waits for room
    that never comes back, and the run completes on the head node alone, equal to the in-process run."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    t0 = time.perf_counter()
    kw = {"generations": 3, "population": 6, "seed": 7}
    run_evolution(make_config(sources, tmp_path / "single", **kw), evaluate=TargetRoute(), **QUIET)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    log = tmp_path / "calls.log"
    held = tmp_path / "calls.log.held"
    stop, removed = threading.Event(), threading.Event()
    try:
        head = cluster.head_node.node_id
        worker = cluster.add_node(num_cpus=1)
        second = worker.node_id
        cluster.wait_for_nodes()

        def remove_when_held() -> None:  # the actor on the second node holds a genome of generation 1
            while not stop.is_set():
                if held.exists():
                    cluster.remove_node(worker)
                    removed.set()
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=remove_when_held, daemon=True)
        watcher.start()
        cfg = make_config(sources, tmp_path / "cluster", workers=2, threads=1, ray=cluster.address, **kw)
        run_evolution(cfg, evaluate=Logged(log, sleep=0.4, hold=(second, 7)), **QUIET)  # slow enough for a late actor
        assert not ray.is_initialized()
    finally:
        stop.set()
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    assert removed.is_set()
    rows = calls(log)
    assert {r[1] for r in rows} == {head, second}  # evaluation was spread over both nodes
    counts = Counter(r[0] for r in rows)
    retried = [k for k, n in counts.items() if n > 1]
    assert held.read_text() in retried  # the held genome was evaluated again
    assert retried and all([r for r in rows if r[0] == k][-1][1] == head for k in retried)  # redone on the head
    keys = scored_keys(tmp_path / "cluster")
    assert len(keys) == len(set(keys)) == len(counts)  # every genome once among the scored evaluations
    assert outcome(tmp_path / "cluster") == outcome(tmp_path / "single")
    print(f"\nray two nodes: {len(keys)} evaluations ({sum(r[1] == second for r in rows)} on the removed node), "
          f"{sum(counts.values()) - len(counts)} retried, {time.perf_counter() - t0:.1f}s")
