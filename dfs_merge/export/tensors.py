"""The tensors of an exported checkpoint: which ones, in which shard, with which scale folded in, and their bytes.

`plan_tensors` lists every output tensor (where it comes from, its written dtype and shape)
from a tensor provider (`providers`: a loaded pool, or the sources' safetensors files) without
copying anything; `shards` groups them by size; `FoldedLayers` hands out one hop's layer state
at a time, cast to the merge's dtype, with the running product of hop scales folded in by the
family; `save_shard` streams one safetensors file from those tensors, one tensor at a time, so an
export never holds its output in memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dfs_merge.errors import ExportError, GenomeError, SourceError
from dfs_merge.export.providers import ST_DTYPES, TensorProvider, as_provider
from dfs_merge.models.families import Family
from dfs_merge.route import Route

if TYPE_CHECKING:
    from dfs_merge.models.sources import SourcePool

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- planning


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or `2GB` / `500MB` / `64KiB` (powers of 1000, or of 1024 with `i`); a size
    that is not positive (`-5GB`, `0`, `0.1B`) is refused saying so."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*([-+]?)\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", size.upper())
        if not m:
            raise ExportError(f"max_shard_size: cannot read {size!r}; expected e.g. 2GB, 500MB or 64KiB")
        sign, number, prefix, binary = m.groups()
        n = (-1 if sign == "-" else 1) * int(float(number) * (1024 if binary else 1000) ** " KMGT".index(prefix or " "))
    if n <= 0:
        raise ExportError(f"max_shard_size: {size!r}: the size must be positive, e.g. 2GB, 500MB or 64KiB")
    return n


@dataclass(frozen=True)
class Entry:
    """One output tensor: where it comes from, how it is written and how big it is."""

    name: str
    hop: int | None  # index into the route, None for a tensor outside the layers
    key: str  # key in the hop's layer state, or in its source's tensors outside the layers
    dtype: torch.dtype  # as written
    shape: tuple[int, ...]
    source: int = 0  # the source it is read from

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def plan_tensors(tensors: TensorProvider | SourcePool, route: Route, dtype: torch.dtype | None = None) -> list[Entry]:
    """Every tensor of the output, nothing copied: the embeddings (of `route.embed_source`), each hop's layer,
    the final norm and LM head (of `route.head_source`); floating tensors in `dtype` (None: as held).

    Names are sorted within each of the three parts, so that both providers plan the same files. The
    head is left out where the output (the base's config) ties it to embeddings of the same model, as
    `save_pretrained` does; an embed and a head source that differ while a source ties them is refused,
    as the stitched model refuses it.
    """
    from dfs_merge.models.sources import ties_embeddings

    p = as_provider(tensors)
    family = p.family
    embed, head = route.embed_source, route.head_source
    embed_key, *_, head_key = family.non_layer_weights
    if embed != head and any(ties_embeddings(p.configs[i]) for i in (0, embed, head)):
        raise GenomeError(f"embed_source {embed} and head_source {head} differ, but the sources tie the LM head "
                          "to the embeddings (tie_word_embeddings): a tied model's head is its embeddings' source's")

    def out(dt: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and dt.is_floating_point else dt

    pre, post = [], []
    for source, side in ((embed, pre), (head, post)):
        for key, dt, shape in sorted(p.non_layer_specs(source)):
            if ("embed" in key) == (side is pre):
                side.append(Entry(key, None, key, out(dt), shape, source))
    if not ties_embeddings(p.configs[0]) and not any(e.name == head_key for e in post):
        if not ties_embeddings(p.configs[head]):
            raise SourceError(f"source {head} has no {head_key} and does not tie it to its embeddings")
        dt, shape = next((dt, shape) for k, dt, shape in p.non_layer_specs(head) if k == embed_key)
        post.append(Entry(head_key, None, embed_key, out(dt), shape, head))  # its embeddings are its head
    prefix = family.layers_attr + "."
    hops = [Entry(f"{prefix}{k}.{key}", k, key, out(dt), shape, h.source)
            for k, h in enumerate(route) for key, dt, shape in sorted(p.layer_specs(h.source, h.layer))]
    return pre + hops + post


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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread for the block. An export's casts, folds and comparisons stream through memory
    a tensor at a time and its verify forwards read each weight once: memory-bound work that more threads
    only slow down on a busy machine (eight times slower, measured on 2 shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def running_products(route: Route) -> list[float]:
    """The running product of hop scales up to and including each hop: the factor each hop's weights fold in."""
    out, p = [], 1.0
    for h in route:
        p *= h.scale
        out.append(p)
    return out


class FoldedLayers:
    """The output's tensors, read from a provider (or a pool) with each hop's running scale product
    (`products`, one per hop) folded in by its source's family.

    `dtype` is what the merge computes in (a genome's `dtype`, mergekit's): each tensor is cast to it before
    the fold, and to its entry's dtype after. Only the last hop asked for is kept, so an export holds one
    layer at a time.
    """

    def __init__(self, tensors: TensorProvider | SourcePool, route: Route, products: Sequence[float],
                 dtype: torch.dtype | None = None):
        self.tensors, self.route = as_provider(tensors), route
        self.products = list(products)
        self.dtype = dtype
        self._hop: int | None = None
        self._state: dict[str, torch.Tensor] = {}

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def get(self, hop: int) -> dict[str, torch.Tensor]:
        """Hop `hop`'s layer state, folded (the provider's own tensors when its product is 1 and no cast)."""
        if hop != self._hop:
            self._hop, self._state = None, {}  # the last hop's tensors are freed before the next one's are read
            h = self.route[hop]
            state = {k: self._cast(v) for k, v in self.tensors.layer_state(h.source, h.layer).items()}
            factor = self.products[hop]
            if factor != 1.0:
                state = fold(self.tensors.families[h.source], state, factor)
            self._hop, self._state = hop, state
        return self._state

    def tensor(self, e: Entry) -> torch.Tensor:
        """The tensor written for `e`, in its dtype."""
        t = self.get(e.hop)[e.key] if e.hop is not None else self._cast(self.tensors.tensor(e.source, e.key))
        return t if t.dtype == e.dtype else t.to(e.dtype)


def fold(family: Family, state: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """`family.fold_scale` applied to a float32 (at least) copy of one layer's `state`, cast back.

    The copy keeps the pool's own tensors safe from a fold that works in place.
    """
    work = {k: (v.float() if v.is_floating_point() and v.element_size() < 4 else v).clone() for k, v in state.items()}
    family.fold_scale(work, factor)
    return {k: v.to(state[k].dtype) if k in state else v for k, v in work.items()}


# --------------------------------------------------------------------------- the safetensors writer


def save_shard(path: Path, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], get: Callable[[str], torch.Tensor],
               hold: Callable[[str], contextlib.AbstractContextManager[object]] | None = None) -> None:
    """Write one safetensors file, fetching and writing one tensor at a time (its data is left to the caller to
    fsync: `dfs_merge.export.overlap.Flusher`, and the staging folder's own before it is published).

    `specs` lists (name, dtype, shape) in file order; `get(name)` returns the tensor, which
    is written and dropped before the next one is fetched, so a shard is never held in
    memory; `hold(name)`, where given, is held while that tensor is fetched and written (a
    memory gate: `overlap.MemoryGate`). The format: an 8-byte little-endian header length, a
    JSON header (dtypes, shapes, byte offsets; space-padded to a multiple of 8), then the
    tensors' bytes in order.
    """
    if sys.byteorder != "little":  # safetensors is little-endian; let the library convert
        from safetensors.torch import save_file

        save_file({n: get(n).clone() for n, _, _ in specs}, str(path), metadata={"format": "pt"})
        return
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in ST_DTYPES:
            raise ExportError(f"{name}: dtype {dtype} cannot be written as safetensors")
        n = math.prod(shape) * _itemsize(dtype)
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name, dtype, shape in specs:
            with hold(name) if hold is not None else contextlib.nullcontext():
                t = get(name)
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ExportError(f"{name}: expected {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
                if t.numel():
                    f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
                del t
