"""Each shared context run once: the requests of a multiple-choice item share its question, which the candidate runs
once with a KV cache before scoring every choice over that cache; each score stays what the whole request gives
(float rounding), for a route, a route through the prefix cache, a route with repeated layers, a parameter-space
merge and sliding-window models, while rolling perplexity and an answer task run as before."""

from __future__ import annotations

import contextlib
from collections import defaultdict

import pytest
import torch
from builders import GEN_ROWS, build_tokenizer, write_answer_task, write_tiny_suite
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

from dfs_merge.fitness.lm_eval_glue import candidate_lm_class, context_batches, shared_context_groups
from dfs_merge.fitness.score import Fitness
from dfs_merge.genome import Route
from dfs_merge.merging.blend import Blender
from dfs_merge.merging.recipe import initial_recipe
from dfs_merge.models.families import family_for
from dfs_merge.models.sources import Source, SourcePool
from dfs_merge.stitch import ActivationCache, stitch

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = ("tiny_mc", "tiny_ppl", "tiny_ll")
WAYS = {  # how the requests are run: each shared context once (the default), or every request whole
    "shared": {},
    "whole": {"shared_contexts": False},
    "reference": {"shared_contexts": False, "scored_logits_only": False},  # lm-eval's own computation
}


@pytest.fixture(scope="module")
def fitnesses(tmp_path_factory) -> dict[tuple[str, str], Fitness]:
    """One `Fitness` per (way, task): one task each, to count each task's positions."""
    folder = write_answer_task(write_tiny_suite(tmp_path_factory.mktemp("suite")), GEN_ROWS)
    cache = tmp_path_factory.mktemp("cache")
    return {(way, task): Fitness({task: 1.0}, suites=[folder], max_length=512, batch_size=3, cache_dir=cache, **kw)
            for way, kw in WAYS.items() for task in TASKS}


@contextlib.contextmanager
def positions_run(model):
    """Count the token positions the model embeds (every position any layer then runs), call by call."""
    seen: list[int] = []
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].numel()))
    try:
        yield seen
    finally:
        handle.remove()


def scored(fit: Fitness, model, tokenizer) -> tuple[float, dict[int, list], int]:
    """The task's value, its responses by document, and the token positions the model ran."""
    with positions_run(model) as seen:
        ev = fit.score(model, tokenizer)
    assert ev.ok, ev.error
    (name,) = fit.tasks
    by_doc = defaultdict(list)
    for inst in sorted(fit.tasks[name].instances, key=lambda i: (i.doc_id, i.idx)):
        by_doc[inst.doc_id].append(inst.resps[0])
    return ev.tasks[name].value, dict(by_doc), sum(seen)


def candidates(pool):
    route = Route.parse("0:0-2, 1:1-3")
    yield "route", lambda: stitch(pool, route)
    cache = ActivationCache(max_mb=16)
    yield "route through the prefix cache", lambda: stitch(pool, route, activation_cache=cache)
    yield "route with repeated layers", lambda: stitch(pool, Route.parse("0:0-2, 0:1-3, 1:2-3"))
    recipe = initial_recipe(pool.paths, len(pool.base.layers), "task_arithmetic", 0, 2, 0.7)
    yield "parameter-space merge", lambda: Blender(pool).apply(recipe)


def assert_same_answers(got: dict[int, list], want: dict[int, list], label: str) -> None:
    assert got.keys() == want.keys(), label
    for doc, answers in want.items():
        for (ll, greedy), (ll_want, greedy_want) in zip(got[doc], answers, strict=True):
            assert abs(ll - ll_want) <= 1e-5 and greedy == greedy_want, (label, doc, ll, ll_want)


def test_multiple_choice_runs_each_question_once_and_scores_as_the_whole_requests(tiny_pool, fitnesses):
    tok = tiny_pool.tokenizer
    for label, build in candidates(tiny_pool):
        # shared last: a prefix cache holds the other two's hidden states by then, which a cached run must not use
        got = {way: scored(fitnesses[way, "tiny_mc"], build(), tok) for way in ("reference", "whole", "shared")}
        (value, answers, n), (ref_value, ref_answers, ref_n) = got["shared"], got["reference"]
        assert value == ref_value, label  # acc: the same choices win
        assert_same_answers(answers, ref_answers, label)
        assert n < got["whole"][2] <= ref_n, (label, n, got["whole"][2], ref_n)


def test_a_run_over_a_kv_cache_neither_uses_nor_fills_the_prefix_cache(tiny_pool, fitnesses):
    cache = ActivationCache(max_mb=16)
    route = Route.parse("0:0-2, 1:1-3")
    scored(fitnesses["whole", "tiny_mc"], stitch(tiny_pool, route, activation_cache=cache), tiny_pool.tokenizer)
    before = cache.stats()
    assert before["entries"] > 0
    scored(fitnesses["shared", "tiny_mc"], stitch(tiny_pool, route, activation_cache=cache), tiny_pool.tokenizer)
    assert cache.stats() == before  # no hit, no miss, no entry


def test_rolling_perplexity_and_the_answer_task_run_as_before(tiny_pool, fitnesses):
    tok = tiny_pool.tokenizer
    for label, build in candidates(tiny_pool):
        for task in ("tiny_ppl", "tiny_ll"):
            shared, whole = (scored(fitnesses[way, task], build(), tok) for way in ("shared", "whole"))
            assert shared == whole, (label, task)  # the same forwards: equal to the last bit, equal positions


def test_positions_run_for_the_tiny_multiple_choice_task(tiny_pool, fitnesses):
    """The reduction on the tiny suite's multiple-choice task, 6 questions of 10-18 tokens with 4 choices of 2-5: 157
    positions instead of 393 (each question once, then 4 rows of its choices' tokens but the last)."""
    model = stitch(tiny_pool, Route.parse("0:0-2, 1:1-3"))
    n = {way: scored(fitnesses[way, "tiny_mc"], model, tiny_pool.tokenizer)[2] for way in WAYS}
    print(f"token positions for tiny_mc: {n}")
    assert n["shared"] < 0.6 * n["whole"]


def no_kv_cache(model, in_signature: bool):
    """`model` with a forward that keeps no KV cache: without the cache's arguments (`in_signature=False`), or taking
    them and returning none."""
    forward = model.forward

    if in_signature:
        def without_cache(input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, logits_to_keep=0):
            assert past_key_values is None
            return forward(input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=logits_to_keep)
    else:
        def without_cache(input_ids=None, attention_mask=None, logits_to_keep=0):
            return forward(input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=logits_to_keep)
    model.forward = without_cache
    return model


@pytest.mark.parametrize("in_signature", [False, True])
def test_a_model_without_a_kv_cache_runs_every_request_whole(tiny_pool, fitnesses, in_signature):
    tok = tiny_pool.tokenizer
    route = Route.parse("0:0-2, 1:1-3")
    shared = scored(fitnesses["shared", "tiny_mc"], no_kv_cache(stitch(tiny_pool, route), in_signature), tok)
    whole = scored(fitnesses["whole", "tiny_mc"], stitch(tiny_pool, route), tok)
    assert shared[0] == whole[0]
    # without the arguments nothing is tried; with them, the first batch's questions ran before no cache came back
    assert shared[2] > whole[2] if in_signature else shared[2] == whole[2]
    assert_same_answers(shared[1], whole[1], "no KV cache")


def test_requests_are_grouped_by_their_whole_context_and_batched_longest_first():
    requests = [(("q", " a"), [5, 6, 7], [8]), (("q", " b"), [5, 6, 7], [9, 10]),  # one question, two choices
                (("r", " a"), [5, 6], [8]),  # a context alone
                (("s", " a"), [4, 6, 7], [8]), (("s", " b"), [4, 6, 7], [3, 3, 3]),  # the last is truncated
                (("t", " a"), [1], [2]), (("t", " b"), [1], [3])]
    groups, rest = shared_context_groups(requests, max_length=4)
    assert groups == [[0, 1], [5, 6]] and rest == [2, 3, 4]
    groups, rest = shared_context_groups(requests, max_length=8)
    assert groups == [[0, 1], [3, 4], [5, 6]] and rest == [2]
    assert context_batches(requests, groups, limit=4) == [[[0, 1], [3, 4]], [[5, 6]]]  # same length, 4 requests
    assert context_batches(requests, groups, limit=3) == [[[0, 1]], [[3, 4]], [[5, 6]]]
    assert context_batches(requests, [[0, 1, 0, 1, 0]], limit=2) == [[[0, 1, 0, 1, 0]]]  # a larger group alone
    # contexts of different lengths together (right-padded): up to `limit` contexts and 4 x `limit` requests
    assert context_batches(requests, groups, limit=3, mixed_lengths=True) == [[[0, 1], [3, 4], [5, 6]]]
    assert context_batches(requests, groups, limit=2, mixed_lengths=True) == [[[0, 1], [3, 4]], [[5, 6]]]
    assert context_batches(requests, [[0] * 5, [1] * 4], limit=2, mixed_lengths=True) == [[[0] * 5], [[1] * 4]]


# ---- sliding-window attention, contexts longer than the window, at the level of lm-eval's token requests


def tiny_gemma3() -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                           sliding_window=4)
    return Gemma3ForCausalLM(cfg).eval().requires_grad_(False)


def tiny_qwen2_sliding() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    return Qwen2ForCausalLM(cfg).eval().requires_grad_(False)


def token_requests() -> list:
    """Questions of 9, 9 and 6 tokens with 2-4 choices of 1-4 tokens, a lone question, and one lm-eval truncates."""
    gen = torch.Generator().manual_seed(0)

    def toks(n: int) -> list[int]:
        return torch.randint(3, 96, (n,), generator=gen).tolist()

    requests = []
    for q, (length, choices) in enumerate([(9, [1, 3, 2, 4]), (9, [2, 1]), (6, [4, 4, 1])]):
        question = toks(length)
        requests += [((f"q{q}", f"c{c}"), question, toks(n)) for c, n in enumerate(choices)]
    requests.append((("alone", "c"), toks(7), toks(3)))
    long_question = toks(14)
    requests += [(("long", f"c{c}"), long_question, toks(n)) for c, n in enumerate([2, 4])]  # 14 + 4 > 16 + 1
    return requests


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_sliding_window_models_score_shared_contexts_as_whole_requests(family):
    model = tiny_gemma3() if family == "gemma3" else tiny_qwen2_sliding()
    pool = SourcePool([Source("m", model, family_for(model.config.model_type))], None)
    route = Route.parse("0:0-5, 0:2-5") if family == "gemma3" else Route.parse("0:0-3, 0:1-3")
    requests = token_requests()
    tokenizer = build_tokenizer()
    out, positions = {}, {}
    for way, kw in WAYS.items():
        model = stitch(pool, route)
        lm = candidate_lm_class()(pretrained=model, tokenizer=tokenizer, backend="causal", max_length=16,
                                  batch_size=4, memo={}, **kw)
        with positions_run(model) as seen:
            out[way] = lm._loglikelihood_tokens(requests)
        positions[way] = sum(seen)
    assert positions["shared"] < positions["whole"], positions
    for batch_size in (1, 8):  # each question alone; the two of 9 tokens in one batch
        lm = candidate_lm_class()(pretrained=stitch(pool, route), tokenizer=tokenizer, backend="causal", max_length=16,
                                  batch_size=batch_size, memo={})
        out[batch_size] = lm._loglikelihood_tokens(requests)
    for way in ("shared", 1, 8):
        assert len(out[way]) == len(requests)
        for i, ((ll, greedy), (ll_want, greedy_want)) in enumerate(zip(out[way], out["reference"], strict=True)):
            assert abs(ll - ll_want) <= 1e-5 and greedy == greedy_want, (family, way, i, ll, ll_want)


def test_only_models_without_a_sliding_window_share_a_batch_between_question_lengths():
    from transformers import LlamaConfig, MistralConfig

    from dfs_merge.fitness.lm_eval_glue import same_attention_everywhere

    assert same_attention_everywhere(LlamaConfig())
    assert same_attention_everywhere(Qwen2Config(use_sliding_window=False, sliding_window=4096))
    assert not same_attention_everywhere(tiny_qwen2_sliding().config)
    assert not same_attention_everywhere(tiny_gemma3().config)
    assert not same_attention_everywhere(MistralConfig(sliding_window=4096))
    assert same_attention_everywhere(MistralConfig(sliding_window=None))
