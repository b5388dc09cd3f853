"""The tensors of an exported checkpoint: which ones, in which shard, with which scale folded in, and their bytes.

`plan_tensors` lists every output tensor in Hugging Face order (where it comes from,
its dtype and shape) without copying anything; `shards` groups them by size;
`FoldedLayers` hands out one hop's layer state at a time with the running product of
hop scales folded in by the family; `save_shard` streams one safetensors file from
those tensors, one tensor at a time, so an export never holds its output in memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfs_merge.errors import ExportError
from dfs_merge.genome import Route
from dfs_merge.models.families import Family
from dfs_merge.models.sources import SourcePool

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- planning


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or `2GB` / `500MB` / `64KiB` (powers of 1000, or of 1024 with `i`)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", size.upper())
    if not m or float(m.group(1)) <= 0:
        raise ExportError(f"max_shard_size: cannot read {size!r}; expected e.g. 2GB, 500MB or 64KiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


@dataclass(frozen=True)
class Entry:
    """One output tensor: where it comes from and how big it is."""

    name: str
    hop: int | None  # index into the route, None for the base's non-layer tensors
    key: str  # key in the hop's layer state dict, or in the base's state dict
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def plan_tensors(pool: SourcePool, route: Route) -> list[Entry]:
    """Every tensor of the output in HF order: embeddings, the hops' layers, final norm, head.

    A non-layer tensor that shares storage with an earlier one (the LM head of a base with
    tied embeddings) is left out, as `save_pretrained` does.
    """
    family, base = pool.family, pool.base.model
    prefix = family.layers_attr + "."
    base_state = base.state_dict()
    seen: dict[int, str] = {}
    pre: list[Entry] = []
    post: list[Entry] = []
    in_layers = False
    for key, t in base_state.items():
        if key.startswith(prefix):
            in_layers = True
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr in seen and _ties_embeddings(base.config):
            log.debug("%s is tied to %s: not written", key, seen[ptr])
            continue
        seen.setdefault(ptr, key)
        (post if in_layers else pre).append(Entry(key, None, key, t.dtype, tuple(t.shape)))
    hops = []
    for k, h in enumerate(route):
        for key, t in pool.layer(h.source, h.layer).state_dict().items():
            hops.append(Entry(f"{prefix}{k}.{key}", k, key, t.dtype, tuple(t.shape)))
    return pre + hops + post


def _ties_embeddings(config: Any) -> bool:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def shards(entries: list[Entry], limit: int) -> list[list[Entry]]:
    """Consecutive groups of at most `limit` bytes (a larger tensor gets a shard of its own)."""
    out: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if out[-1] and size + e.nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(e)
        size += e.nbytes
    return out


# --------------------------------------------------------------------------- scale folding


def running_products(route: Route) -> list[float]:
    """The running product of hop scales up to and including each hop: the factor each hop's weights fold in."""
    out, p = [], 1.0
    for h in route:
        p *= h.scale
        out.append(p)
    return out


class FoldedLayers:
    """The hops' layer states with their running scale products (`products`, one per hop) folded in.

    Only the last hop asked for is kept, so an export copies one layer at a time.
    """

    def __init__(self, pool: SourcePool, route: Route, products: Sequence[float]):
        self.pool, self.route = pool, route
        self.products = list(products)
        self._hop: int | None = None
        self._state: dict[str, torch.Tensor] = {}

    def get(self, hop: int) -> dict[str, torch.Tensor]:
        """Hop `hop`'s layer state, folded (the pool's own tensors when its product is 1)."""
        if hop != self._hop:
            h = self.route[hop]
            state = dict(self.pool.layer(h.source, h.layer).state_dict())
            factor = self.products[hop]
            if factor != 1.0:
                state = fold(self.pool.sources[h.source].family, state, factor)
            self._hop, self._state = hop, state
        return self._state


def fold(family: Family, state: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """`family.fold_scale` applied to a float32 (at least) copy of one layer's `state`, cast back.

    The copy keeps the pool's own tensors safe from a fold that works in place.
    """
    work = {k: (v.float() if v.is_floating_point() and v.element_size() < 4 else v).clone() for k, v in state.items()}
    family.fold_scale(work, factor)
    return {k: v.to(state[k].dtype) if k in state else v for k, v in work.items()}


# --------------------------------------------------------------------------- the safetensors writer


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code


def save_shard(path: Path, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], get: Callable[[str], torch.Tensor]) -> None:
    """Write one safetensors file, fetching and writing one tensor at a time, and fsync it.

    `specs` lists (name, dtype, shape) in file order; `get(name)` returns the tensor, which
    is written and dropped before the next one is fetched, so a shard is never held in
    memory. The format: an 8-byte little-endian header length, a JSON header (dtypes, shapes,
    byte offsets; space-padded to a multiple of 8), then the tensors' bytes in order.
    """
    if sys.byteorder != "little":  # safetensors is little-endian; let the library convert
        from safetensors.torch import save_file

        save_file({n: get(n).clone() for n, _, _ in specs}, str(path), metadata={"format": "pt"})
        return
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in _ST_DTYPES:
            raise ExportError(f"{name}: dtype {dtype} cannot be written as safetensors")
        n = math.prod(shape) * _itemsize(dtype)
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name, dtype, shape in specs:
            t = get(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ExportError(f"{name}: expected {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
            if t.numel():
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t
        f.flush()
        os.fsync(f.fileno())
