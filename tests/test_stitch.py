"""The stitched model: exact parity, scale semantics, per-hop KV cache, zero-copy weights."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from dfs_merge.errors import GenomeError
from dfs_merge.genome import Hop, Route
from dfs_merge.models.families import family_for
from dfs_merge.models.sources import Source, SourcePool
from dfs_merge.stitch import stitch


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def tiny_gemma3(seed: int) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=4,
    )
    return Gemma3ForCausalLM(cfg).eval().requires_grad_(False)


def tiny_qwen2_sliding(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=2,
    )
    assert "sliding_attention" in cfg.layer_types
    return Qwen2ForCausalLM(cfg).eval().requires_grad_(False)


def pool_of(*models) -> SourcePool:
    return SourcePool([Source(f"m{i}", m, family_for(m.config.model_type)) for i, m in enumerate(models)], None)


@pytest.fixture(scope="module")
def llama_pool() -> SourcePool:
    return pool_of(tiny_llama(0), tiny_llama(1))


@pytest.fixture(scope="module")
def gemma_pool() -> SourcePool:
    return pool_of(tiny_gemma3(0))


@pytest.fixture(scope="module")
def qwen_pool() -> SourcePool:
    return pool_of(tiny_qwen2_sliding(0))


TOKENS = torch.randint(3, 96, (2, 14), generator=torch.Generator().manual_seed(0))


def identity(pool: SourcePool) -> Route:
    return Route(tuple(Hop(0, i) for i in range(pool.layers_per_source[0])))


@pytest.mark.parametrize("pool_name", ["llama_pool", "gemma_pool", "qwen_pool"])
def test_identity_route_reproduces_base_logits_exactly(request, pool_name):
    pool = request.getfixturevalue(pool_name)
    model = stitch(pool, identity(pool))
    assert type(model) is type(pool.base.model)
    diff = (model(TOKENS).logits - pool.base.model(TOKENS).logits).abs().max().item()
    assert diff == 0.0


def test_scale_multiplies_the_stream_entering_the_hop(llama_pool):
    # A scale s on hop 0 equals a base whose embeddings are multiplied by s (its head is untied).
    base = llama_pool.base.model
    assert not base.config.tie_word_embeddings
    scaled = stitch(llama_pool, Route((Hop(0, 0, 0.5), *identity(llama_pool).hops[1:])))
    reference = copy.deepcopy(base)
    reference.model.embed_tokens.weight.mul_(0.5)
    assert torch.equal(scaled(TOKENS).logits, reference(TOKENS).logits)
    assert not torch.equal(scaled(TOKENS).logits, base(TOKENS).logits)


REPEATED = Route.parse("0:0-3, 1:1-3, 0:2-3", [1, 1, 1, 1, 0.8, 1.2, 1, 1, 0.9])


@pytest.mark.parametrize(("pool_name", "route"), [("llama_pool", REPEATED), ("gemma_pool", Route.parse("0:0-5, 0:2-5")), ("qwen_pool", Route.parse("0:0-3, 0:1-3"))],)
def test_repeated_layers_generate_identically_with_and_without_cache(request, pool_name, route):
    pool = request.getfixturevalue(pool_name)
    model = stitch(pool, route)
    mask = torch.ones_like(TOKENS)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with_cache = model.generate(TOKENS, use_cache=True, **kw)
    without = model.generate(TOKENS, use_cache=False, **kw)
    assert torch.equal(with_cache, without)
    out = model(TOKENS, use_cache=True)
    assert len(out.past_key_values.layers) == len(route)  # one cache slot per hop, not per layer


def test_left_padded_batch_generates_like_single_rows(llama_pool):
    model = stitch(llama_pool, REPEATED)
    short, long = TOKENS[0, :9], TOKENS[1]
    batch = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), short]), long])
    mask = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), torch.ones(9, dtype=torch.long)]), torch.ones(14, dtype=torch.long)])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kw)
    alone0 = model.generate(short[None], attention_mask=torch.ones(1, 9, dtype=torch.long), **kw)
    alone1 = model.generate(long[None], attention_mask=torch.ones(1, 14, dtype=torch.long), **kw)
    assert torch.equal(together[0, 14:], alone0[0, 9:])
    assert torch.equal(together[1, 14:], alone1[0, 14:])


def test_weights_are_shared_not_copied(llama_pool):
    route = REPEATED
    model = stitch(llama_pool, route)
    pool_ptrs = {
        p.data_ptr() for src in llama_pool.sources for p in src.model.parameters()
    }
    assert all(p.data_ptr() in pool_ptrs for p in model.parameters())
    for k, hop in enumerate(route):
        stitched = model.model.layers[k].layer.self_attn.q_proj.weight
        assert stitched.data_ptr() == llama_pool.layer(hop.source, hop.layer).self_attn.q_proj.weight.data_ptr()
    assert model.lm_head.weight.data_ptr() == llama_pool.base.model.lm_head.weight.data_ptr()
    # Building a model leaves the pool untouched: the base still has all its layers and its own config.
    assert llama_pool.base.model.config.num_hidden_layers == 4
    assert len(llama_pool.base.model.model.layers) == 4


def test_empty_or_out_of_range_routes_are_refused(llama_pool):
    with pytest.raises(GenomeError, match="route is empty"):
        stitch(llama_pool, Route(()))
    with pytest.raises(GenomeError, match="hop 1 names layer 1:7"):
        stitch(llama_pool, Route((Hop(0, 0), Hop(1, 7))))


def test_prefix_activation_cache_is_bit_identical_and_skips_shared_prefixes(llama_pool):
    from dfs_merge.stitch import ActivationCache

    routes = [
        Route.parse("0:0-3, 0:1-3", [1, 1, 1, 1, 0.8, 1.2, 1]),
        Route.parse("0:0-3, 0:1-2, 1:3", [1, 1, 1, 1, 0.8, 1.2, 1]),  # shares 6 hops with the first
        Route.parse("0:0-3, 0:1-3", [1, 1, 1, 1, 0.8, 1.1, 1]),  # shares 5 (scales are part of the key)
        Route.parse("0:0-3, 0:1-3", [1, 1, 1, 1, 0.8, 1.2, 1]),  # the first again: a full hit
    ]
    cache = ActivationCache(max_mb=64)
    batches = [TOKENS, TOKENS[:, :9]]
    for route in routes:
        plain, cached = stitch(llama_pool, route), stitch(llama_pool, route, activation_cache=cache)
        for ids in batches:
            assert torch.equal(cached(ids).logits, plain(ids).logits)
    stats = cache.stats()
    assert stats["misses"] == 2 and stats["hits"] == 6
    assert stats["hops_skipped"] == 2 * (6 + 5 + 7)
    # generate() with a KV cache bypasses the activation cache and still matches the plain model.
    kw = dict(attention_mask=torch.ones_like(TOKENS), max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = stitch(llama_pool, routes[1], activation_cache=cache)
    assert torch.equal(cached.generate(TOKENS, **kw), stitch(llama_pool, routes[1]).generate(TOKENS, **kw))


def test_activation_cache_respects_its_memory_bound():
    from dfs_merge.stitch import ActivationCache

    cache = ActivationCache(max_mb=1)
    for i in range(10):
        cache.put(("b", str(i)), torch.zeros(64, 1024))  # 256 KB each
    assert cache.used <= 2**20 and cache.stats()["entries"] == 4
    assert ("b", "9") in cache and ("b", "0") not in cache
