"""Fitness: tasks built once, candidates scored exactly like lm-eval's own HFLM, failures contained."""

from __future__ import annotations

import gc
import json
import logging
import math
import socket
import textwrap
import weakref
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from builders import GEN_ROWS, MC_ROWS, TINY_TASK_YAMLS, write_jsonl, write_tiny_suite

from dfs_merge.config import RunConfig
from dfs_merge.errors import FitnessError
from dfs_merge.evaluation import WORST_SCORE, Evaluation, TaskResult
from dfs_merge.fitness.score import Fitness, default_suites_dir
from dfs_merge.genome import Route
from dfs_merge.models.sources import SourcePool
from dfs_merge.stitch import stitch

TASKS = {"tiny_mc": 1.0, "tiny_ppl": 0.5, "tiny_gen": 2.0}
MAX_LEN = 512  # the tiny models' max_position_embeddings


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fitness_cache")


@pytest.fixture(scope="module")
def fitness(tiny_suite_dir, cache_dir) -> Fitness:
    return Fitness(TASKS, suites=[tiny_suite_dir], max_length=MAX_LEN, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def trained_pool(tiny_trained_dir) -> SourcePool:
    return SourcePool.load([str(tiny_trained_dir)])


def identity(pool: SourcePool, source: int = 0) -> Route:
    return Route.parse(f"{source}:0-{pool.layers_per_source[source] - 1}")


def values(ev: Evaluation) -> dict[str, float]:
    return {name: r.value for name, r in ev.tasks.items()}


def responses(task) -> dict[int, list]:
    """Per document, the filtered responses of its requests in request order."""
    by_doc = defaultdict(list)
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        by_doc[inst.doc_id].append(inst.filtered_resps["none"])
    return dict(by_doc)


# --------------------------------------------------------------------------- exactness


def test_identity_route_matches_lm_evals_own_hflm(fitness, tiny_pool, tiny_source_dirs, tiny_suite_dir, cache_dir,
                                                  monkeypatch):
    """Every request whole (`shared_contexts=False`), the responses are lm-eval's to the last bit; with each shared
    context run once (the default), a multiple-choice item's log-likelihoods are within float rounding."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ev = fitness.score(stitch(tiny_pool, identity(tiny_pool)), tiny_pool.tokenizer)
    assert ev.ok and ev.hops == 4
    mine = {name: responses(task) for name, task in fitness.tasks.items()}
    whole = Fitness(TASKS, suites=[tiny_suite_dir], max_length=MAX_LEN, cache_dir=cache_dir, shared_contexts=False)
    assert whole.score(stitch(tiny_pool, identity(tiny_pool)), tiny_pool.tokenizer).ok
    exact = {name: responses(task) for name, task in whole.tasks.items()}

    # lm-eval's own path: the unmerged model from disk, tasks loaded by name (cwd = the suite,
    # where lm-eval resolves relative data_files), plain evaluate per task.
    monkeypatch.chdir(tiny_suite_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_source_dirs[0]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_source_dirs[0])
    lm = HFLM(pretrained=base, tokenizer=tok, backend="causal", max_length=MAX_LEN, batch_size=8)
    manager = TaskManager(include_path=str(tiny_suite_dir), include_defaults=False)
    for name in TASKS:
        loaded = manager.load([name])
        loaded["tasks"][name].set_fewshot_seed(0)
        res = evaluate(lm=lm, task_dict=loaded, bootstrap_iters=0, log_samples=True)
        metric = ev.tasks[name].metric
        assert ev.tasks[name].value == res["results"][name][f"{metric},none"], name
        theirs = {s["doc_id"]: s["filtered_resps"] for s in res["samples"][name]}
        assert exact[name] == theirs, name
        if name == "tiny_mc":
            assert mine[name].keys() == theirs.keys()
            for doc, answers in theirs.items():
                for (ll, greedy), (ll_theirs, greedy_theirs) in zip(mine[name][doc], answers, strict=True):
                    assert ll == pytest.approx(ll_theirs, rel=0, abs=1e-5) and greedy == greedy_theirs, doc
        else:
            assert mine[name] == theirs, name
    generated = [r[0] for r in mine["tiny_gen"].values()]
    assert any(g for g in generated), "generation produced nothing at all"
    expected = sum(w * ev.tasks[n].signed for n, w in TASKS.items())
    assert ev.score == pytest.approx(expected, abs=1e-12)
    assert ev.tasks["tiny_ppl"].metric == "bits_per_byte" and not ev.tasks["tiny_ppl"].higher_is_better
    assert ev.tasks["tiny_mc"].metric == "acc" and ev.tasks["tiny_mc"].docs == len(MC_ROWS)


@pytest.mark.parametrize("reuse", [True, False], ids=["reused-requests", "rebuilt-requests"])
def test_no_stale_results_across_candidates(tiny_pool, tiny_suite_dir, cache_dir, reuse):
    fit = Fitness(TASKS, suites=[tiny_suite_dir], max_length=MAX_LEN, cache_dir=cache_dir, reuse_requests=reuse)
    a = stitch(tiny_pool, identity(tiny_pool, 0))
    b = stitch(tiny_pool, identity(tiny_pool, 1))
    first = fit.score(a, tiny_pool.tokenizer)
    other = fit.score(b, tiny_pool.tokenizer)
    again = fit.score(a, tiny_pool.tokenizer)
    assert values(first) == values(again)
    assert values(first)["tiny_ppl"] != values(other)["tiny_ppl"]
    assert fit.build_count == 1
    if not reuse:
        return
    plain = Fitness(TASKS, suites=[tiny_suite_dir], max_length=MAX_LEN, cache_dir=cache_dir, reuse_requests=False)
    assert values(plain.score(b, tiny_pool.tokenizer)) == values(other)


def test_broken_routes_score_below_identity(trained_pool, tiny_suite_dir, cache_dir):
    fit = Fitness({"tiny_ppl": 1.0, "tiny_mc": 1.0}, suites=[tiny_suite_dir], max_length=MAX_LEN, cache_dir=cache_dir)
    tok = trained_pool.tokenizer
    good = fit.score(stitch(trained_pool, identity(trained_pool)), tok)
    repeated = fit.score(stitch(trained_pool, Route.parse("0:0, " + ", ".join(["0:1"] * 8) + ", 0:2-3")), tok)
    shrunk = fit.score(stitch(trained_pool, Route.parse("0:0-3", [1.0, 0.1, 0.1, 0.1])), tok)
    assert good.ok and repeated.ok and shrunk.ok
    assert repeated.score < good.score and shrunk.score < good.score
    assert repeated.hops == 11
    assert fit.build_count == 1


def test_difference_interval_is_paired_over_the_documents(trained_pool, tiny_suite_dir, cache_dir):
    """The bootstrap interval of a score difference draws the same documents for both candidates: two candidates
    that differ on one document only differ, in every resample, by that document's share or by nothing."""
    import copy

    fit = Fitness({"tiny_ppl": 0.5, "tiny_mc": 1.0}, suites=[tiny_suite_dir], max_length=MAX_LEN, cache_dir=cache_dir)
    assert fit.per_document()
    tok = trained_pool.tokenizer
    whole = fit.score(stitch(trained_pool, identity(trained_pool)), tok, docs=(0.0, 1.0))
    plain = fit.score(stitch(trained_pool, identity(trained_pool)), tok)
    assert whole.score == plain.score and fit.matches(whole) and fit.matches(plain)
    assert fit.difference_interval(whole, plain) is None  # no per-document results: no interval
    assert fit.difference_interval(whole, whole) == (0.0, 0.0)

    items = whole.per_doc["tiny_mc"]["items"]
    flip = items.index(1.0) if 1.0 in items else 0
    worse = copy.deepcopy(whole)
    worse.per_doc["tiny_mc"]["items"][flip] = 1.0 - items[flip]
    n = len(items)
    low, high = fit.difference_interval(whole, worse)
    # each resample holds that document k times: the difference is k/n, never of the other sign (an unpaired
    # bootstrap, drawing each candidate's documents apart, would give both signs)
    sign = 1.0 if items[flip] == 1.0 else -1.0
    assert 0 <= sign * low <= sign * high <= 3 / n + 1e-9 and high > low

    other = fit.score(stitch(trained_pool, Route.parse("0:0-3", [1.0, 0.1, 0.1, 0.1])), tok, docs=(0.0, 1.0))
    low, high = fit.difference_interval(whole, other)
    assert low <= whole.score - other.score <= high
    assert fit.difference_interval(other, whole) == pytest.approx((-high, -low))

    fewer = Fitness({"tiny_ppl": 0.5, "tiny_mc": 1.0}, suites=[tiny_suite_dir], max_length=MAX_LEN,
                    cache_dir=cache_dir, limit={"tiny_mc": 3})
    assert not fewer.matches(whole) and fewer.difference_interval(whole, other) is None


# --------------------------------------------------------------------------- failures


def test_a_failing_candidate_is_contained(fitness, tiny_pool, caplog):
    good = stitch(tiny_pool, identity(tiny_pool))
    before = fitness.score(good, tiny_pool.tokenizer)

    bad = stitch(tiny_pool, identity(tiny_pool))

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory\nwhile testing")

    bad.model.layers[2].forward = boom
    with caplog.at_level(logging.WARNING, logger="dfs_merge.fitness.score"):
        failed = fitness.score(bad, tiny_pool.tokenizer)
    assert failed.score == WORST_SCORE and not failed.ok
    assert "out of memory" in failed.error and "\n" not in failed.error
    assert any("out of memory" in r.getMessage() for r in caplog.records)
    assert failed.objectives(["score", "hops"]) == (WORST_SCORE, 1e9)

    nan = fitness.score(stitch(tiny_pool, Route.parse("0:0-3", [1.0, math.nan, 1.0, 1.0])), tiny_pool.tokenizer)
    assert nan.score == WORST_SCORE and "nan" in nan.error

    after = fitness.score(good, tiny_pool.tokenizer)
    assert after.ok and values(after) == values(before)
    assert fitness.build_count == 1


def test_scored_candidates_are_not_kept_alive(fitness, tiny_pool):
    for route in (identity(tiny_pool), Route.parse("0:0-3", [1.0, math.inf, 1.0, 1.0])):
        model = stitch(tiny_pool, route)
        ref = weakref.ref(model)
        fitness.score(model, tiny_pool.tokenizer)
        del model
        gc.collect()
        assert ref() is None, route.text()


def test_no_network_while_building_and_scoring(tiny_pool, tiny_suite_dir, cache_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    fit = Fitness(TASKS, suites=[tiny_suite_dir], max_length=MAX_LEN, cache_dir=cache_dir, limit=3)
    ev = fit.score(stitch(tiny_pool, identity(tiny_pool)), tiny_pool.tokenizer)
    assert ev.ok, ev.error
    assert all(r.docs == 3 for r in ev.tasks.values())


# --------------------------------------------------------------------------- bad tasks


def test_unknown_task_names_the_bundled_ones(tiny_suite_dir, cache_dir):
    with pytest.raises(FitnessError, match=r"unknown task 'no_such_task_xyz'.*tiny_mc") as err:
        Fitness({"no_such_task_xyz": 1.0}, suites=[tiny_suite_dir], cache_dir=cache_dir)
    assert "\n" not in str(err.value)


def test_missing_suite_folder(tmp_path, cache_dir):
    with pytest.raises(FitnessError, match="does not exist"):
        Fitness({"tiny_mc": 1.0}, suites=[tmp_path / "nope"], cache_dir=cache_dir)


def test_unreadable_yaml_is_named(tmp_path, cache_dir):
    suite = write_tiny_suite(tmp_path / "suite")
    (suite / "tiny_broken.yaml").write_text("task: tiny_broken\ndataset_path: json\n  bad: [unclosed\n")
    with pytest.raises(FitnessError, match=r"tiny_broken.*tiny_broken\.yaml.*cannot be read") as err:
        Fitness({"tiny_broken": 1.0}, suites=[suite], cache_dir=cache_dir)
    assert "\n" not in str(err.value)
    # the other tasks of that suite still build
    assert Fitness({"tiny_mc": 1.0}, suites=[suite], cache_dir=cache_dir).build_count == 1


def test_invalid_task_config_is_one_line(tmp_path, cache_dir):
    suite = write_tiny_suite(tmp_path / "suite")
    text = textwrap.dedent(TINY_TASK_YAMLS["tiny_mc"]).replace("tiny_mc\n", "tiny_odd\n", 1)
    (suite / "tiny_odd.yaml").write_text(text.replace("output_type: multiple_choice", "output_type: guesswork"))
    with pytest.raises(FitnessError, match=r"task tiny_odd .*cannot be built.*guesswork") as err:
        Fitness({"tiny_odd": 1.0}, suites=[suite], cache_dir=cache_dir)
    assert "\n" not in str(err.value)


def test_jsonl_row_missing_a_field(tmp_path, cache_dir):
    suite = write_tiny_suite(tmp_path / "suite")
    rows = [dict(r) for r in GEN_ROWS]
    del rows[2]["answer"]
    write_jsonl(suite / "data" / "tiny_gen.jsonl", rows)
    with pytest.raises(FitnessError, match=r"task tiny_gen: row 3 .*lacks field\(s\) answer"):
        Fitness({"tiny_gen": 1.0}, suites=[suite], cache_dir=cache_dir)


def test_jsonl_without_a_templated_field(tmp_path, cache_dir):
    suite = write_tiny_suite(tmp_path / "suite")
    write_jsonl(suite / "data" / "tiny_gen.jsonl", [{"question": r["question"]} for r in GEN_ROWS])
    with pytest.raises(FitnessError, match=r"task tiny_gen .*cannot be built.*answer") as err:
        Fitness({"tiny_gen": 1.0}, suites=[suite], cache_dir=cache_dir)
    assert "\n" not in str(err.value)


def test_relative_data_files_do_not_depend_on_the_working_directory(tmp_path, cache_dir, monkeypatch):
    suite = write_tiny_suite(tmp_path / "suite")
    monkeypatch.chdir(tmp_path)  # neither the suite folder nor the repository
    fit = Fitness({"tiny_mc": 1.0}, suites=[suite], cache_dir=cache_dir)
    assert fit.describe()["tiny_mc"]["docs"] == len(MC_ROWS)


def test_metric_override_and_bad_metric(tiny_suite_dir, tiny_pool, cache_dir):
    fit = Fitness({"tiny_ppl": 1.0}, metrics={"tiny_ppl": "word_perplexity"}, suites=[tiny_suite_dir],
                  max_length=MAX_LEN, cache_dir=cache_dir)
    ev = fit.score(stitch(tiny_pool, identity(tiny_pool)), tiny_pool.tokenizer)
    assert ev.tasks["tiny_ppl"].metric == "word_perplexity"
    assert ev.score == -ev.tasks["tiny_ppl"].value
    with pytest.raises(FitnessError, match="metric 'f1' is not one of its metrics"):
        Fitness({"tiny_ppl": 1.0}, metrics={"tiny_ppl": "f1"}, suites=[tiny_suite_dir], cache_dir=cache_dir)


# --------------------------------------------------------------------------- records and config


def test_evaluation_round_trips_through_json():
    ev = Evaluation(
        score=-1.25, hops=7, seconds=0.5,
        tasks={"t": TaskResult("t", "bits_per_byte", 1.25, False, 10, 0.4)},
    )
    back = Evaluation.from_dict(json.loads(json.dumps(ev.to_dict())))
    assert back == ev
    assert back.objectives(["score", "hops"]) == (-1.25, 7.0)
    assert back.objectives(["hops"]) == (7.0,)
    failed = Evaluation(WORST_SCORE, 3, error="RuntimeError: boom")
    assert Evaluation.from_dict(json.loads(json.dumps(failed.to_dict()))) == failed
    with pytest.raises(ValueError):
        ev.objectives(["speed"])


def test_from_config_maps_dev_weights_onto_report_tasks(tmp_path, cache_dir):
    suite = tmp_path / "suite"
    write_tiny_suite(suite)
    for split in ("dev", "test"):
        text = textwrap.dedent(TINY_TASK_YAMLS["tiny_mc"]).replace("task: tiny_mc", f"task: mc_{split}")
        (suite / f"mc_{split}.yaml").write_text(text)
    cfg = RunConfig(
        sources=["x"], tasks={"mc_dev": 3.0}, report_tasks=["mc_test", "tiny_ppl"], metrics={"mc_dev": "acc_norm"},
        eval_suites=[str(suite)], limit=2, seed=5,
    )
    dev = Fitness.from_config(cfg, "dev", cache_dir=cache_dir)
    assert dev.weights == {"mc_dev": 3.0} and dev.limits == {"mc_dev": 2} and dev.seed == 5
    assert dev.describe()["mc_dev"]["metric"] == "acc_norm"
    test = Fitness.from_config(cfg, "test", cache_dir=cache_dir)
    assert test.weights == {"mc_test": 3.0, "tiny_ppl": 1.0} and test.limits == {"mc_test": None, "tiny_ppl": None}
    assert test.describe()["mc_test"]["docs"] == 6
    per_task = Fitness.from_config(cfg.model_copy(update={"report_limit": {"mc_test": 3}}), "test", cache_dir=cache_dir)
    assert per_task.limits == {"mc_test": 3, "tiny_ppl": None} and per_task.describe()["mc_test"]["docs"] == 3
    assert test.describe()["mc_test"]["metric"] == "acc_norm"
    assert test.describe()["tiny_ppl"]["metric"] == "bits_per_byte"


def test_bundled_suites_build_and_score(tiny_pool, tiny_vlm_pool, cache_dir):
    """Every task bundled in eval_suites/ builds (data found from any cwd) and scores a tiny model: the text tasks a
    tiny Llama, the image tasks a tiny LLaVA."""
    from lm_eval.tasks import TaskManager

    root = default_suites_dir()
    assert root.is_dir(), f"the bundled eval suites are missing: {root}"  # part of the checkout and the wheel
    names = TaskManager(include_path=str(root), include_defaults=False).all_subtasks
    assert names, f"no task found in the bundled eval suites ({root})"
    images = [n for n in names if n.startswith("image_qa_")]
    assert images, "the image suite is not bundled"
    for pool, tasks in ((tiny_pool, [n for n in names if n not in images]), (tiny_vlm_pool, images)):
        fit = Fitness({n: 1.0 for n in tasks}, limit=2, max_length=MAX_LEN, cache_dir=cache_dir)
        assert fit.image_tasks() == (images if pool is tiny_vlm_pool else [])
        ev = fit.score(*pool.candidate(stitch(pool, identity(pool))))
        assert ev.ok, ev.error
        assert set(ev.tasks) == set(tasks)
        assert torch.isfinite(torch.tensor(ev.score))


def test_a_guarded_task_is_a_constraint_not_a_term(tiny_suite_dir, tiny_pool, cache_dir, tmp_path):
    """Within its bound a guarded task adds nothing; beyond it, -weight x the excess; report tasks inherit it."""
    model = stitch(tiny_pool, identity(tiny_pool))
    plain = Fitness({"tiny_ppl": 2.0, "tiny_mc": 1.0}, suites=[tiny_suite_dir], max_length=MAX_LEN, cache_dir=cache_dir)
    ev = plain.score(model, tiny_pool.tokenizer)
    bpb, acc = ev.tasks["tiny_ppl"].value, ev.tasks["tiny_mc"].value
    assert ev.score == pytest.approx(acc - 2.0 * bpb)
    for bound, penalty in ((bpb + 0.5, 0.0), (bpb - 0.25, 2.0 * 0.25)):
        guarded = Fitness({"tiny_ppl": 2.0, "tiny_mc": 1.0}, guards={"tiny_ppl": bound}, suites=[tiny_suite_dir],
                          max_length=MAX_LEN, cache_dir=cache_dir)
        assert guarded.score(model, tiny_pool.tokenizer).score == pytest.approx(acc - penalty)
    cfg = RunConfig(sources=["x"], tasks={"a_dev": 1.0, "b_dev": 1.0}, guards={"a_dev": 0.5},
                    report_tasks=["a_test", "b_test"], select_tasks=["a_val"])
    assert cfg.split_guards("test") == {"a_test": 0.5} and cfg.split_guards("val") == {"a_val": 0.5}
    with pytest.raises(ValueError, match="guards names tasks that are not in tasks"):
        RunConfig(sources=["x"], tasks={"a_dev": 1.0}, guards={"c_dev": 1.0})


def test_race_windows_are_rounded_up_prefixes_that_tile_each_task(fitness):
    """A race stage (from, to) scores documents [ceil(from x N), ceil(to x N)): the stages tile the documents in
    order, each one once; a stage above 0 holds at least one; a product like 0.07 x 100 = 7.000000000000001 in
    binary is 7 documents, not 8."""
    from dfs_merge.fitness.score import prefix_size

    stages = (0.0, 0.25, 0.5, 1.0)
    sizes = {"tiny_mc": 6, "tiny_ppl": 4, "tiny_gen": 5}
    for name, n in sizes.items():
        windows = [fitness.window(name, (a, b)) for a, b in zip(stages, stages[1:], strict=False)]
        assert [d for w in windows for d in w] == list(range(n)), name
    # 6 documents: ceil(1.5) = 2, ceil(3) = 3, 6
    assert [len(fitness.window("tiny_mc", (a, b))) for a, b in zip(stages, stages[1:], strict=False)] == [2, 1, 3]
    # 5 documents: ceil(1.25) = 2, ceil(2.5) = 3, 5
    assert [len(fitness.window("tiny_gen", (a, b))) for a, b in zip(stages, stages[1:], strict=False)] == [2, 1, 2]
    assert [prefix_size(f, 100) for f in (0.07, 0.55, 0.001, 0.0, 1.0)] == [7, 55, 1, 0, 100]
