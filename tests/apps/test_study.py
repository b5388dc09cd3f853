"""The self-merge study, shrunk: tiny sources, heuristics for n = 1, 2, two short nsga2 runs, export."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from builders import write_self_merge_config

from dfs_merge.apps.study import ScoreLog
from dfs_merge.cli import main
from dfs_merge.config import load_config
from dfs_merge.errors import DfsMergeError
from dfs_merge.evaluation import Evaluation
from dfs_merge.fitness.score import Fitness
from dfs_merge.genome import Genome, Route, seed_genomes
from dfs_merge.models.sources import SourcePool
from dfs_merge.search.backends import Evaluator, ProcessPoolEvaluator
from dfs_merge.stitch import stitch


@pytest.fixture
def study_config(tmp_path, tiny_trained_dir) -> str:
    # unpinned: the tiny model's heuristics drop its last layer, which a pinned route would put back
    return write_self_merge_config(tmp_path, tiny_trained_dir, "study", population=6, generations=1,
                                   constraints={"pin_ends": False, "min_hops": 2, "max_hops": 6},
                                   select_tasks=["prose_ppl_val", "cloze_mc_val"], select_limit=3, select_top=2)


@pytest.mark.slow
def test_study_scores_heuristics_and_fronts_held_out_and_resumes(study_config, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    assert main(["study", study_config, "--sizes", "1,2", "--prune-hops", "3"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(study_config)
    root = Path(cfg.out)
    res = json.loads((root / "results.json").read_text())
    kinds = [p["kind"] for p in res["points"]]
    assert kinds.count("shortgpt") == 2 and kinds.count("angular") == 2
    assert {"base", "deepening", "evolved", "evolved (scaling none)"} <= set(kinds)
    assert "front vs the pruning heuristics" in out and (root / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert f"run reports (open in a browser): {root / 'evolved' / 'report.html'}, " in out
    assert (root / "evolved-scaling-none" / "report.html").is_file()

    # The heuristics' pruned routes were in generation 0 of both runs.
    heuristic_keys = {Route.parse(p["route"]).key() for p in res["points"] if p["kind"] in ("shortgpt", "angular")}
    for run in ("evolved", "evolved-scaling-none"):
        gen0 = {json.loads(line)["key"] for line in (root / run / "evals.jsonl").read_text().splitlines()
                if json.loads(line)["generation"] == 0}
        assert heuristic_keys <= gen0
    assert {Route.parse(t).key() for t in res["seed_routes"]} == heuristic_keys

    # Validation and held-out scores are the fitness of the stitched route on that split (a front member's validation
    # score, the base's held-out one).
    pool = SourcePool.load(cfg.sources)
    base = next(p for p in res["points"] if p["kind"] == "base")
    member = next(p for p in res["points"] if p["kind"] == "evolved")
    for split, point in (("val", member), ("test", base)):
        route = Route.parse(point["route"], point["scales"])
        assert point[split]["score"] == Fitness.from_config(cfg, split).score(stitch(pool, route), pool.tokenizer).score

    # Each hop count's member is the best on validation among the 2 best by dev at that hop count.
    evals = [json.loads(line)["evaluation"] | {"key": json.loads(line)["key"]}
             for line in (root / "evolved" / "evals.jsonl").read_text().splitlines()]
    val_log = {json.loads(line)["key"]: json.loads(line)["eval"]["score"]
               for line in (root / "val_scores.jsonl").read_text().splitlines()}
    members = [p for p in res["points"] if p["kind"] == "evolved"]
    assert res["select"] == {"tasks": ["prose_ppl_val", "cloze_mc_val"], "top": 2} and members
    for m in members:
        same_hops = sorted((e for e in evals if e["hops"] == m["hops"] and not e["error"]), key=lambda e: -e["score"])
        shortlisted = list({e["key"]: e for e in same_hops}.values())[:2]
        assert all(e["key"] in val_log for e in shortlisted)
        assert m["val"]["score"] == max(val_log[e["key"]] for e in shortlisted)

    # A member at every hop count the search scored from the dev front's fewest hops to its most.
    front = [m["hops"] for m in json.loads((root / "evolved" / "pareto.json").read_text())]
    assert sorted(m["hops"] for m in members) == sorted(
        {e["hops"] for e in evals if not e["error"] and min(front) <= e["hops"] <= max(front)})

    # Each comparison takes the member the validation score prefers and reports its held-out score.
    for row in res["comparisons"]["evolved"]:
        fits = [p for p in members if p["hops"] <= row["hops"]]
        pick = max(fits, key=lambda p: (p["val"]["score"], p["hops"]))
        assert (row["front_hops"], row["front_test"]) == (pick["hops"], pick["test"]["score"])
        assert row["verdict"] == ("better" if pick["test"]["score"] > row["heuristic_test"] else
                                  "equal" if pick["test"]["score"] == row["heuristic_test"] else "worse")

    # Each difference comes with its paired bootstrap interval over the held-out documents, which the logged
    # per-document results reproduce.
    test_log = {json.loads(line)["key"]: Evaluation.from_dict(json.loads(line)["eval"])
                for line in (root / "test_scores.jsonl").read_text().splitlines()}
    key_of = {p["name"]: Route.parse(p["route"], p["scales"]).key() for p in res["points"]}
    test_fitness = Fitness.from_config(cfg, "test")
    for row in res["comparisons"]["evolved"]:
        member, heuristic = test_log[key_of[row["front_member"]]], test_log[key_of[row["heuristic"]]]
        assert row["interval"] == list(test_fitness.difference_interval(member, heuristic))
        assert row["interval"][0] <= row["difference"] <= row["interval"][1]
    assert "95% interval" in (root / "results.md").read_text()

    # Held out: the base, every heuristic and the members a comparison takes, no other route (`--held-out compared`,
    # the default; a member whose route is a heuristic's shows that score).
    compared = {r["front_member"] for label in res["comparisons"] for r in res["comparisons"][label]}
    wanted = {key_of[p["name"]] for p in res["points"] if p["name"] in compared or not p["kind"].startswith("evolved")}
    assert set(test_log) == wanted
    assert {key_of[p["name"]] for p in res["points"] if p["test"] is not None} == wanted

    # The best pruned member is exported and loads as a plain checkpoint.
    assert res["export"]["hops"] <= 3 and len(res["export"]["samples"]) == 3
    model = AutoModelForCausalLM.from_pretrained(res["export"]["folder"])
    assert model.config.num_hidden_layers == res["export"]["hops"]

    # A second study reuses every evaluation, dev and held out.
    counts = {f: (root / f).read_text().count("\n") for f in
              ("test_scores.jsonl", "val_scores.jsonl", "dev_scores.jsonl", "evolved/evals.jsonl",
               "evolved-scaling-none/evals.jsonl")}
    assert main(["study", study_config, "--sizes", "1,2", "--prune-hops", "3"]) == 0
    assert {f: (root / f).read_text().count("\n") for f in counts} == counts

    # A study resumed with another held-out split (a changed report_limit) scores every point on it again,
    # and reuses everything else.
    data = yaml.safe_load(Path(study_config).read_text())
    Path(study_config).write_text(yaml.safe_dump(data | {"report_limit": 2}))
    assert main(["study", study_config, "--sizes", "1,2", "--prune-hops", "3"]) == 0
    res = json.loads((root / "results.json").read_text())
    held = [p for p in res["points"] if p["test"] is not None]
    assert {r.docs for p in held for r in Evaluation.from_dict(p["test"]).tasks.values()} == {2}
    assert (root / "test_scores.jsonl").read_text().count("\n") == counts["test_scores.jsonl"] + len(
        {key_of[p["name"]] for p in held})
    assert all((root / f).read_text().count("\n") == n for f, n in counts.items() if f != "test_scores.jsonl")

    # With `workers: 2` the study scores its validation and held-out routes in two worker processes, all of a
    # split's submitted at once, and gives the same points. Stopped (Ctrl-C) after two held-out scores were logged,
    # it resumes without scoring a logged route again.
    in_process = json.loads((root / "results.json").read_text())["points"]
    for f in ("val_scores.jsonl", "test_scores.jsonl", "dev_scores.jsonl"):
        (root / f).unlink()
    Path(study_config).write_text(yaml.safe_dump(data | {"report_limit": 2, "workers": 2, "threads": 1}))
    submitted: list[list[str]] = []
    pool_submit = ProcessPoolEvaluator.submit

    def spy(self, genomes, docs=None):
        submitted.append([g.key() for g in genomes])
        return pool_submit(self, genomes, docs)

    record = ScoreLog.record

    def stop_after_two(self, route, ev):
        record(self, route, ev)
        if self.path.name == "test_scores.jsonl" and len(self.known) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ProcessPoolEvaluator, "submit", spy)
    monkeypatch.setattr(ScoreLog, "record", stop_after_two)
    assert main(["study", study_config, "--sizes", "1,2", "--prune-hops", "3"]) == 130
    point_keys = {key_of[p["name"]] for p in in_process if p["test"] is not None}
    logged = [json.loads(line)["key"] for line in (root / "test_scores.jsonl").read_text().splitlines()]
    val_keys = [json.loads(line)["key"] for line in (root / "val_scores.jsonl").read_text().splitlines()]
    assert len(submitted) == 2 and len(val_keys) > 2 and len(logged) == 2  # validation's routes, then held-out's
    assert sorted(submitted[0]) == sorted(val_keys) and sorted(submitted[1]) == sorted(point_keys)
    monkeypatch.setattr(ScoreLog, "record", record)
    assert main(["study", study_config, "--sizes", "1,2", "--prune-hops", "3"]) == 0
    assert len(submitted) == 3 and sorted(submitted[2]) == sorted(point_keys - set(logged))  # the rest, at once
    test_keys = [json.loads(line)["key"] for line in (root / "test_scores.jsonl").read_text().splitlines()]
    assert sorted(test_keys) == sorted(point_keys)  # each once

    def scores(points):  # what a point says, but how long it took
        return [(p["name"], p["route"], p["scales"], *(
            p[s] and (p[s]["score"], p[s]["hops"], p[s]["error"],
                      {t: (r["metric"], r["value"], r["docs"]) for t, r in p[s]["tasks"].items()})
            for s in ("dev", "val", "test"))) for p in points]

    assert scores(json.loads((root / "results.json").read_text())["points"]) == scores(in_process)

    # `--held-out all` scores the other members too (one submit), and changes no comparison.
    comparisons = json.loads((root / "results.json").read_text())["comparisons"]
    assert main(["study", study_config, "--sizes", "1,2", "--prune-hops", "3", "--held-out", "all"]) == 0
    res = json.loads((root / "results.json").read_text())
    assert all(p["test"] is not None for p in res["points"])
    missing = {key_of[p["name"]] for p in res["points"]} - point_keys  # here every member is compared or a heuristic
    assert len(submitted) == 3 + (len(missing) > 1) and set(test_log) | missing == set(
        json.loads(line)["key"] for line in (root / "test_scores.jsonl").read_text().splitlines())
    assert res["comparisons"] == comparisons


def test_score_log_fill_logs_each_route_as_it_arrives_and_never_a_lost_one(tmp_path):
    """`ScoreLog.fill` submits the unknown routes at once, each as a genome that checks to exactly it (the naive
    deepening's beyond any hop limit included); a route lost to an infrastructure fault is not logged, and the
    study stops naming it, once the others are logged."""
    submitted = []

    class Backend(Evaluator):
        def submit(self, genomes, docs=None):
            for g in genomes:
                route = g.check()
                submitted.append((route.text(), docs))
                yield g.key(), (Evaluation.lost("worker died", len(route)) if route.text() == "0:0-1"
                                else Evaluation(-float(len(route)), len(route)))

    score = SimpleNamespace(pool=SimpleNamespace(paths=["m"], layers_per_source=(4,)))
    path = tmp_path / "test_scores.jsonl"
    log = ScoreLog(path, score, per_document=True, backend=Backend())
    log.remember(Route.parse("0:0-2").key(), Evaluation(-3.0, 3))
    routes = [Route.parse(t) for t in ("0:0-3", "0:0-1", "0:0-2", "0:0-2, 0:1-3", "0:0-3")]
    with pytest.raises(DfsMergeError, match=r"test_scores.jsonl: 1 of 3 route\(s\) lost .*: 0:0-1; run the study"):
        log.fill(routes)
    assert submitted == [(t, (0.0, 1.0)) for t in ("0:0-3", "0:0-1", "0:0-2, 0:1-3")]
    assert [json.loads(line)["route"] for line in path.read_text().splitlines()] == ["0:0-3", "0:0-2, 0:1-3"]
    assert log(Route.parse("0:0-2, 0:1-3")).score == -6.0 and Route.parse("0:0-1").key() not in log.known


def test_seed_routes_are_checked_before_anything_runs(tmp_path, tiny_source_dirs, capsys):
    cfg = {"sources": [str(tiny_source_dirs[0])], "repeats": 1, "tasks": {"cloze_mc_dev": 1.0},
           "seed_routes": ["0:0-1, 0:1-3"], "out": str(tmp_path / "run")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["evolve", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dfs-merge: error: seed_routes: seed route '0:0-1, 0:1-3'") and "repeats=1" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_more_seeds_than_population_and_bad_sizes_are_one_line(tmp_path, tiny_source_dirs, capsys):
    cfg = {"sources": [str(tiny_source_dirs[0])], "repeats": 2, "tasks": {"cloze_mc_dev": 1.0}, "population": 2,
           "seed_routes": ["0:0, 0:2-3", "0:0-1, 0:3"], "out": str(tmp_path / "run")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["evolve", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "dfs-merge: error: seed_routes: 3 distinct seeds (with the sources themselves) do not fit population 2")
    with pytest.raises(SystemExit) as exit_info:
        main(["study", str(path), "--sizes", "2,x"])
    assert exit_info.value.code == 2 and "expected positive integers separated by commas" in capsys.readouterr().err


def test_seed_genomes_add_routes_once():
    template = Genome.empty(["m"], (4,), 2, "slot")
    seeds = seed_genomes(template, ["0:0-3", "0:0-1, 0:1-3", "0:0-1, 0:1-3"])
    assert [g.decode().text() for g in seeds] == ["0:0-3", "0:0-1, 0:1-3"]


def test_the_qwen_study_config_is_the_smollm2_study_with_the_code_suite():
    """genomes/qwen-coder-self.yaml (`make study-qwen`): a study config (one source, nsga2 on [score, hops], report
    tasks), whose dev, validation and held-out splits score the same bundled suites, the code completion suite
    among them, and whose constraints hold every heuristic's route at n = 2, 4, 6, 8 of Qwen2.5-Coder's 24 layers."""
    from lm_eval.tasks import TaskManager

    from dfs_merge import CHECKOUT
    from dfs_merge.apps.baselines import naive_deepening_route
    from dfs_merge.fitness.tasks import default_suites_dir

    cfg = load_config(CHECKOUT / "genomes" / "qwen-coder-self.yaml")
    assert cfg.sources == ["qwen2.5-coder-0.5b-instruct"] and cfg.algorithm == "nsga2"
    assert cfg.objectives == ["score", "hops"] and cfg.racing is not None
    bundled = set(TaskManager(include_path=str(default_suites_dir()), include_defaults=False).all_subtasks)
    suites = {split: {t.rsplit("_", 1)[0] for t in cfg.split_tasks(split)[0]} for split in ("dev", "val", "test")}
    assert suites["dev"] == suites["val"] == suites["test"] and "code_complete" in suites["dev"]
    assert {t for split in ("dev", "val", "test") for t in cfg.split_tasks(split)[0]} <= bundled
    template = Genome.empty(cfg.sources, (24,), cfg.repeats, cfg.scaling, cfg.constraints)
    for n in (2, 4, 6, 8):  # the first and last layer kept, as the heuristics' routes keep them on SmolLM2
        kept = [i for i in range(24) if not 1 <= i <= n] if n % 4 else [i for i in range(24) if not 22 - n < i < 23]
        route = Route.parse(", ".join(f"0:{i}" for i in kept))
        assert len(seed_genomes(template, [route.text()])) == 2
    assert len(naive_deepening_route(24)) == 32  # scored as a point of its own, not a seed
    makefile = (CHECKOUT / "Makefile").read_text()
    assert "dfs-merge study genomes/qwen-coder-self.yaml --prune-hops 20 --no-ablation" in makefile


def test_held_out_takes_the_heuristics_and_the_members_the_comparisons_take():
    """`held_out_routes`: with `compared`, the members no comparison takes (the 3- and 5-hop ones: both heuristics
    compare with the 4-hop one, best on validation) are not scored held out; with `all` they are."""
    from dfs_merge.apps.study import Point, held_out_routes

    def ev(score: float, hops: int) -> Evaluation:
        return Evaluation(score=score, hops=hops, seconds=0.0)

    def point(name: str, kind: str, route: str, val: float | None = None) -> Point:
        r = Route.parse(route)
        return Point(name, kind, r, ev(0.0, len(r)), None, None if val is None else ev(val, len(r)))

    points = [point("base", "base", "0:0-5"), point("shortgpt -2", "shortgpt", "0:0-3"),
              point("angular -1", "angular", "0:0-4"), point("naive deepening", "deepening", "0:0-5, 0:2-5"),
              point("evolved 3", "evolved", "0:0-2", val=-2.0), point("evolved 4", "evolved", "0:0-1, 0:3-4", val=-1.0),
              point("evolved 5", "evolved", "0:0-1, 0:3-5", val=-1.5)]
    names = {p.route.key(): p.name for p in points}
    chosen = [names[r.key()] for r in held_out_routes(points, ["evolved"])]
    assert chosen == ["base", "shortgpt -2", "angular -1", "naive deepening", "evolved 4"]
    assert [names[r.key()] for r in held_out_routes(points, ["evolved"], "all")] == [p.name for p in points]
