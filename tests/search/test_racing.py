"""Racing (`dfs_merge/search/racing.py`): candidates scored in stages on nested prefixes of the same documents.

The synthetic `NoisyDocs` fitness (tests/synthetic.py) gives each candidate a known true value plus known
per-document noise, so the ranking on all documents is known and the paired bound can be checked against it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic import QUIET, NoisyDocs, TargetRoute, evals, make_config, outcome

from dfs_merge.config import RacingConfig
from dfs_merge.errors import ConfigError
from dfs_merge.evaluation import Evaluation, TaskResult
from dfs_merge.search.evolution import run_evolution
from dfs_merge.search.racing import Race
from dfs_merge.search.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")
RACING = {"stages": [0.25, 0.5, 1.0], "confidence": 0.95}


# ---- the bound, on synthetic documents ----------------------------------------------------------
class Table:
    """A fake backend over fixed per-document values: candidate key -> list of values (one task, mean)."""

    def __init__(self, values: dict[str, list[float]], probability: dict[str, list[float]] | None = None,
                 hops: dict[str, int] | None = None):
        self.values = values
        self.probability = probability or {}
        self.hops = hops or {}
        self.scored = 0

    def submit(self, genomes, docs=None):
        from dfs_merge.fitness.score import prefix_size

        for g in genomes:
            v = self.values[g.key()]
            w = range(prefix_size(docs[0], len(v)), prefix_size(docs[1], len(v)))
            self.scored += len(w)
            items = [v[i] for i in w]
            task = TaskResult("t", "acc", sum(items) / len(items), True, len(items), 0.0)
            per_doc = {"aggregation": "mean", "start": w.start, "total": len(v), "items": items}
            if g.key() in self.probability:
                per_doc["probability"] = [self.probability[g.key()][i] for i in w]
            yield g.key(), Evaluation(task.value, self.hops.get(g.key(), 10), {"t": task}, per_doc={"t": per_doc})


class Key:
    def __init__(self, k: str):
        self.k = k

    def key(self) -> str:
        return self.k


def race_once(values: dict[str, list[float]], tmp: Path, cut: int = 1, probability: dict[str, list[float]] | None = None,
              **racing) -> tuple[dict[str, Evaluation], int]:
    rd = RunDir(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    race = Race(RacingConfig(**{**RACING, **racing}), rd, {"t": 1.0}, {}, cut=cut, dominance=False,
                log=lambda *_: None)
    table = Table(values, probability)
    out = dict(race.run({k: Key(k) for k in values}, 0, table))
    rd.close()
    return out, table.scored


def noisy_generation(rng: random.Random, docs: int = 96) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """12 candidates of known quality: per document the probability each gives the right answer (its mean plus
    noise shared by the documents' difficulty) and the 0/1 accuracy drawn from it."""
    means = [rng.uniform(0.2, 0.8) for _ in range(12)]
    difficulty = [rng.gauss(0, 0.15) for _ in range(docs)]
    probability = {f"c{i}": [min(1.0, max(0.0, m + d + rng.gauss(0, 0.1))) for d in difficulty]
                   for i, m in enumerate(means)}
    values = {k: [float(rng.random() < p) for p in ps] for k, ps in probability.items()}
    return values, probability


@pytest.mark.slow
@pytest.mark.parametrize("bound_by, cut", [("metric", 1), ("metric", 4), ("probability", 1), ("probability", 4)])
def test_the_true_best_is_never_stopped_and_the_bound_holds_at_its_confidence(tmp_path, bound_by, cut):
    """Many generations of 12 candidates with known per-document values: the candidate best on all documents by the
    bound's statistic (accuracy, or the probability of the right answer) finishes in at least 95% of them, with
    a cut of 1 or of 4 (the bound's level is set by the cut), and every finished score is the accuracy."""
    rng = random.Random(0)
    trials, decisions, best_stopped, saved = 200, 0, 0, 0
    for trial in range(trials):
        values, probability = noisy_generation(rng)
        statistic = probability if bound_by == "probability" else values
        full = {k: sum(v) / len(v) for k, v in statistic.items()}
        out, scored = race_once(values, tmp_path / str(trial), cut=cut, probability=probability, confidence=0.95,
                                bound_by=bound_by)
        saved += 12 * 96 - scored
        best = max(full.values())
        for k, ev in out.items():
            if ev.dropped:
                decisions += 1
                best_stopped += full[k] == best
            else:  # a full score: lm-eval's aggregation over every document, as unraced
                assert ev.score == sum(values[k]) / 96 and ev.race["docs"] == {"t": 96}
    assert decisions > trials and saved > 0.1 * trials * 12 * 96  # the race stops candidates and saves documents
    assert best_stopped <= 0.05 * trials  # the bound's promise: at most 1 - confidence of the generations


def test_the_probability_of_the_right_answer_stops_more_than_accuracy(tmp_path):
    """The same generations raced by accuracy and by the probability of the right answer (whose per-document
    differences vary less): at the same cut the probability scores fewer documents."""
    rng = random.Random(1)
    scored = {}
    for trial in range(20):
        values, probability = noisy_generation(rng)
        for bound_by in ("metric", "probability"):
            for cut in (1, 4):
                _, n = race_once(values, tmp_path / f"{trial}-{bound_by}-{cut}", cut=cut, probability=probability,
                                 bound_by=bound_by)
                scored[bound_by, cut] = scored.get((bound_by, cut), 0) + n
    assert all(scored["probability", cut] < 0.8 * scored["metric", cut] for cut in (1, 4))


def test_the_level_of_each_comparison_follows_the_cut():
    race = Race(RacingConfig(stages=[0.25, 0.5, 1.0], confidence=0.9), None, {"t": 1.0}, {}, cut=5, dominance=False)
    assert race.level(19) == pytest.approx(0.1 * 5 / (19 * 2))
    assert race.level(3) == pytest.approx(0.1 * 3 / (3 * 2))  # a cut above the others: as if it were theirs
    assert Race(RacingConfig(stages=[0.5, 1.0]), None, {}, {}, cut=1, dominance=False).level(9) == pytest.approx(0.05 / 9)


def test_clear_differences_stop_at_the_first_stage_and_keep_caps_the_rest(tmp_path):
    values = {f"c{i}": [float(i) + 0.01 * ((j * 7) % 5) for j in range(40)] for i in range(6)}
    out, scored = race_once(values, tmp_path / "a")
    assert [k for k, ev in out.items() if not ev.dropped] == ["c5"]
    assert all(ev.race["dropped"] == 0 and ev.race["docs"] == {"t": 10} for k, ev in out.items() if k != "c5")
    assert scored == 6 * 10 + 30
    stopped = {k: ev for k, ev in out.items() if ev.dropped}
    assert all(ev.score < -1e8 and ev.objectives(["score"])[0] < -1e8 for ev in stopped.values())
    # keep: an EvoPress-style cap on top of the bound, here where the bound cannot stop anything (cut 8 of 7 others)
    noisy = {f"c{i}": [0.5 + 0.01 * i + random.Random(i * 100 + j).gauss(0, 5) for j in range(16)] for i in range(8)}
    out, _ = race_once(noisy, tmp_path / "b", cut=8, keep=0.5)
    on = [k for k, ev in out.items() if not ev.dropped]
    assert len(on) == 2  # 8 -> 4 after stage 1 -> 2 after stage 2, the best by their prefix scores
    second = sorted(noisy, key=lambda k: -sum(noisy[k][:8]))
    assert set(on) <= set(second[:4])
    assert all(ev.race["why"] == "below the best 50%" for ev in out.values() if ev.dropped)


def test_keep_ranks_by_the_probability_of_the_right_choice_or_by_score(tmp_path):
    """Four candidates with 0/1 items: on the first stage's 4 documents c0 and c1 are right as often as c2 and c3
    (c3 once more), but c1 gives the right choice the most probability. `keep_by: probability` keeps c1,
    `keep_by: score` the best by accuracy (c3); every finished score is the accuracy on all documents."""
    values = {"c0": [1, 0, 1, 0] + [1] * 12, "c1": [1, 0, 1, 0] + [0] * 12, "c2": [1, 1, 0, 0] + [1] * 12,
              "c3": [1, 1, 1, 0] + [0] * 12}
    values = {k: [float(x) for x in v] for k, v in values.items()}
    probability = {"c0": [0.6, 0.3, 0.6, 0.3] + [0.9] * 12, "c1": [0.99, 0.45, 0.99, 0.45] + [0.1] * 12,
                   "c2": [0.6, 0.6, 0.2, 0.2] + [0.9] * 12, "c3": [0.51, 0.51, 0.51, 0.2] + [0.1] * 12}
    racing = {"stages": [0.25, 1.0], "keep": 0.25}
    for keep_by, winner in (("probability", "c1"), ("score", "c3")):
        out, scored = race_once(values, tmp_path / keep_by, cut=9, probability=probability, keep_by=keep_by, **racing)
        assert [k for k, ev in out.items() if not ev.dropped] == [winner]
        assert out[winner].score == sum(values[winner]) / 16 and scored == 4 * 4 + 12
    with pytest.raises(ValueError, match="keep_by"):
        RacingConfig(keep_by="tokens")
    with pytest.raises(ValueError, match="bound_by"):
        RacingConfig(bound_by="score")


def test_with_hops_keep_goes_by_the_gain_over_the_front(tmp_path):
    """[score, hops]: references A (20 hops) and B (10 hops) are on the front. c1 (25 hops) is the best by score
    but only 0.02 above A; c2 (12 hops) is 0.1 above B, the only reference with no more hops: the race keeps c2."""
    values = {"A": [0.8] * 16, "B": [0.5] * 16, "c1": [0.82] * 16, "c2": [0.6] * 16, "c3": [0.7] * 16}
    hops = {"A": 20, "B": 10, "c1": 25, "c2": 12, "c3": 22}
    rd = RunDir(tmp_path)
    race = Race(RacingConfig(stages=[0.25, 1.0], keep=0.2), rd, {"t": 1.0}, {}, cut=99, dominance=True,
                log=lambda *_: None)
    table = Table(values, hops=hops)
    assert all(not ev.dropped for _, ev in race.run({k: Key(k) for k in "AB"}, 0, table, incumbents=["A", "B"]))
    out = dict(race.run({k: Key(k) for k in ("c1", "c2", "c3")}, 1, table, references=["A", "B"]))
    rd.close()
    assert [k for k, ev in out.items() if not ev.dropped] == ["c2"]


def test_the_cut_needs_that_many_confidently_better(tmp_path):
    values = {f"c{i}": [float(i)] * 40 for i in range(6)}
    for cut, finish in ((1, 1), (3, 3), (6, 6)):
        out, _ = race_once(values, tmp_path / f"cut{cut}", cut=cut)
        # with zero noise: c stops once `cut` others are better
        assert sum(not ev.dropped for ev in out.values()) == min(finish, 6)


def test_racing_config_is_validated():
    with pytest.raises(ValueError, match="end at 1"):
        RacingConfig(stages=[0.25, 0.5])
    with pytest.raises(ValueError, match="rise strictly"):
        RacingConfig(stages=[0.5, 0.25, 1.0])


# ---- in the search ------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["ga", "nsga2", "cmaes", "random"])
def test_a_raced_search_scores_fewer_documents_and_reports_only_full_scores(sources, tmp_path, algorithm):
    kw = {"algorithm": algorithm, "generations": 4, "population": 8, "seed": 2, "racing": RACING}
    if algorithm == "nsga2":
        kw["objectives"] = ["score", "hops"]
    fn = NoisyDocs(docs=48, noise=0.3)
    r = run_evolution(make_config(sources, tmp_path / "raced", **kw), evaluate=fn, **QUIET)
    lines = evals(tmp_path / "raced")
    scored = sum(stop - start for _, start, stop in fn.windows)
    assert scored < 48 * len(lines)  # fewer documents than every candidate on all of them
    stopped = [e for e in lines if e["evaluation"].get("race", {}).get("dropped") is not None]
    assert stopped and all(e["score"] < -1e8 for e in stopped)
    full = [e for e in lines if e not in stopped]
    assert all(e["evaluation"]["race"]["docs"] == {"synthetic": 48} for e in full)
    assert r.best_eval.ok and r.best_eval.race["docs"] == {"synthetic": 48}
    assert all(ev.ok for _, ev in r.pareto)
    # no document of a candidate scored twice; the per-document log holds every stage
    windows = [(k, a) for k, a, _ in fn.windows]
    assert len(windows) == len(set(windows))
    docs = [json.loads(line) for line in (tmp_path / "raced" / "docs.jsonl").read_text().splitlines()]
    assert len(docs) == len(fn.windows)
    state = json.loads((tmp_path / "raced" / "checkpoint.json").read_text())
    assert state["counters"]["documents"] == sum(sum(t["docs"] for t in e["evaluation"]["tasks"].values())
                                                 for e in lines)
    assert state["counters"]["stopped"] == len(stopped)


class DiesAfterWindows(NoisyDocs):
    """Scores `n` windows, then dies on the next one: 'dies' by raising Interrupt (not an Exception), or with `kill`
    SIGKILLs its own process, in the middle of the work. `log`: a file each scored window is appended to as
    "key start stop", which outlives a killed process."""

    def __init__(self, n: int, kill: bool = False, log: str | None = None, **kw):
        super().__init__(**kw)
        self.n = n
        self.kill = kill
        self.log = log

    def __call__(self, genome, docs=None):
        if len(self.windows) >= self.n:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Interrupt
        ev = super().__call__(genome, docs)
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write("{} {} {}\n".format(*self.windows[-1]))
        return ev


class Interrupt(BaseException):
    """Stands for a kill."""


@pytest.mark.parametrize("algorithm", ["ga", "nsga2"])
def test_a_run_killed_mid_race_resumes_exactly(sources, tmp_path, algorithm):
    kw = {"algorithm": algorithm, "generations": 4, "population": 8, "seed": 5, "racing": RACING}
    if algorithm == "nsga2":
        kw["objectives"] = ["score", "hops"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_evolution(make_config(sources, straight, **kw), evaluate=NoisyDocs(noise=0.3), **QUIET)
    total = len([json.loads(x) for x in (straight / "docs.jsonl").read_text().splitlines()])
    for cut in (total // 3, total // 2):  # killed twice, at two points in the middle of races
        with pytest.raises(Interrupt):
            run_evolution(make_config(sources, broken, **kw), resume=(broken / "checkpoint.json").exists(),
                          evaluate=DiesAfterWindows(cut - len(_docs(broken)) if _docs(broken) else cut, noise=0.3),
                          **QUIET)
    fn = NoisyDocs(noise=0.3)
    run_evolution(make_config(sources, broken, **kw), resume=True, evaluate=fn, **QUIET)
    done_before = {(d["key"], d["stage"]) for d in _docs(broken)[: len(_docs(broken)) - len(fn.windows)]}
    assert not done_before & {(k, _stage(a)) for k, a, _ in fn.windows}  # no document scored twice
    assert outcome(broken) == outcome(straight)
    stages = [(d["key"], d["stage"]) for d in _docs(broken)]
    assert len(stages) == len(set(stages)) == total


def _docs(out: Path) -> list[dict]:
    p = out / "docs.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def _stage(start: int, stages: list[float] = RACING["stages"], docs: int = 48) -> int:
    """The stage whose window of `docs` documents starts at document `start`."""
    from dfs_merge.fitness.score import prefix_size

    return [prefix_size(s, docs) for s in [0.0, *stages[:-1]]].index(start)


KILLED_RUN = """\
import sys
sys.path[:0] = {paths!r}
from pathlib import Path
from synthetic import make_config
from test_racing import DiesAfterWindows
from dfs_merge.search.evolution import run_evolution
run_evolution(make_config({sources!r}, Path({out!r}), **{kw!r}), resume={resume},
              evaluate=DiesAfterWindows({n}, kill=True, log={log!r}, noise=0.3), progress=False)
"""
TESTS = Path(__file__).resolve().parents[1]  # synthetic.py


@pytest.mark.parametrize("algorithm", ["ga", "nsga2"])
def test_a_run_with_racing_at_its_defaults_resumes_exactly_after_sigkill(sources, tmp_path, algorithm):
    """`racing: {}` (every setting at its default). A real process running the search is SIGKILLed from inside its
    evaluator in the middle of a race, twice (in the first stage of generation 1, then, resumed in another process,
    in the last stage of a later generation whose first stage stopped candidates, so that evals.jsonl holds part of
    that generation); after each kill the test adds a torn last line (a write a kill cut short), to docs.jsonl,
    then to evals.jsonl. Resumed in process to the end, the run is the one never killed: the same outcome and the same
    evaluation of every key, every (key, stage) logged once, and no window a log held scored again."""
    t0 = time.perf_counter()
    kw = {"algorithm": algorithm, "generations": 4, "population": 8, "seed": 5, "racing": {}}
    if algorithm == "nsga2":
        kw["objectives"] = ["score", "hops"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert make_config(sources, straight, **kw).racing == RacingConfig()  # on, every setting at its default
    run_evolution(make_config(sources, straight, **kw), evaluate=NoisyDocs(noise=0.3), **QUIET)
    want = _docs(straight)
    stopped_first = [e["generation"] for e in evals(straight) if e["evaluation"]["race"].get("dropped") == 0]

    def middle(gen: int, stage: int) -> int:  # the index in docs.jsonl of a window in the middle of that stage
        at = [i for i, d in enumerate(want) if (d["generation"], d["stage"]) == (gen, stage)]
        assert len(at) >= 2, (gen, stage, len(at))
        return at[len(at) // 2]

    later = min(g for g in stopped_first if g >= 2)  # a generation whose first stage stopped some candidates
    kills = [(1, middle(1, 0)), (later, middle(later, len(RacingConfig().stages) - 1))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    before = [0]  # the docs.jsonl lines logged before each process started
    for i, (gen, at) in enumerate(kills):
        log = tmp_path / f"windows{i}.log"
        script = KILLED_RUN.format(paths=[str(TESTS), str(TESTS / "search")], sources=sources, out=str(broken), kw=kw,
                                   resume=i > 0, n=at - before[-1], log=str(log))
        res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == -signal.SIGKILL, res.stdout[-2000:] + res.stderr[-2000:]
        if i:
            assert "took over the lock of process" in res.stdout and "resuming after generation" in res.stdout
        done = _docs(broken)
        # killed in the middle of generation `gen`'s race: every window before it logged, that one not
        assert len(done) == at and {(d["key"], d["stage"]) for d in done} == {(d["key"], d["stage"]) for d in want[:at]}
        assert json.loads((broken / "checkpoint.json").read_text())["generation"] == gen - 1
        # the windows this process scored are those it logged, none of them logged before it started
        scored = [(k, _stage(int(a), RacingConfig().stages)) for k, a, _ in
                  (line.split() for line in log.read_text().splitlines())]
        assert sorted(scored) == sorted((d["key"], d["stage"]) for d in done[before[-1]:])
        before.append(at)
        # a SIGKILL that lands in the middle of a write (this one cannot) leaves a torn last line: half a record
        torn = broken / ("docs.jsonl" if i == 0 else "evals.jsonl")
        next_line = (straight / torn.name).read_text().splitlines()[at if i == 0 else len(evals(broken))]
        with torn.open("a") as f:
            f.write(next_line[: len(next_line) // 2])
    fn, lines = NoisyDocs(noise=0.3), []
    run_evolution(make_config(sources, broken, **kw), resume=True, evaluate=fn, progress=False, log=lines.append)
    assert any("took over the lock of process" in line for line in lines)
    done = _docs(broken)
    assert not {(d["key"], d["stage"]) for d in done[: before[-1]]} & {(k, _stage(a, RacingConfig().stages))
                                                                        for k, a, _ in fn.windows}
    assert outcome(broken) == outcome(straight)
    stages = [(d["key"], d["stage"]) for d in done]
    assert len(stages) == len(set(stages)) and sorted(stages) == sorted((d["key"], d["stage"]) for d in want)
    keys = [e["key"] for e in evals(broken)]
    assert len(keys) == len(set(keys))

    def scores(out: Path) -> dict[str, tuple]:
        return {e["key"]: (e["score"], e["tasks"], e["evaluation"]["race"]) for e in evals(out)}

    assert scores(broken) == scores(straight)  # the same candidates stopped, at the same stage, with the same scores
    # nothing partial left behind: whole lines only, no temporary file, the lock let go
    for name in ("docs.jsonl", "evals.jsonl"):
        assert (broken / name).read_text().endswith("\n")
    assert sorted(p.name for p in broken.iterdir() if p.name.startswith(".")) == [".dfs-merge.lock"]
    assert (broken / ".dfs-merge.lock").read_text() == ""
    print(f"\n{algorithm}: killed at windows {[at for _, at in kills]} of {len(want)}, {time.perf_counter() - t0:.1f}s")


@pytest.mark.slow
def test_the_process_pool_and_ray_race_as_in_process(sources, tmp_path):
    kw = {"algorithm": "nsga2", "objectives": ["score", "hops"], "generations": 3, "population": 6, "seed": 4,
          "racing": {**RACING, "keep": 0.5}}
    run_evolution(make_config(sources, tmp_path / "a", **kw), evaluate=NoisyDocs(noise=0.3), **QUIET)
    run_evolution(make_config(sources, tmp_path / "b", workers=2, **kw), evaluate=NoisyDocs(noise=0.3), **QUIET)
    assert outcome(tmp_path / "a") == outcome(tmp_path / "b")
    assert (tmp_path / "a" / "docs.jsonl").read_text().count("\n") == (tmp_path / "b" / "docs.jsonl").read_text().count("\n")
    ray = pytest.importorskip("ray")  # a declared extra ([ray]) that CI installs
    try:
        run_evolution(make_config(sources, tmp_path / "c", workers=2, ray="local", **kw), evaluate=NoisyDocs(noise=0.3),
                      **QUIET)
        assert outcome(tmp_path / "c") == outcome(tmp_path / "a")
    finally:
        if ray.is_initialized():
            ray.shutdown()


def test_resume_refuses_changed_racing(sources, tmp_path):
    out = tmp_path / "run"
    run_evolution(make_config(sources, out, generations=1, racing=RACING), evaluate=NoisyDocs(), **QUIET)
    with pytest.raises(ConfigError, match="racing differs"):
        run_evolution(make_config(sources, out, generations=2, racing={**RACING, "confidence": 0.9}), resume=True,
                      evaluate=NoisyDocs(), **QUIET)


# ---- racing off: today's results bit for bit ---------------------------------------------------------
# `expected/racing_off_<algorithm>.json`: `outcome` plus every evals.jsonl line (timings left out) of these runs,
# as the code before racing existed (commit d5b7114) wrote them (the files hash to that commit's digests);
# racing off must reproduce them exactly. A difference shows as a diff of readable records.
EXPECTED = Path(__file__).parent / "expected"


def normalised(out: Path, sources: list[str]) -> list:
    """A run's outcome and evaluations as JSON data, without timings and with the sources' folder written SRC."""
    lines = []
    for e in evals(out):
        e = {k: v for k, v in e.items() if k != "search"}  # the search config's digest, logged since issue 30
        e = dict(e, seconds=None)
        e["evaluation"] = dict(e["evaluation"], seconds=None)
        lines.append(e)
    text = json.dumps([[sorted(o) if isinstance(o, set) else o for o in outcome(out)], lines], sort_keys=True)
    return json.loads(text.replace(str(Path(sources[0]).parent), "SRC"))


@pytest.mark.parametrize("algorithm", ["ga", "nsga2"])
def test_racing_off_is_bit_identical_to_before(sources, tmp_path, algorithm):
    kw = {"algorithm": algorithm, "generations": 4, "population": 6, "seed": 11}
    if algorithm == "nsga2":
        kw["objectives"] = ["score", "hops"]
    run_evolution(make_config(sources, tmp_path / "run", **kw), evaluate=TargetRoute(), **QUIET)
    assert not (tmp_path / "run" / "docs.jsonl").exists()
    (got_outcome, got_lines), (want_outcome, want_lines) = (
        normalised(tmp_path / "run", sources), json.loads((EXPECTED / f"racing_off_{algorithm}.json").read_text()))
    assert got_outcome == want_outcome
    assert len(got_lines) == len(want_lines)
    for k, (got, want) in enumerate(zip(got_lines, want_lines, strict=True)):
        assert got == want, f"evaluation {k} differs"


# ---- racing: auto, the default ----------------------------------------------------------------------
class SizedDocs(NoisyDocs):
    """NoisyDocs that says how many documents its task has without scoring, as `ModelEvaluator.documents` does."""

    def documents(self) -> dict[str, int]:
        return {"synthetic": self.docs}


def test_auto_races_at_the_defaults_where_the_first_stage_holds_20_documents(sources, tmp_path):
    """`racing: auto`, what a config without `racing:` means: with 100 documents (20 in the default first stage) the
    run is the one `racing: {}` makes, with 95 (19) the one `racing: off` makes, and with no way to count them it
    is unraced; the log says which and why."""
    assert make_config(sources, tmp_path / "x").racing == "auto"
    kw = {"generations": 2, "population": 6, "seed": 3}
    for docs, same_as, fn, said in ((100, {}, SizedDocs, "racing on (racing: auto)"),
                                    (95, "off", SizedDocs, "racing off (racing: auto): synthetic has 95 dev documents"),
                                    (100, "off", NoisyDocs, "racing off (racing: auto): the dev tasks' document counts")):
        lines: list[str] = []
        auto, other = tmp_path / f"auto-{docs}-{fn.__name__}", tmp_path / f"other-{docs}-{fn.__name__}"
        run_evolution(make_config(sources, auto, **kw), evaluate=fn(docs, noise=0.3), progress=False, log=lines.append)
        run_evolution(make_config(sources, other, racing=same_as, **kw), evaluate=NoisyDocs(docs, noise=0.3), **QUIET)
        assert outcome(auto) == outcome(other), (docs, fn)
        assert (auto / "docs.jsonl").exists() == (same_as == {})
        assert any(line.startswith(said) for line in lines), lines


def test_a_run_made_unraced_before_auto_resumes_unraced(sources, tmp_path):
    """A run whose checkpoint records racing off (what a config without `racing:` meant before `auto`), resumed with
    a config that says nothing of racing, goes on unraced with the same evaluation digest: the run it would have
    been; a run started under `auto` still refuses to resume as `off`."""
    kw = {"population": 6, "seed": 3}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_evolution(make_config(sources, straight, racing="off", generations=3, **kw), evaluate=SizedDocs(100), **QUIET)
    run_evolution(make_config(sources, resumed, racing="off", generations=1, **kw), evaluate=SizedDocs(100), **QUIET)
    run_evolution(make_config(sources, resumed, generations=3, **kw), resume=True, evaluate=SizedDocs(100), **QUIET)
    assert not (resumed / "docs.jsonl").exists()
    assert outcome(resumed) == outcome(straight)
    auto = tmp_path / "auto"
    run_evolution(make_config(sources, auto, generations=1, **kw), evaluate=SizedDocs(100), **QUIET)
    with pytest.raises(ConfigError, match="racing differs"):
        run_evolution(make_config(sources, auto, racing="off", generations=2, **kw), resume=True,
                      evaluate=SizedDocs(100), **QUIET)
    # the run folder's config.yaml is read with the safe reader (`read_yaml`) when looking for its racing: an alias
    # is refused in one line
    (auto / "config.yaml").write_text("racing: &r null\nmore: [*r, *r]\n")
    with pytest.raises(ConfigError, match=r"YAML aliases are not accepted \(\*r"):
        run_evolution(make_config(sources, auto, generations=2, **kw), resume=True, evaluate=SizedDocs(100), **QUIET)


def test_racing_words():
    """`off` (YAML reads a bare off as false) and null never race; `on` and true race at every default."""
    for word, want in (("off", None), (False, None), (None, None), ("on", RacingConfig()), (True, RacingConfig()),
                       ("auto", "auto")):
        assert make_config(["a"], Path("x"), racing=word).racing == want, word


# ---- a real fitness ---------------------------------------------------------------------------------
def test_raced_lm_eval_scores_equal_unraced_ones(tiny_source_dirs, tiny_suite_dir, tmp_path):
    """lm-eval tasks of every kind (multiple choice, rolling perplexity, few-shot generation) on tiny models, with
    the prefix cache: a candidate that finished the race has the score unraced scoring gives it; the documents
    of its stages add up to each task's documents."""
    from dfs_merge.config import RunConfig
    from dfs_merge.search.backends import ModelEvaluator

    tasks = {"tiny_mc": 1.0, "tiny_ppl": 1.0, "tiny_gen": 1.0}
    cfg = make_config([str(p) for p in tiny_source_dirs], tmp_path / "run", repeats=1, population=4, generations=1,
                      tasks=tasks, metrics={"tiny_ppl": "bits_per_byte"}, eval_suites=[str(tiny_suite_dir)],
                      constraints={"max_hops": 6}, prefix_cache_mb=64, racing={"stages": [0.5, 1.0]},
                      objectives=["score"], algorithm="ga")
    run_evolution(cfg, **QUIET)
    lines = evals(tmp_path / "run")
    full = [e for e in lines if e["error"] is None and e["evaluation"]["race"].get("dropped") is None]
    assert full
    unraced = ModelEvaluator(RunConfig(**{**cfg.model_dump(by_alias=True), "racing": None}))
    from dfs_merge.genome_files import genome_from_dict

    for e in full:
        ev = unraced(genome_from_dict(e["genome"]))
        assert e["evaluation"]["race"]["docs"] == {"tiny_mc": 6, "tiny_ppl": 4, "tiny_gen": 5}
        for name, r in ev.tasks.items():
            assert e["tasks"][name] == pytest.approx(r.value, rel=1e-6, abs=1e-9), name
        assert e["score"] == pytest.approx(ev.score, rel=1e-6, abs=1e-9)
    # The multiple-choice task's stages also log the probability of the right choice, one per document in [0, 1];
    # where it is above 1/2 the right choice had the highest likelihood, so the document's accuracy is 1. The
    # generation task logs its gold answers' likelihoods in the first stage (the one a decision follows) only.
    for rec in _docs(tmp_path / "run"):
        per_doc = rec["evaluation"]["per_doc"]
        assert "probability" not in per_doc["tiny_ppl"]
        gen = per_doc["tiny_gen"]
        if rec["stage"] == 0:
            assert len(gen["probability"]) == len(gen["items"]) and all(0 < p <= 1 for p in gen["probability"])
        else:
            assert "probability" not in gen
        mc = per_doc["tiny_mc"]
        assert len(mc["probability"]) == len(mc["items"]) and all(0 <= p <= 1 for p in mc["probability"])
        assert all(acc == 1.0 for acc, p in zip(mc["items"], mc["probability"], strict=True) if p > 0.5)


@pytest.mark.parametrize("racing, phrase", [
    ({"stages": [0.5, 0.25, 1.0]}, "racing.stages must rise strictly"),
    ({"stages": [0.25, 0.5]}, "end at 1"),
    ({"keep": 0}, "keep"),
    ({"confidence": 1.5}, "confidence"),
    ({"stage": [0.5, 1.0]}, "stage"),
    ({"keep_by": "tokens"}, "keep_by"),
    ({"bound_by": "score"}, "bound_by"),
    ("sometimes", "racing: Value error, must be auto, on, off or a block of racing settings"),
    (3, "not 3"),
])
def test_a_bad_racing_block_is_one_line_exit_2_and_writes_nothing(sources, tmp_path, racing, phrase):
    import yaml
    from builders import assert_refused, run_cli, tree_state

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"sources": sources, "tasks": {"synthetic": 1.0}, "racing": racing,
                                   "out": str(tmp_path / "out")}))
    before = tree_state(tmp_path)
    assert_refused(run_cli("evolve", cfg), phrase)
    assert tree_state(tmp_path) == before


def test_the_probability_counts_only_where_every_candidate_compared_has_it(tmp_path):
    """A run resumed from records made before a task logged its probabilities: c1 has them, c0 has not, so the two
    are compared by accuracy (paired values of one statistic), where c0 is right on every document and c1 on none."""
    values = {"c0": [1.0] * 40, "c1": [0.0] * 40}
    out, _ = race_once(values, tmp_path, probability={"c1": [1.0] * 40}, stages=[0.25, 1.0])
    assert out["c1"].dropped and not out["c0"].dropped
