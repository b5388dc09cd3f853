"""Evaluation backends: in-process, process pool and Ray give the same results, and survive failures."""

from __future__ import annotations

import os
import pickle
import sys

import pytest
from synthetic import QUIET, TARGET, TargetRoute, make_config, outcome

from dfs_merge.candidate import CandidateScorer
from dfs_merge.errors import ConfigError, DfsMergeError
from dfs_merge.evaluation import WORST_SCORE
from dfs_merge.genome import Genome, Route
from dfs_merge.search.backends import (
    InProcessEvaluator,
    ModelEvaluator,
    ProcessPoolEvaluator,
    import_ray,
    make_evaluator,
)
from dfs_merge.search.evolution import run_evolution


def genomes(sources: list[str]) -> list[Genome]:
    routes = [TARGET, "0:0-3", "0:0, 1:1-2, 0:3", "0:0, 1:0-3, 0:3", "0:0, 1:2, 0:3"]  # 7, 4, 4, 6, 3 hops
    return [Genome.from_route(Route.parse(r), sources, [4, 4], 2) for r in routes]


class BrokenSetup(TargetRoute):
    """A genome evaluator whose one-time setup fails, as when a source cannot be loaded."""

    def setup(self) -> None:
        raise DfsMergeError("src0: cannot load the model (synthetic)")


class CrashesOn(TargetRoute):
    """Kills its worker process outright for routes of `hops` hops (a segfault or OOM kill)."""

    def __init__(self, hops: int):
        super().__init__()
        self.hops = hops
        self.parent = os.getpid()  # never kill the test process itself

    def __call__(self, genome: Genome):
        if len(genome.decode()) == self.hops and os.getpid() != self.parent:
            os._exit(1)
        return super().__call__(genome)


def check_results(results: dict, gs: list[Genome]) -> None:
    assert set(results) == {g.key() for g in gs}
    assert results[gs[0].key()].score == 0.0  # the target itself
    failed = [ev for ev in results.values() if ev.error]
    assert len(failed) == 1 and failed[0].hops == 3 and failed[0].score == WORST_SCORE


def test_in_process_backend(sources):
    gs = genomes(sources)
    with InProcessEvaluator(TargetRoute(fail_hops=(3,))) as ev:
        check_results(dict(ev.submit(gs)), gs)


def test_process_pool_backend_and_a_dying_worker(sources):
    gs = genomes(sources)
    with ProcessPoolEvaluator(TargetRoute(fail_hops=(3,)), workers=2, threads=1) as ev:
        check_results(dict(ev.submit(gs)), gs)
        again = dict(ev.submit(gs[:2]))  # the pool (and each worker's set-up state) is re-used
        assert again[gs[0].key()].score == 0.0
    with ProcessPoolEvaluator(CrashesOn(hops=6), workers=2, threads=1) as ev:
        results = dict(ev.submit(gs[:4]))
    assert set(results) == {g.key() for g in gs[:4]}
    dead = [k for k, e in results.items() if e.error]
    assert dead == [gs[3].key()] and "worker process died" in results[dead[0]].error
    assert results[dead[0]].infrastructure  # a dead worker is no score of the genome (see test_faults.py)


def test_worker_setup_failure_is_one_line(sources):
    with pytest.raises(DfsMergeError, match=r"worker \d \(pid \d+\) could not start: src0: cannot load") as err:
        with ProcessPoolEvaluator(BrokenSetup(), workers=2, threads=1) as ev:
            list(ev.submit(genomes(sources)[:1]))
    assert "\n" not in str(err.value)
    with pytest.raises(DfsMergeError, match="src0: cannot load"):
        InProcessEvaluator(BrokenSetup())


def test_model_evaluator_travels_without_its_models(sources, tmp_path):
    cfg = make_config(sources, tmp_path / "o")
    fn = ModelEvaluator(cfg)
    fn.scorer = CandidateScorer(object(), object())  # stand-ins for loaded sources and tasks
    copy = pickle.loads(pickle.dumps(fn))
    assert copy.scorer is None and copy.shared is None and copy.cfg == cfg
    other = fn.for_split("test")
    assert other.split == "test" and other.scorer is None and other.shared is fn.scorer


def test_make_evaluator_picks_the_backend(sources, tmp_path):
    assert isinstance(make_evaluator(make_config(sources, tmp_path), TargetRoute()), InProcessEvaluator)
    pool = make_evaluator(make_config(sources, tmp_path, workers=2), TargetRoute())
    assert isinstance(pool, ProcessPoolEvaluator)
    pool.close()


def test_missing_ray_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'dfs-merge\[ray\]'"):
        import_ray()


def test_process_pool_run_equals_in_process_run(sources, tmp_path):
    kw = {"generations": 4, "population": 6, "seed": 11}
    fn = TargetRoute(fail_hops=(5, 6))
    run_evolution(make_config(sources, tmp_path / "inproc", **kw), evaluate=fn, **QUIET)
    r = run_evolution(make_config(sources, tmp_path / "pool", workers=2, **kw), evaluate=fn, **QUIET)
    assert r.evaluations > 0 and r.errors > 0
    assert outcome(tmp_path / "pool") == outcome(tmp_path / "inproc")


@pytest.mark.slow
def test_ray_run_equals_in_process_run(sources, tmp_path):
    """Ray is a declared extra ([ray]) that CI installs, so this runs there; skipped only without Ray."""
    ray = pytest.importorskip("ray")
    kw = {"algorithm": "nsga2", "objectives": ["score", "hops"], "generations": 3, "population": 6, "seed": 5}
    fn = TargetRoute(fail_hops=(5, 6))
    run_evolution(make_config(sources, tmp_path / "inproc", **kw), evaluate=fn, **QUIET)
    try:
        r = run_evolution(make_config(sources, tmp_path / "ray", workers=2, ray="local", **kw), evaluate=fn,
                          **QUIET)
        assert r.evaluations > 0 and r.errors > 0
        assert not ray.is_initialized()  # the run shut down the instance it started
        assert outcome(tmp_path / "ray") == outcome(tmp_path / "inproc")
    finally:
        if ray.is_initialized():
            ray.shutdown()
