"""Logits only where they are scored: the LM head runs over the continuation's positions of a loglikelihood
request instead of every position, and every score stays what the full computation gives (float rounding),
for answer-likelihood, multiple-choice and rolling-perplexity tasks, over a route, a route through the prefix
cache and a parameter-space merge."""

from __future__ import annotations

import itertools
import math
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest
from builders import GEN_ROWS, TINY_TASK_YAMLS, write_answer_task, write_tiny_suite

from dfs_merge.fitness.lm_eval_glue import first_scored_positions, logits_to_keep
from dfs_merge.fitness.score import Fitness
from dfs_merge.genome import Route
from dfs_merge.merging.blend import Blender
from dfs_merge.merging.recipe import initial_recipe
from dfs_merge.stitch import ActivationCache, stitch

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = {"tiny_mc": 1.0, "tiny_ppl": 1.0, "tiny_ll": 1.0}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    folder = write_answer_task(write_tiny_suite(tmp_path_factory.mktemp("suite")),
                               GEN_ROWS + [{"question": "1 + 1 + 1 + 1 + 1", "answer": "5"}])
    # tiny_gen with the answer right after the cue: a one-digit answer is one token of the tiny tokenizer
    tight = TINY_TASK_YAMLS["tiny_gen"].replace("task: tiny_gen", "task: tiny_gen_tight")
    (folder / "tiny_gen_tight.yaml").write_text(textwrap.dedent(tight) + 'target_delimiter: ""\n')
    return folder


def head_positions(model) -> list[int]:
    """Record the number of positions the LM head is applied to, call by call."""
    seen: list[int] = []
    model.lm_head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    return seen


def responses(fit: Fitness) -> dict[str, dict[int, list]]:
    out: dict[str, dict[int, list]] = {}
    for name, task in fit.tasks.items():
        by_doc = defaultdict(list)
        for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
            by_doc[inst.doc_id].append(inst.resps[0])
        out[name] = dict(by_doc)
    return out


def candidates(pool):
    route = Route.parse("0:0-2, 1:1-3")
    yield "route", lambda: stitch(pool, route)
    cache = ActivationCache(max_mb=16)
    yield "route through the prefix cache", lambda: stitch(pool, route, activation_cache=cache)
    recipe = initial_recipe(pool.paths, len(pool.base.layers), "task_arithmetic", 0, 2, 0.7)
    yield "parameter-space merge", lambda: Blender(pool).apply(recipe)


def test_scores_equal_the_full_logits_and_the_head_runs_only_where_scored(tiny_pool, suite, tmp_path):
    for label, build in candidates(tiny_pool):
        got, positions = {}, {}
        for trim in (False, True):
            per_task = {}
            for name in TASKS:  # one task at a time, to count the LM head's positions per task
                model = build()
                seen = head_positions(model)
                one = Fitness({name: 1.0}, suites=[suite], max_length=512, batch_size=3, cache_dir=tmp_path,
                              scored_logits_only=trim, shared_contexts=False)  # every request whole
                ev = one.score(model, tiny_pool.tokenizer)
                assert ev.ok, (label, name, ev.error)
                per_task[name] = (ev.tasks[name].value, responses(one)[name], sum(seen))
            got[trim] = per_task
        for name in TASKS:
            (v_full, r_full, n_full), (v_trim, r_trim, n_trim) = got[False][name], got[True][name]
            assert v_trim == pytest.approx(v_full, rel=1e-6), (label, name)
            assert r_trim.keys() == r_full.keys()
            for doc, full in r_full.items():
                for a, b in zip(r_trim[doc], full, strict=True):
                    if isinstance(b, tuple):  # (log-likelihood, greedy) of a loglikelihood request
                        assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-5) and a[1] == b[1], (label, name, doc)
                    else:  # a rolling log-likelihood
                        assert a == pytest.approx(b, rel=1e-5), (label, name, doc)
            positions[name] = (n_full, n_trim)
        assert positions["tiny_ppl"][1] == positions["tiny_ppl"][0], label  # rolling: every position scored
        for name in ("tiny_mc", "tiny_ll"):
            full, trimmed = positions[name]
            assert trimmed < full / 2, (label, name, full, trimmed)


def test_a_batch_keeps_the_positions_of_its_earliest_continuation():
    requests = [(("a", "b"), [5, 6, 7], [8, 9]), (("c", "d"), [5, 6], [4]), (("e", "f"), [3], [0, 0])]
    first = first_scored_positions(requests, max_length=16)
    assert first == {(5, 6, 7, 8): 2, (5, 6): 1, (3, 0): 0}
    assert logits_to_keep([[5, 6, 7, 8], [5, 6, 0, 0]], first) == 3  # row 2's continuation starts at 1
    assert logits_to_keep([[5, 6, 7, 8]], first) == 2
    assert logits_to_keep([[3, 0, 0, 0]], first) == 0  # starts at 0: all positions (a padding 0 tried too)
    assert logits_to_keep([[9, 9, 0, 0]], first) == 0  # not a request: all positions
    truncated = first_scored_positions([(("x", "y"), list(range(1, 20)), [20, 21])], max_length=8)
    assert truncated == {tuple(range(13, 21)): 6}  # left-truncated to 9 tokens, the last dropped


def test_the_answer_task_scores_greedy_accuracy_by_default_and_the_answers_perplexity_on_request(tiny_pool, suite,
                                                                                                 tmp_path):
    """The bundled answer template's two statistics of one forward: acc (the default) is the share of answers
    that are the greedy continuation; `perplexity` is exp of minus the answers' mean log-likelihood (what a
    search can climb smoothly), lower is better."""
    model = stitch(tiny_pool, Route.parse("0:0-2, 1:1-3"))
    by_metric = {}
    for metric in (None, "perplexity"):
        fit = Fitness({"tiny_ll": 1.0}, suites=[suite], max_length=512, batch_size=3, cache_dir=tmp_path,
                      metrics={"tiny_ll": metric} if metric else None)
        ev = fit.score(model, tiny_pool.tokenizer)
        assert ev.ok, ev.error
        by_metric[metric] = (ev.tasks["tiny_ll"], [r[0] for r in responses(fit)["tiny_ll"].values()])
    acc, answers = by_metric[None]
    assert acc.metric == "acc" and acc.higher_is_better
    assert acc.value == pytest.approx(sum(greedy for _, greedy in answers) / len(answers))
    # racing's per-document statistic: the answer's probability, exp of its log-likelihood
    fit = Fitness({"tiny_ll": 1.0}, suites=[suite], max_length=512, batch_size=3, cache_dir=tmp_path)
    per_doc = fit.score(model, tiny_pool.tokenizer, docs=(0.0, 1.0)).per_doc["tiny_ll"]
    assert per_doc["probability"] == pytest.approx([math.exp(ll) for ll, _ in answers], rel=1e-9)
    ppl, answers = by_metric["perplexity"]
    assert ppl.metric == "perplexity" and not ppl.higher_is_better
    assert ppl.value == pytest.approx(math.exp(-sum(ll for ll, _ in answers) / len(answers)), rel=1e-9)
    assert ppl.value > 1.0


def test_the_probability_of_the_right_answer_per_document():
    """What racing bounds and ranks by (`right_probabilities`): the right choice's share of a multiple-choice item's
    likelihood, an answer task's own likelihood; nothing for a task scored by another metric."""
    from types import SimpleNamespace

    from dfs_merge.fitness.score import right_probabilities
    from dfs_merge.fitness.tasks import TaskSpec

    def spec(kind: str, metric: str = "acc") -> TaskSpec:
        return TaskSpec("t", SimpleNamespace(OUTPUT_TYPE=kind), metric, "none", True, 2)

    mc = [{"doc_id": 0, "filter": "none", "target": 1, "filtered_resps": [[-2.0, False], [-1.0, True]]},
          {"doc_id": 1, "filter": "none", "target": 0, "filtered_resps": [[-1.0, True], [-1.0, False]]}]
    assert right_probabilities(mc, spec("multiple_choice"), range(2)) == pytest.approx([1 / (1 + math.e ** -1), 0.5])
    answers = [{"doc_id": d, "filter": "none", "target": " 13", "filtered_resps": [[ll, False]]}
               for d, ll in ((0, -0.5), (1, -3.0))]
    assert right_probabilities(answers, spec("loglikelihood"), range(2)) == pytest.approx([math.exp(-0.5), math.exp(-3)])
    assert right_probabilities(answers, spec("loglikelihood"), range(3)) is None  # a document without its result
    assert right_probabilities(answers, spec("loglikelihood", "perplexity"), range(2)) is None
    assert right_probabilities(mc, spec("generate_until", "exact_match"), range(2)) is None


def test_a_generation_task_records_its_gold_answers_likelihood_before_a_race_s_last_stage(tiny_pool, suite, tmp_path,
                                                                                         monkeypatch):
    """Racing's statistic for an answer generated and compared exactly: the gold answer's likelihood after the
    generation's context, what lm-eval's own full computation of that loglikelihood request gives (float rounding),
    whether read off the generation's first forward (one-token answers) or from one more forward (longer ones);
    the generations and exact-match results the same as without it; none at the last stage, which decides nothing."""
    from types import SimpleNamespace

    from dfs_merge.fitness.lm_eval_glue import candidate_lm_class

    lm_class = candidate_lm_class()
    extra: list[int] = []  # the answers scored by one more forward, call by call
    plain = lm_class._loglikelihood_tokens
    monkeypatch.setattr(lm_class, "_loglikelihood_tokens",
                        lambda self, requests, *a, **k: extra.append(len(requests)) or plain(self, requests, *a, **k))
    for (label, build), (task, delimiter) in itertools.product(candidates(tiny_pool),
                                                              (("tiny_gen", " "), ("tiny_gen_tight", ""))):
        model = build()
        fit = Fitness({task: 1.0}, suites=[suite], max_length=512, batch_size=2, cache_dir=tmp_path)
        whole = fit.score(model, tiny_pool.tokenizer, docs=(0.0, 1.0))
        generated = {i.doc_id: i.resps[0] for i in fit.tasks[task].instances}
        contexts = {i.doc_id: i.args[0] for i in fit.tasks[task].instances}
        assert "probability" not in whole.per_doc[task], label
        extra.clear()
        staged = fit.score(model, tiny_pool.tokenizer, docs=(0.0, 0.8))
        per_doc, calls = staged.per_doc[task], list(extra)
        n = len(per_doc["items"])
        assert n == len(GEN_ROWS) - 1 and per_doc["items"] == whole.per_doc[task]["items"][:n], label
        assert {i.doc_id: i.resps[0] for i in fit.tasks[task].instances} == {d: generated[d] for d in range(n)}
        reference = candidate_lm_class()(pretrained=model, tokenizer=tiny_pool.tokenizer, backend="causal",
                                         max_length=512, batch_size=1, memo={}, shared_contexts=False,
                                         scored_logits_only=False)
        answers = [reference._encode_pair(contexts[d], delimiter + GEN_ROWS[d]["answer"]) for d in range(n)]
        lls = reference.loglikelihood([SimpleNamespace(args=(contexts[d], delimiter + GEN_ROWS[d]["answer"]))
                                       for d in range(n)])
        assert per_doc["probability"] == pytest.approx([math.exp(ll) for ll, _ in lls], rel=1e-5, abs=1e-7), label
        lengths = {len(answer) for _, answer in answers}
        assert lengths == ({2, 3} if delimiter else {1, 2}), (label, task, lengths)  # the tight task: both ways
        assert calls == [sum(len(answer) > 1 for _, answer in answers)], (label, task, calls)  # one-token: free


def test_the_gold_answer_is_what_lm_eval_compares_a_generation_with():
    """`gold_answer`: the target as text; a choice named by its index where the task has choices; none where a
    document has several right answers (racing then bounds that task by its metric)."""
    from types import SimpleNamespace

    from dfs_merge.fitness.lm_eval_glue import gold_answer

    def task(target, choices=None, multiple=False):
        return SimpleNamespace(doc_to_target=lambda doc: target, doc_to_choice=lambda doc: choices,
                               config=SimpleNamespace(doc_to_choice=choices), multiple_target=multiple)

    assert gold_answer(task("13"), {}) == "13"
    assert gold_answer(task(13), {}) == "13"
    assert gold_answer(task(1, ["ni", "san"]), {}) == "san"
    assert gold_answer(task(["13", "thirteen"]), {}) is None
    assert gold_answer(task("13", multiple=True), {}) is None
