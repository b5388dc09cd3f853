"""The pruning and deepening heuristics: their statistics and the routes they choose."""

from __future__ import annotations

import torch

from dfs_merge.apps.baselines import (
    LayerStats,
    angular_block_route,
    baseline_routes,
    layer_stats,
    naive_deepening_route,
    shortgpt_route,
)


def test_shortgpt_drops_the_lowest_block_influence():
    stats = LayerStats([0.5, 0.1, 0.3, 0.05, 0.9], [])
    assert shortgpt_route(stats, 2).text() == "0:0, 0:2, 0:4"


def test_angular_pruning_drops_the_closest_contiguous_block():
    # The stream barely turns between boundaries 2 and 4, so layers 2-3 are the block to remove.
    angles = [0.0, 1.0, 2.0, 2.05, 2.1, 3.0]
    boundary = [torch.tensor([[torch.cos(torch.tensor(a)), torch.sin(torch.tensor(a))]]) for a in angles]
    route, start = angular_block_route(LayerStats([0.0] * 5, boundary), 2)
    assert start == 2 and route.text() == "0:0-1, 0:4"


def test_naive_deepening_is_two_overlapping_thirds():
    assert naive_deepening_route(30).text() == "0:0-19, 0:10-29"


def test_layer_stats_match_a_direct_computation(tiny_pool):
    texts = ["Alice was beginning to get very tired of sitting by her sister on the bank."]
    stats = layer_stats(tiny_pool, texts)
    ids = tiny_pool.tokenizer(texts[0], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        hidden = tiny_pool.base.model(ids, output_hidden_states=True).hidden_states
    # hidden_states[i] enters layer i; the first layer's block influence from them directly:
    cos = torch.nn.functional.cosine_similarity(hidden[0][0], hidden[1][0], dim=-1)
    assert abs(stats.block_influence[0] - (1 - cos.mean().item())) < 1e-5
    routes = baseline_routes(tiny_pool, texts, sizes=(1,))
    assert set(routes) == {"base", "shortgpt -1", next(k for k in routes if k.startswith("angular -1")), "naive deepening"}
    assert len(routes["shortgpt -1"]) == 3
