"""Resident memory of stitched candidates: how much does one more live candidate cost?

Builds a random-weight model of SmolLM2-135M's shape (30 layers, hidden 576), then
keeps 1, 32 and 100 stitched candidates (40-hop routes with repeats and scales)
alive at once and reads the process RSS after each step. Prints a table and writes
bench/results/memory.json.

    .venv/bin/python bench/bench_memory.py
"""

from __future__ import annotations

import gc
import random

import psutil
import torch
from bench_common import RESULTS, machine, write_result
from transformers import LlamaConfig, LlamaForCausalLM

from dfs_merge.genome import Hop, Route
from dfs_merge.models.families import family_for
from dfs_merge.models.sources import Source, SourcePool
from dfs_merge.stitch import stitch

SMOLLM2_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
)


def rss_mb() -> float:
    """This process's resident memory in MB, after a garbage collection."""
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def random_route(rng: random.Random, layers: int = 30, hops: int = 40) -> Route:
    """`hops` hops over two repetitions of source 0's layers (at most 2 x layers), random scales."""
    picks = sorted(rng.sample(range(2 * layers), min(hops, 2 * layers)))
    return Route(tuple(Hop(0, p % layers, rng.uniform(0.8, 1.2)) for p in picks))


def live_candidates_rss(pool: SourcePool, counts: tuple[int, ...] = (1, 32, 100), hops: int = 40,
                        seed: int = 0) -> dict[int, float]:
    """Process RSS (MB) with n stitched candidates (random routes, repeats and scales) alive, for each n."""
    rng = random.Random(seed)
    alive: list = []
    table = {}
    for n in counts:
        while len(alive) < n:
            alive.append(stitch(pool, random_route(rng, pool.layers_per_source[0], hops)))
        table[n] = rss_mb()
    return table


def main() -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).eval().requires_grad_(False)
    pool = SourcePool([Source("random-smollm2-shape", model, family_for("llama"))], None)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    before = rss_mb()
    table = live_candidates_rss(pool)
    one = table[1]
    result = {
        "machine": machine(),
        "model": "random weights, SmolLM2-135M shape (30 layers, hidden 576)",
        "weights_mb": round(weights_mb, 1),
        "rss_before_mb": round(before, 1),
        "rss_mb": {str(n): round(v, 1) for n, v in table.items()},
        "mb_per_extra_candidate": round((table[100] - one) / 99, 4),
        "ratio_32_vs_1": round(table[32] / one, 4),
    }
    print(f"weights {weights_mb:.0f} MB; RSS before any candidate {before:.0f} MB")
    print(f"{'live candidates':>16}  {'RSS MB':>8}")
    for n, v in table.items():
        print(f"{n:>16}  {v:>8.1f}")
    print(f"per extra candidate: {result['mb_per_extra_candidate'] * 1024:.1f} KB; 32 vs 1: {result['ratio_32_vs_1']:.4f}x")
    write_result(RESULTS / "memory.json", result)
    return result


if __name__ == "__main__":
    main()
