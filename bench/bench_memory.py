"""Resident memory of stitched candidates: how much does one more live candidate cost?

Builds a random-weight model of SmolLM2-135M's shape (30 layers, hidden 576), then
keeps 1, 32 and 100 stitched candidates (40-hop routes with repeats and scales)
alive at once and reads the process RSS after each step. Prints a table and writes
bench/results/memory.json.

    .venv/bin/python bench/bench_memory.py
"""

from __future__ import annotations

import gc
import json
import random
from pathlib import Path

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dfs_merge.families import family_for
from dfs_merge.genome import Hop, Route
from dfs_merge.sources import Source, SourcePool
from dfs_merge.stitch import stitch

SMOLLM2_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
)


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def random_route(rng: random.Random, layers: int = 30, hops: int = 40) -> Route:
    picks = sorted(rng.sample(range(2 * layers), hops))
    return Route(tuple(Hop(0, p % layers, rng.uniform(0.8, 1.2)) for p in picks))


def main() -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).eval().requires_grad_(False)
    pool = SourcePool([Source("random-smollm2-shape", model, family_for("llama"))], None)
    rng = random.Random(0)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    before = rss_mb()
    alive = []
    table = {}
    for n in (1, 32, 100):
        while len(alive) < n:
            alive.append(stitch(pool, random_route(rng)))
        table[n] = rss_mb()
    one = table[1]
    result = {
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
    out = Path(__file__).parent / "results" / "memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
