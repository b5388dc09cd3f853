"""The published layer-pruning and deepening heuristics, as routes, to compare evolution against.

- ShortGPT (Men et al., 2024): drop the n layers with the lowest Block Influence,
  BI_l = 1 - mean cos(input of layer l, output of layer l) over calibration tokens.
- Angular-distance block pruning (Gromov et al., 2024): drop the contiguous block of
  n layers whose input and output are closest in angular distance,
  d = arccos(cos(x_l, x_{l+n})) / pi, measured at the last token of each text.
- Naive deepening: the first two thirds of the layers, then the last two thirds
  (for 30 layers: 0-19 + 10-29), scales 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dfs_merge.errors import ConfigError, FitnessError
from dfs_merge.inputs import read_lines
from dfs_merge.models.sources import SourcePool
from dfs_merge.route import Hop, Route


@dataclass
class LayerStats:
    """Per-layer similarity statistics of the base on calibration text."""

    block_influence: list[float]  # one per layer
    boundary_last_token: list[torch.Tensor]  # hidden state entering each layer (and after the last), last tokens


@torch.inference_mode()
def layer_stats(pool: SourcePool, texts: Sequence[str], max_length: int = 512) -> LayerStats:
    """Run the base over calibration texts and record what each of its layers does to the stream."""
    layers = pool.base.layers
    n = len(layers)
    cos_sum = [0.0] * n
    tokens = 0
    last: list[list[torch.Tensor]] = [[] for _ in range(n + 1)]
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index: int):
        def fn(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            captured[index] = (x, y)

        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for text in texts:
            ids = pool.tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            captured.clear()
            pool.base.model(ids.to(pool.device))
            for i in range(n):
                x, y = (t[0].float() for t in captured[i])
                cos_sum[i] += torch.nn.functional.cosine_similarity(x, y, dim=-1).sum().item()
                last[i].append(x[-1])
            last[n].append(captured[n - 1][1][0, -1].float())
            tokens += ids.shape[1]
    finally:
        for h in handles:
            h.remove()
    bi = [1.0 - c / tokens for c in cos_sum]
    return LayerStats(bi, [torch.stack(v) for v in last])


def shortgpt_route(stats: LayerStats, n: int) -> Route:
    """Base route without the n layers of lowest Block Influence."""
    order = sorted(range(len(stats.block_influence)), key=lambda i: stats.block_influence[i])
    drop = set(order[:n])
    return Route(tuple(Hop(0, i) for i in range(len(stats.block_influence)) if i not in drop))


def angular_distance(stats: LayerStats, start: int, n: int) -> float:
    """Mean angular distance (in units of pi) between the stream entering layer `start` and `start + n`."""
    a, b = stats.boundary_last_token[start], stats.boundary_last_token[start + n]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
    return float(torch.arccos(cos).mean() / math.pi)


def angular_block_route(stats: LayerStats, n: int) -> tuple[Route, int]:
    """Base route without the contiguous block of n layers of smallest angular distance; also its start."""
    layers = len(stats.block_influence)
    start = min(range(layers - n + 1), key=lambda s: angular_distance(stats, s, n))
    return Route(tuple(Hop(0, i) for i in range(layers) if not start <= i < start + n)), start


def naive_deepening_route(layers: int) -> Route:
    """Layers 0 .. 2L/3-1 then L/3 .. L-1 of the base, scales 1 (0-19 + 10-29 for 30 layers)."""
    first_end, second_start = round(2 * layers / 3), round(layers / 3)
    return Route(tuple(Hop(0, i) for i in [*range(first_end), *range(second_start, layers)]))


def calibration_texts(path: str | Path, n: int = 16, field: str = "text") -> list[str]:
    """The first `n` texts of a JSONL file (default: the bundled prose dev split, never a test split)."""
    texts: list[str] = []
    for number, line in read_lines(path, FitnessError):  # read only as far as the first n texts
        if len(texts) >= n:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise FitnessError(f"{path}: line {number} is not valid JSON") from None
        if isinstance(row, dict) and field in row:
            texts.append(str(row[field]))
    if not texts:
        raise FitnessError(f"{path}: no rows with a {field!r} field to calibrate on")
    return texts


def check_sizes(sizes: Sequence[int], layers: int) -> None:
    """Refuse pruning sizes that would leave the base no layer (ConfigError naming the size)."""
    too_big = [n for n in sizes if not 1 <= n < layers]
    if too_big:
        raise ConfigError(f"--sizes: cannot remove {too_big[0]} of the base's {layers} layers "
                          f"(each size must be between 1 and {layers - 1})")


def baseline_routes(pool: SourcePool, texts: Sequence[str], sizes: Sequence[int] = (2, 4, 6, 8)) -> dict[str, Route]:
    """Every heuristic of this module as named routes over the base: ShortGPT and angular pruning per n, deepening."""
    check_sizes(sizes, pool.layers_per_source[0])
    stats = layer_stats(pool, texts)
    routes: dict[str, Route] = {"base": Route(tuple(Hop(0, i) for i in range(len(stats.block_influence))))}
    for n in sizes:
        routes[f"shortgpt -{n}"] = shortgpt_route(stats, n)
        route, start = angular_block_route(stats, n)
        routes[f"angular -{n} ({start}-{start + n - 1})"] = route
    routes["naive deepening"] = naive_deepening_route(len(stats.block_influence))
    return routes
