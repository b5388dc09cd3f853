"""A causal LM that runs a `Route` over the pool's layers without copying a weight.

The stitched model is an instance of the base's own Hugging Face class (e.g.
`LlamaForCausalLM`) whose decoder-layer list holds one `HopLayer` per hop. Each
`HopLayer` references a pool layer, multiplies the residual stream entering it by
the hop's scale, and gives the layer its own KV-cache slot. Embeddings, rotary
tables, final norm and LM head are the base's modules themselves. Masks, cache
handling, `generate` and everything lm-eval's `HFLM` needs come from transformers.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from dfs_merge.errors import GenomeError
from dfs_merge.genome import Route
from dfs_merge.sources import SourcePool

_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")


class HopCache:
    """A view of the model's KV cache that files one layer's keys and values under its hop index.

    The same pool layer can sit at several hops; its attention module always asks the
    cache for slot `layer_idx` (its index in its own model), so each hop redirects that.
    """

    def __init__(self, cache: Any, hop: int):
        self._cache = cache
        self._hop = hop

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        return self._cache.update(key_states, value_states, self._hop, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


class HopLayer(nn.Module):
    """One hop of a route: scale the residual stream, then run a shared pool layer in this hop's cache slot."""

    def __init__(self, layer: nn.Module, hop: int, scale: float, attention_type: str):
        super().__init__()
        self.layer = layer
        self.hop = hop
        self.scale = float(scale)
        self.attention_type = attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        for name in _CACHE_KWARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = HopCache(kwargs[name], self.hop)
        return self.layer(hidden_states, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"hop={self.hop}, scale={self.scale:g}"


def stitch(pool: SourcePool, route: Route) -> PreTrainedModel:
    """Build the causal LM for `route` over `pool`: O(hops) small objects, no parameter copied."""
    if len(route) == 0:
        raise GenomeError("route is empty: a model needs at least one hop")
    for k, h in enumerate(route):
        if not 0 <= h.source < len(pool.sources) or not 0 <= h.layer < pool.layers_per_source[h.source]:
            raise GenomeError(f"hop {k} names layer {h.source}:{h.layer}, which the sources do not have")
    base = pool.base.model
    family = pool.family

    config = copy.deepcopy(base.config)
    if hasattr(config, "layer_types"):
        config.layer_types = []
    config.num_hidden_layers = 0
    with torch.device("meta"):
        shell = type(base)(config)  # an empty shell of the base's class: no layers, meta tensors only

    _adopt_children(shell, base, keep=family.layers_attr.split(".")[0])
    inner, base_inner = family.inner_model(shell), family.inner_model(base)
    layers_name = family.layers_attr.split(".")[-1]
    _adopt_children(inner, base_inner, keep=layers_name)
    hops = [HopLayer(pool.layer(h.source, h.layer), k, h.scale, pool.layer_type(h.source, h.layer)) for k, h in enumerate(route)]
    setattr(inner, layers_name, nn.ModuleList(hops))

    config.num_hidden_layers = len(route)
    if hasattr(config, "layer_types"):
        config.layer_types = [hop.attention_type for hop in hops]
    shell.generation_config = copy.deepcopy(base.generation_config)
    shell.route = route
    shell.eval()
    leftover = [n for n, t in [*shell.named_parameters(), *shell.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"stitched model kept unset tensors: {leftover[:3]} (family {family.name})")
    return shell


def _adopt_children(shell: nn.Module, donor: nn.Module, keep: str) -> None:
    """Point every child module of `shell` except `keep` at the donor's own module."""
    for name, child in donor.named_children():
        if name != keep:
            setattr(shell, name, child)
