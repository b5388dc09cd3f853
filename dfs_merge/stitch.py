"""A causal LM that runs a `Route` over the pool's layers without copying a weight.

The stitched model is an instance of the base's own Hugging Face class (e.g.
`LlamaForCausalLM`) whose decoder-layer list holds one `HopLayer` per hop. Each
`HopLayer` references a pool layer, multiplies the residual stream entering it by
the hop's scale, and gives the layer its own KV-cache slot. The embeddings are the
modules of the route's `embed_source`, the final norm and LM head those of its
`head_source` (both the base's unless the genome says otherwise, as a mergekit
passthrough takes them from its first and last slice's model); rotary tables and
config are the base's. Masks, cache handling, `generate` and everything lm-eval's
`HFLM` needs come from transformers.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from dfs_merge.errors import GenomeError
from dfs_merge.models.sources import SourcePool, ties_embeddings
from dfs_merge.route import Route

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


class ActivationCache:
    """A memory-bounded LRU of hidden states after route prefixes, shared by the candidates of a process.

    Key: (evaluation batch, route prefix with its scales). Candidates whose routes share
    a prefix compute only their suffix. Used for full-sequence forwards without a KV
    cache (loglikelihood and perplexity scoring); `generate` bypasses it. The suffix is
    computed by the same operations on the same inputs, so results are bit-identical.
    """

    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2**20)
        self.used = 0
        self.hits = 0
        self.misses = 0
        self.hops_skipped = 0
        self._store: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        value = self._store.get(key)
        if value is not None:
            self._store.move_to_end(key)
        return value

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._store

    def put(self, key: tuple[str, str], value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self._store:
            return
        self._store[key] = value
        self.used += size
        while self.used > self.max_bytes:
            _, old = self._store.popitem(last=False)
            self.used -= old.numel() * old.element_size()

    def stats(self) -> dict[str, float]:
        """Hit counts and memory in use, for logs and benchmarks."""
        total = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / total if total else 0.0,
            "hops_skipped": self.hops_skipped,
            "entries": len(self._store),
            "mb": self.used / 2**20,
        }


class _PrefixRun:
    """Per-model state of one cached forward: which batch it is and from which hop computing resumes."""

    def __init__(self, cache: ActivationCache, prefix_keys: list[str]):
        self.cache = cache
        self.prefix_keys = prefix_keys
        self.batch: str | None = None
        self.resume_at = -1

    def start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            self.batch = None
            return
        mask = kwargs.get("attention_mask")
        digest = hashlib.sha1(ids.detach().cpu().numpy().tobytes())
        digest.update(str(tuple(ids.shape)).encode())
        if mask is not None:
            digest.update(mask.detach().cpu().numpy().tobytes())
        self.batch = digest.hexdigest()
        self.resume_at = next(
            (k for k in range(len(self.prefix_keys) - 1, -1, -1) if (self.batch, self.prefix_keys[k]) in self.cache),
            -1,
        )
        if self.resume_at >= 0:
            self.cache.hits += 1
            self.cache.hops_skipped += self.resume_at + 1
        else:
            self.cache.misses += 1

    def stop(self, *_: Any) -> None:
        self.batch = None


class HopLayer(nn.Module):
    """One hop of a route: scale the residual stream, then run a shared pool layer in this hop's cache slot."""

    def __init__(self, layer: nn.Module, hop: int, scale: float, attention_type: str, prefix: _PrefixRun | None = None):
        super().__init__()
        self.layer = layer
        self.hop = hop
        self.scale = float(scale)
        self.attention_type = attention_type
        self._prefix = prefix

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        run = self._prefix
        if run is not None and run.batch is not None:
            if self.hop < run.resume_at:
                return hidden_states  # a later hop's cached output replaces everything up to it
            key = (run.batch, run.prefix_keys[self.hop])
            if self.hop == run.resume_at:
                return run.cache.get(key)
            out = self._run(hidden_states, args, kwargs)
            run.cache.put(key, out)
            return out
        return self._run(hidden_states, args, kwargs)

    def _run(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        for name in _CACHE_KWARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = HopCache(kwargs[name], self.hop)
        return self.layer(hidden_states, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"hop={self.hop}, scale={self.scale:g}"


def stitch(pool: SourcePool, route: Route, activation_cache: ActivationCache | None = None) -> PreTrainedModel:
    """Build the causal LM for `route` over `pool`: O(hops) small objects, no parameter copied.

    With an `activation_cache`, full-sequence forwards reuse hidden states of route
    prefixes that other candidates of this process already computed on the same batch.
    """
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
    _adopt_ends(shell, pool, route)
    prefix = _PrefixRun(activation_cache, prefix_keys(route)) if activation_cache is not None else None
    hops = [
        HopLayer(pool.layer(h.source, h.layer), k, h.scale, pool.layer_type(h.source, h.layer), prefix)
        for k, h in enumerate(route)
    ]
    setattr(inner, layers_name, nn.ModuleList(hops))
    if prefix is not None:
        inner.register_forward_pre_hook(prefix.start, with_kwargs=True)
        inner.register_forward_hook(prefix.stop)

    config.num_hidden_layers = len(route)
    config.use_cache = False  # scoring forwards need no KV cache; generate() still asks for one
    if hasattr(config, "layer_types"):
        config.layer_types = [hop.attention_type for hop in hops]
        if hasattr(inner, "has_sliding_layers"):  # Qwen2 and kin decide at init whether to build sliding masks
            inner.has_sliding_layers = "sliding_attention" in config.layer_types
    shell.generation_config = copy.deepcopy(base.generation_config)
    shell.route = route
    shell.eval()
    leftover = [n for n, t in [*shell.named_parameters(), *shell.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"stitched model kept unset tensors: {leftover[:3]} (family {family.name})")
    return shell


def prefix_keys(route: Route) -> list[str]:
    """Key of each route prefix (hops 0..k with their scales, after the embeddings of `embed_source`): equal
    prefixes give equal keys."""
    keys, digest = [], hashlib.sha1()
    if route.embed_source:
        digest.update(f"embed {route.embed_source};".encode())
    for h in route:
        digest.update(f"{h.source}:{h.layer}@{h.scale!r};".encode())
        keys.append(digest.copy().hexdigest())
    return keys


def _adopt_ends(shell: nn.Module, pool: SourcePool, route: Route) -> None:
    """Point the shell's embeddings at `route.embed_source`'s modules, its final norm and LM head at
    `route.head_source`'s (the family's non-layer weights: those named `embed` are the embeddings); each must have
    the base's vocabulary."""
    embed, head = route.embed_source, route.head_source
    if not embed and not head:
        return
    for what, i in (("embed_source", embed), ("head_source", head)):
        if not 0 <= i < len(pool.sources):
            raise GenomeError(f"{what} {i} names no source (there are {len(pool.sources)})")
    pool.vocab.check_settings({"embed_source": embed, "head_source": head})
    if embed != head and any(ties_embeddings(pool.sources[i].config) for i in (embed, head)):
        raise GenomeError(
            f"embed_source {embed} and head_source {head} differ, but the sources tie the LM head to the "
            "embeddings (tie_word_embeddings): a tied model's head is its embeddings' source's"
        )
    for name in pool.family.non_layer_weights:
        path = name.rsplit(".", 1)[0]
        donor = pool.sources[embed if "embed" in path else head].model
        parent, _, attr = path.rpartition(".")
        setattr(shell.get_submodule(parent), attr, donor.get_submodule(path))


def _adopt_children(shell: nn.Module, donor: nn.Module, keep: str) -> None:
    """Point every child module of `shell` except `keep` at the donor's own module."""
    for name, child in donor.named_children():
        if name != keep:
            setattr(shell, name, child)
