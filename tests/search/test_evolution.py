"""Evolution: algorithms, constraints, de-duplication, run directory, checkpoint and exact resume.

Most tests use the synthetic `TargetRoute` fitness (tests/synthetic.py) over fake sources
(config.json only), so no model is loaded; one test runs real lm-eval tasks on tiny models.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from synthetic import QUIET, TARGET, TargetRoute, evals, make_config, outcome

from dfs_merge.config import ConstraintsConfig, load_config
from dfs_merge.errors import ConfigError
from dfs_merge.evaluation import WORST_SCORE, Evaluation
from dfs_merge.genome import Genome, Route, seed_genomes
from dfs_merge.genome_files import genome_from_dict
from dfs_merge.search.evolution import run_evolution
from dfs_merge.search.operators import repair, scale_genes
from dfs_merge.search.state import RunRandom

TESTS = Path(__file__).resolve().parents[1]  # builders.py and synthetic.py


def dominates(a: tuple[float, int], b: tuple[float, int]) -> bool:
    """(score max, hops min) domination."""
    return a[0] >= b[0] and a[1] <= b[1] and a != b


# ---- constraints and operators ---------------------------------------------------------------
def test_repair_meets_hop_limits_and_never_empty(sources):
    c = ConstraintsConfig(pin_ends=False, min_hops=3, max_hops=6)
    template = Genome.empty(sources, [4, 4], 2, "slot", c)
    rng = random.Random(1)
    for _ in range(200):
        g = template.with_bits([rng.randint(0, 1) for _ in range(template.layout.T)])
        fixed = repair(g, rng)
        assert 3 <= len(fixed.check()) <= 6
    empty = repair(template, rng)  # all bits off
    assert len(empty.decode()) == 3


def test_scale_genes_follow_the_route(sources):
    g = Genome.from_route(Route.parse(TARGET), sources, [4, 4], 2, "transition")
    cells = scale_genes(g)
    assert len(cells) == len(g.decode()) - 1  # one transition per hop after the first
    slot = Genome.from_route(Route.parse(TARGET), sources, [4, 4], 2, "slot")
    assert scale_genes(slot) == [i for i, b in enumerate(slot.bits) if b]


@pytest.fixture()
def global_random_states():
    """The global Python and numpy generators seeded 123 for the test, then put back as they were."""
    import numpy as np

    saved = random.getstate(), np.random.get_state()
    random.seed(123)
    np.random.seed(123)
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])


def draw() -> tuple[float, float]:
    """One draw from the global Python generator and one from numpy's."""
    import numpy as np

    return random.random(), float(np.random.standard_normal())


def test_run_random_state_round_trips_through_json(global_random_states):
    import numpy as np

    outer_py, outer_np = random.Random(123), np.random.RandomState(123)  # the global sequences, drawn aside
    rng = RunRandom(5)
    with rng.active():
        random.random()
    copy = RunRandom.from_json(json.loads(json.dumps(rng.to_json())))
    with rng.active():
        a = draw()
    with copy.active():
        b = draw()
    assert a == b
    # the run's own sequence, continued from block to block (its first Python draw was in the first block)
    own_py, own_np = random.Random(5), np.random.RandomState(5)
    own_py.random()
    assert a == (own_py.random(), float(own_np.standard_normal()))
    with rng.active():
        assert draw() == (own_py.random(), float(own_np.standard_normal()))
    # the global generators went on exactly where they were, as if the blocks had not run
    assert draw() == (outer_py.random(), float(outer_np.standard_normal()))
    with pytest.raises(KeyError), rng.active():
        draw()
        raise KeyError("an algorithm failed while drawing")
    assert draw() == (outer_py.random(), float(outer_np.standard_normal()))  # put back after an error too


# ---- algorithms -----------------------------------------------------------------------------
def test_ga_elitism_never_loses_the_best(sources, tmp_path):
    fn = TargetRoute()
    r = run_evolution(make_config(sources, tmp_path / "run", generations=8, elite=2), evaluate=fn, **QUIET)
    gen_best = [h["gen_best"] for h in r.history]
    assert gen_best == sorted(gen_best), gen_best  # the population's best never drops
    assert [h["best"] for h in r.history] == gen_best
    assert r.best_eval.score == max(e["score"] for e in evals(tmp_path / "run"))
    assert r.best_eval.score > r.history[0]["best"]  # and it improved on the seeds


GA_VS_RANDOM_SEEDS = (0, 1, 2, 3, 4)
GA_VS_RANDOM_MARGIN = 0.5  # mean best score, in edit-distance units; measured about 1.0 (see report)


@pytest.mark.slow  # many evaluations, a statistical comparison
def test_ga_beats_random_at_equal_budget(sources, tmp_path):
    """Same population and generations (8 x 9 candidates), seeds 0-4: ga's mean best score beats random's
    by at least GA_VS_RANDOM_MARGIN while evaluating no more routes than random."""
    best = {"ga": [], "random": []}
    spent = {"ga": 0, "random": 0}
    for seed in GA_VS_RANDOM_SEEDS:
        for alg in best:
            cfg = make_config(sources, tmp_path / f"{alg}{seed}", algorithm=alg, seed=seed, generations=8)
            r = run_evolution(cfg, evaluate=TargetRoute(), **QUIET)
            best[alg].append(r.best_eval.score)
            spent[alg] += r.evaluations
    mean = {alg: sum(v) / len(v) for alg, v in best.items()}
    assert spent["ga"] <= spent["random"], spent
    assert mean["ga"] >= mean["random"] + GA_VS_RANDOM_MARGIN, (best, mean)


def test_nsga2_front_is_non_dominated(sources, tmp_path):
    out = tmp_path / "run"
    cfg = make_config(sources, out, algorithm="nsga2", objectives=["score", "hops"], generations=6)
    r = run_evolution(cfg, evaluate=TargetRoute(), **QUIET)
    front = [(e.score, e.hops) for _, e in r.pareto]
    assert len(front) >= 2
    for a in front:
        assert not any(dominates(b, a) for b in front)
    # the front of everything evaluated: nothing in the log dominates a member
    everything = [(e["score"], e["hops"]) for e in evals(out) if e["error"] is None]
    for a in front:
        assert not any(dominates(b, a) for b in everything)
    rows = json.loads((out / "pareto.json").read_text())
    assert [(row["score"], row["hops"]) for row in rows] == front
    files = sorted((out / "pareto").glob("*.genome.yaml"))
    assert len(files) == len(front)
    assert all("dev" in yaml.safe_load(f.read_text())["scores"] for f in files)


def test_cmaes_starts_from_model_zero_and_decodes_valid_routes(sources, tmp_path):
    out = tmp_path / "run"
    cfg = make_config(sources, out, algorithm="cmaes", generations=4, population=6)
    r = run_evolution(cfg, evaluate=TargetRoute(), **QUIET)
    lines = evals(out)
    gen0 = {e["genome"]["route"] for e in lines if e["generation"] == 0}
    assert "0:0-3" in gen0  # model 0 unchanged is in the first candidate set
    for e in lines:
        route = genome_from_dict(e["genome"]).check()
        assert len(route) == e["hops"] >= 1
    state = json.loads((out / "checkpoint.json").read_text())["cma"]
    assert len(state["centroid"]) == 16 + 16 and len(state["C"]) == 32
    assert r.best_eval.score >= max(e["score"] for e in lines if e["generation"] == 0)


@pytest.mark.parametrize("scaling,n_scales", [("none", 0), ("transition", 64)])
def test_scaling_none_and_transition(sources, tmp_path, scaling, n_scales):
    out = tmp_path / "run"
    r = run_evolution(make_config(sources, out, scaling=scaling, generations=3), evaluate=TargetRoute(), **QUIET)
    assert len(r.best.scales) == n_scales
    for e in evals(out):
        assert len(genome_from_dict(e["genome"]).scales) == n_scales
    if scaling == "none":
        assert all(s == 1.0 for s in r.best.decode().scales)


def test_generation_zero_holds_the_seeds(sources, tmp_path):
    out = tmp_path / "run"
    run_evolution(make_config(sources, out, generations=0), evaluate=TargetRoute(), **QUIET)
    template = Genome.empty(sources, [4, 4], 2, "slot")
    seed_keys = {g.key() for g in seed_genomes(template)}
    assert len(seed_keys) == 2
    assert seed_keys <= {e["key"] for e in evals(out) if e["generation"] == 0}


def test_duplicate_genomes_are_evaluated_once(sources, tmp_path):
    out = tmp_path / "run"
    fn = TargetRoute()
    cfg = make_config(sources, out, generations=8, population=6, resample_duplicates=0)
    r = run_evolution(cfg, evaluate=fn, **QUIET)
    assert r.cache_hits > 0
    assert len(fn.calls) == len(set(fn.calls)) == r.evaluations
    keys = [e["key"] for e in evals(out)]
    assert len(keys) == len(set(keys)) == r.evaluations


def test_failing_candidates_do_not_stop_the_run(sources, tmp_path):
    out = tmp_path / "run"
    fn = TargetRoute(fail_hops=(5, 6))
    r = run_evolution(make_config(sources, out, generations=4), evaluate=fn, **QUIET)
    failed = [e for e in evals(out) if e["error"]]
    assert failed and r.errors == len(failed)
    assert all(e["score"] == WORST_SCORE and "synthetic failure" in e["error"] for e in failed)
    assert r.best_eval.error is None and r.best_eval.hops not in (5, 6)


# ---- run directory --------------------------------------------------------------------------
def test_run_directory_files(sources, tmp_path):
    out = tmp_path / "run"
    r = run_evolution(make_config(sources, out, generations=2), evaluate=TargetRoute(), **QUIET)
    for name in ("config.yaml", "evals.jsonl", "checkpoint.json", "best.genome.yaml", "history.png"):
        assert (out / name).is_file(), name
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert load_config(out / "config.yaml").model_dump() == make_config(sources, out, generations=2).model_dump()
    best = yaml.safe_load((out / "best.genome.yaml").read_text())
    assert best["scores"]["dev"]["score"] == r.best_eval.score
    assert genome_from_dict(best).key() == r.best.key()
    state = json.loads((out / "checkpoint.json").read_text())
    assert state["generation"] == 2 and state["finished"] and len(state["population"]) == 8
    assert {"python", "numpy"} <= set(state["rng"])
    line = evals(out)[0]
    assert {"generation", "key", "genome", "objectives", "tasks", "seconds", "error"} <= set(line)


def test_report_tasks_scored_for_the_best(sources, tmp_path):
    out = tmp_path / "run"
    cfg = make_config(sources, out, generations=2, report_tasks=["synthetic_test"])
    r = run_evolution(cfg, evaluate=TargetRoute(), report_evaluate=TargetRoute(target="0:0-3"), **QUIET)
    scores = yaml.safe_load((out / "best.genome.yaml").read_text())["scores"]
    assert scores["dev"]["score"] == r.best_eval.score
    assert r.test_eval is not None and scores["test"]["score"] == r.test_eval.score


class ReversedTarget(TargetRoute):
    """A validation split that disagrees with dev: the farther from TARGET, the better."""

    def __call__(self, genome: Genome) -> Evaluation:
        ev = super().__call__(genome)
        return replace(ev, score=-ev.score)


@pytest.mark.parametrize("algorithm", ["ga", "nsga2"])
def test_final_choice_on_validation_shortlists_by_dev(sources, tmp_path, algorithm):
    """With select_tasks, the best (and each front hop count's member) is the validation favourite among the
    select_top best by dev; only those are scored on validation, and a resumed run scores none again."""
    out = tmp_path / "run"
    objectives = ["score", "hops"] if algorithm == "nsga2" else ["score"]
    cfg = make_config(sources, out, generations=2, algorithm=algorithm, objectives=objectives,
                      select_tasks=["synthetic_val"], select_top=3)
    r = run_evolution(cfg, evaluate=TargetRoute(), select_evaluate=ReversedTarget(), **QUIET)
    rows = [e for e in evals(out) if not e["error"]]
    state = json.loads((out / "checkpoint.json").read_text())
    scored = {k: v["score"] for k, v in state["val"].items()}

    def expected(group: list[dict]) -> str:
        top = sorted({e["key"]: e for e in group}.values(), key=lambda e: -e["score"])[:3]
        assert all(e["key"] in scored for e in top)
        return max(top, key=lambda e: (scored[e["key"]], e["score"]))["key"]

    best = yaml.safe_load((out / "best.genome.yaml").read_text())
    assert r.best.key() == expected(rows) and best["scores"]["val"]["score"] == scored[r.best.key()]
    overruled = r.best.key() != max(rows, key=lambda e: e["score"])["key"]
    if algorithm == "nsga2":
        front = json.loads((out / "pareto.json").read_text())
        assert front and [m["key"] for m in front] == [expected([e for e in rows if e["hops"] == m["hops"]])
                                                        for m in front]
        assert all(m["val_score"] == scored[m["key"]] for m in front)
        overruled |= any(m["score"] < max(e["score"] for e in rows if e["hops"] == m["hops"]) for m in front)
    assert overruled  # validation chose differently from dev somewhere
    assert len(scored) < len({e["key"] for e in rows})  # the shortlist only

    again = ReversedTarget()
    assert run_evolution(cfg, resume=True, evaluate=TargetRoute(), select_evaluate=again, **QUIET).best.key() \
        == r.best.key() and again.calls == []
    # another validation split (a changed select_limit) is scored again
    changed = ReversedTarget()
    run_evolution(cfg.model_copy(update={"select_limit": 4}), resume=True, evaluate=TargetRoute(),
                  select_evaluate=changed, **QUIET)
    assert set(changed.calls) == set(scored)


def test_bad_configs_are_one_line_config_errors(sources, tmp_path):
    def cfg_file(**kw) -> Path:
        data = {"sources": sources, "tasks": {"synthetic": 1.0}, "out": str(tmp_path / "o"), **kw}
        p = tmp_path / "cfg.yaml"
        p.write_text(yaml.safe_dump(data))
        return p

    for bad, needle in [({"bogus": 1}, "bogus: unknown key"), ({"population": "many"}, "population"),
                        ({"population": 1}, "population"), ({"algorithm": "pso"}, "algorithm"),
                        ({"select_tasks": ["v"], "select_limit": {"w": 3}}, "select_limit names tasks"),
                        ({"select_top": 0}, "select_top")]:
        with pytest.raises(ConfigError, match=needle) as err:
            load_config(cfg_file(**bad))
        assert "\n" not in str(err.value)

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable|is a file") as err:
        run_evolution(make_config(sources, blocker / "run"), evaluate=TargetRoute(), **QUIET)
    assert "\n" not in str(err.value)

    full = tmp_path / "full"
    full.mkdir()
    (full / "something.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty") as err:
        run_evolution(make_config(sources, full), evaluate=TargetRoute(), **QUIET)
    assert "\n" not in str(err.value)

    impossible = make_config(sources, tmp_path / "imp", constraints={"max_hops": 1})
    with pytest.raises(ConfigError, match="constraints"):
        run_evolution(impossible, evaluate=TargetRoute(), **QUIET)


def test_resume_refuses_a_changed_config(sources, tmp_path):
    out = tmp_path / "run"
    run_evolution(make_config(sources, out, generations=1), evaluate=TargetRoute(), **QUIET)
    with pytest.raises(ConfigError, match="seed differs"):
        run_evolution(make_config(sources, out, generations=1, seed=9), resume=True, evaluate=TargetRoute(), **QUIET)


# ---- resume ---------------------------------------------------------------------------------
class Interrupt(BaseException):
    """Stands for a kill: not an Exception, so the evaluator does not turn it into a failed candidate."""


class DiesAfter(TargetRoute):
    """Evaluates `n` genomes, then 'dies' (raises Interrupt) on the next one."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def __call__(self, genome: Genome):
        if len(self.calls) >= self.n:
            raise Interrupt
        return super().__call__(genome)


@pytest.mark.parametrize("algorithm", ["ga", "nsga2", "cmaes", "random"])
def test_resume_after_interruption_matches_uninterrupted_run(sources, tmp_path, algorithm):
    kw = {"algorithm": algorithm, "generations": 5, "population": 6, "seed": 3}
    if algorithm == "nsga2":
        kw["objectives"] = ["score", "hops"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_evolution(make_config(sources, straight, **kw), evaluate=TargetRoute(), **QUIET)

    with pytest.raises(Interrupt):  # dies in the middle of generation 2
        run_evolution(make_config(sources, broken, **kw), evaluate=DiesAfter(15), **QUIET)
    done = json.loads((broken / "checkpoint.json").read_text())["generation"]
    assert done < 5 and len(evals(broken)) == 15
    with (broken / "evals.jsonl").open("a") as f:
        f.write('{"generation": 9, "key": "trunc')  # a write cut short by the kill
    fn = TargetRoute()
    run_evolution(make_config(sources, broken, **kw), resume=True, evaluate=fn, **QUIET)
    before = {e["key"] for e in evals(broken)[:15]}
    assert not before & set(fn.calls)  # nothing logged before the kill was computed again
    keys = [e["key"] for e in evals(broken)]
    assert len(keys) == len(set(keys))
    assert outcome(broken) == outcome(straight)


def test_resume_extends_a_finished_run(sources, tmp_path):
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    run_evolution(make_config(sources, straight, generations=5), evaluate=TargetRoute(), **QUIET)
    run_evolution(make_config(sources, extended, generations=2), evaluate=TargetRoute(), **QUIET)
    fn = TargetRoute()
    r = run_evolution(make_config(sources, extended, generations=2), resume=True, evaluate=fn, **QUIET)
    assert fn.calls == [] and r.generations == 2  # finished: nothing to do
    run_evolution(make_config(sources, extended, generations=5), resume=True, evaluate=TargetRoute(), **QUIET)
    assert outcome(extended) == outcome(straight)


RESUME_SCRIPT = """\
import json, sys
sys.path.insert(0, {tests!r})
from synthetic import TargetRoute, make_config
from dfs_merge.search.evolution import run_evolution
from pathlib import Path
cfg = make_config({sources!r}, Path({out!r}), generations=5, population=6, seed=7)
run_evolution(cfg, resume={resume}, evaluate=TargetRoute(die_on_call={die}), progress=False)
"""


def test_sigkill_mid_generation_then_resume_matches_uninterrupted_run(sources, tmp_path):
    """A real process killed with SIGKILL while it evaluates, resumed in another process."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_evolution(make_config(sources, straight, generations=5, population=6, seed=7), evaluate=TargetRoute(),
                  **QUIET)

    def script(resume: bool, die: int | None) -> Path:
        p = tmp_path / f"run_{resume}.py"
        p.write_text(RESUME_SCRIPT.format(tests=str(TESTS), sources=sources, out=str(killed), resume=resume, die=die))
        return p

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, str(script(False, 17))], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert len(evals(killed)) == 16  # killed as it began the 17th evaluation: mid generation 2
    state = json.loads((killed / "checkpoint.json").read_text())
    assert state["generation"] < 5 and not state["finished"]
    logged = {e["key"] for e in evals(killed)}

    res = subprocess.run([sys.executable, str(script(True, None))], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming after generation" in res.stdout
    keys = [e["key"] for e in evals(killed)]
    assert len(keys) == len(set(keys))  # no key evaluated twice across the kill
    assert logged <= set(keys)
    assert outcome(killed) == outcome(straight)


# ---- a real fitness -------------------------------------------------------------------------
def test_real_lm_eval_task_on_tiny_models(tiny_source_dirs, tiny_suite_dir, tmp_path):
    """Two tiny random Llamas, the tiny multiple-choice task as fitness, perplexity as report task."""
    out = tmp_path / "run"
    cfg = make_config(
        [str(p) for p in tiny_source_dirs], out, repeats=1, population=4, generations=1,
        tasks={"tiny_mc": 1.0}, report_tasks=["tiny_ppl"], eval_suites=[str(tiny_suite_dir)], batch_size=8,
        constraints={"max_hops": 6},
    )
    r = run_evolution(cfg, **QUIET)
    lines = evals(out)
    assert lines and all(e["error"] is None for e in lines), [e["error"] for e in lines]
    assert all(0.0 <= e["tasks"]["tiny_mc"] <= 1.0 and e["hops"] <= 6 for e in lines)
    best = yaml.safe_load((out / "best.genome.yaml").read_text())
    assert best["scores"]["dev"]["tasks"]["tiny_mc"]["metric"] == "acc"
    assert r.test_eval is not None and r.test_eval.error is None
    assert best["route"] == r.best.decode().text()
    # the report score is the best route's, scored afresh (Fitness agrees with lm-eval's own HFLM: test_score.py)
    from dfs_merge.fitness.score import Fitness
    from dfs_merge.models.sources import SourcePool
    from dfs_merge.stitch import stitch

    pool = SourcePool.load([str(p) for p in tiny_source_dirs])
    fresh = Fitness({"tiny_ppl": 1.0}, suites=[tiny_suite_dir], batch_size=8, cache_dir=tmp_path / "fresh")
    value = fresh.score(stitch(pool, r.best.decode()), pool.tokenizer).tasks["tiny_ppl"].value
    assert value > 0
    assert best["scores"]["test"]["tasks"]["tiny_ppl"]["value"] == pytest.approx(value, rel=1e-6)
    assert r.test_eval.tasks["tiny_ppl"].value == pytest.approx(value, rel=1e-6)


def test_a_run_made_before_a_config_key_existed_resumes(sources, tmp_path):
    """A key added to dfs-merge since a run was made (absent from its config.yaml) counts as its default."""
    out = tmp_path / "old"
    run_evolution(make_config(sources, out, generations=1), evaluate=TargetRoute(), **QUIET)
    old = yaml.safe_load((out / "config.yaml").read_text())
    for key in ("guards", "merge"):
        old.pop(key)
    (out / "config.yaml").write_text(yaml.safe_dump(old))
    r = run_evolution(make_config(sources, out, generations=2), resume=True, evaluate=TargetRoute(), **QUIET)
    assert r.generations == 2
    with pytest.raises(ConfigError, match="resume: guards differs"):
        run_evolution(make_config(sources, out, generations=2, guards={"synthetic": 0.0}), resume=True,
                      evaluate=TargetRoute(), **QUIET)


class _LostOnEveryWorker:
    """A report evaluator whose every evaluation is lost to an infrastructure fault."""

    def __call__(self, genome: Genome) -> Evaluation:
        return Evaluation.lost("worker died", len(genome.decode()))


def test_a_report_lost_to_infrastructure_is_not_kept_and_is_scored_again_on_resume(sources, tmp_path):
    out, lines = tmp_path / "run", []
    cfg = make_config(sources, out, generations=1, report_tasks=["synthetic_test"])
    r = run_evolution(cfg, evaluate=TargetRoute(), report_evaluate=_LostOnEveryWorker(), progress=False,
                      log=lines.append)
    assert r.test_eval is None and any("lost to infrastructure faults on the report tasks" in x for x in lines)
    assert json.loads((out / "checkpoint.json").read_text())["report"] == {}
    r = run_evolution(cfg, resume=True, evaluate=TargetRoute(), report_evaluate=TargetRoute(), **QUIET)
    assert r.test_eval is not None and r.test_eval.ok


def test_a_resumed_run_scores_its_report_again_only_when_the_held_out_split_changed(sources, tmp_path):
    """Held-out scores are reused on resume only if made on the same split: a changed `report_limit` (a resumable
    key, like `select_limit`) scores the report again; a checkpoint written before splits were recorded whole is
    matched by its task names."""
    out = tmp_path / "run"
    cfg = make_config(sources, out, generations=1, report_tasks=["synthetic_test"], report_limit=5)
    run_evolution(cfg, evaluate=TargetRoute(), report_evaluate=TargetRoute(), **QUIET)
    state = json.loads((out / "checkpoint.json").read_text())
    assert state["report_split"]["limit"] == 5 and state["report"]

    again = TargetRoute()
    run_evolution(cfg, resume=True, evaluate=TargetRoute(), report_evaluate=again, **QUIET)
    assert again.calls == []

    changed = TargetRoute()
    run_evolution(cfg.model_copy(update={"report_limit": 7}), resume=True, evaluate=TargetRoute(),
                  report_evaluate=changed, **QUIET)
    assert changed.calls
    assert json.loads((out / "checkpoint.json").read_text())["report_split"]["limit"] == 7

    state = json.loads((out / "checkpoint.json").read_text())
    del state["report_split"]
    state["report_tasks"] = ["synthetic_test"]
    (out / "checkpoint.json").write_text(json.dumps(state))
    legacy = TargetRoute()
    run_evolution(cfg.model_copy(update={"report_limit": 7}), resume=True, evaluate=TargetRoute(),
                  report_evaluate=legacy, **QUIET)
    assert legacy.calls == []
