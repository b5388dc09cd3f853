"""Where an export reads its tensors: the loaded sources in memory, or their safetensors files, streamed.

Both providers answer the same questions, so that planning, folding, writing and checking (`tensors`,
`verify`) are one code path: which tensors a source holds outside its decoder layers and inside one
layer (names, dtypes, shapes), and the tensors themselves. `PoolTensors` reads a loaded `SourcePool`
(what a `BASE+ADAPTER` source, a recipe's merge or a model built in memory needs). `FileTensors` reads
each source's safetensors files through safetensors' `safe_open`, memory-mapped and opened anew for each
layer: a mapping kept open would count every page read so far in the process's resident memory, so an
export would peak at the size of its sources; opened per layer it peaks at one layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dfs_merge.errors import SourceError, one_line
from dfs_merge.inputs import read_json
from dfs_merge.models.families import Family

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from dfs_merge.models.sources import SourcePool

__all__ = ["INDEX_NAME", "ST_DTYPES", "WEIGHTS_NAME", "FileTensors", "PoolTensors", "Spec", "TensorProvider",
           "as_provider", "read_header", "safetensors_files"]

Spec = tuple[str, torch.dtype, tuple[int, ...]]
"""A tensor as a provider lists it: its name, its dtype as held, its shape."""

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""torch dtypes and their safetensors codes."""
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        ST_DTYPES[getattr(torch, _name)] = _code
_FROM_CODE = {code: dtype for dtype, code in ST_DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class TensorProvider:
    """The tensors of the sources an export reads: one list of `configs` and `families` per source."""

    configs: list[PretrainedConfig]
    families: list[Family]

    @property
    def family(self) -> Family:
        """The base's family: its layer and weight names are the output's."""
        return self.families[0]

    def layer_specs(self, source: int, layer: int) -> list[Spec]:
        """The tensors of one decoder layer, named within the layer (`self_attn.q_proj.weight`)."""
        raise NotImplementedError

    def non_layer_specs(self, source: int) -> list[Spec]:
        """The tensors outside the decoder layers; a head tied to the embeddings is left out, as
        `save_pretrained` leaves it out."""
        raise NotImplementedError

    def layer_state(self, source: int, layer: int) -> dict[str, torch.Tensor]:
        """One decoder layer's tensors, named within the layer, as held (never to be changed in place)."""
        raise NotImplementedError

    def tensor(self, source: int, key: str) -> torch.Tensor:
        """One tensor outside the layers, as held (never to be changed in place)."""
        raise NotImplementedError

    def same_weights(self, a: int, b: int) -> bool:
        """Whether sources `a` and `b` are one model (a self-merge names it twice)."""
        raise NotImplementedError

    def distinct_specs(self) -> Iterator[Spec]:
        """Every tensor of every distinct source (a self-merge's model once), layers and all."""
        seen: list[int] = []
        for i in range(len(self.configs)):
            if any(self.same_weights(i, j) for j in seen):
                continue
            seen.append(i)
            yield from self.non_layer_specs(i)
            for layer in range(int(self.configs[i].num_hidden_layers)):
                yield from self.layer_specs(i, layer)

    def distinct_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of every distinct source's tensors, floating ones in `dtype` (None: as held): what loading the
        sources for a comparison costs."""
        total = 0
        for _, dt, shape in self.distinct_specs():
            size = _itemsize(dtype if dtype is not None and dt.is_floating_point else dt)
            total += size * int(torch.Size(shape).numel())
        return total

    def floating_dtypes(self) -> set[torch.dtype]:
        """The dtypes the sources hold their floating tensors in."""
        return {dt for _, dt, _ in self.distinct_specs() if dt.is_floating_point}


class PoolTensors(TensorProvider):
    """The tensors of a loaded `SourcePool`, straight from its modules (nothing is copied)."""

    def __init__(self, pool: SourcePool):
        self.pool = pool
        self.configs = [s.config for s in pool.sources]
        self.families = [s.family for s in pool.sources]
        self._states: dict[int, dict[str, torch.Tensor]] = {}

    def _state(self, source: int) -> dict[str, torch.Tensor]:
        if source not in self._states:
            self._states[source] = self.pool.sources[source].model.state_dict()
        return self._states[source]

    def layer_specs(self, source: int, layer: int) -> list[Spec]:
        return [(k, t.dtype, tuple(t.shape)) for k, t in self.pool.layer(source, layer).state_dict().items()]

    def non_layer_specs(self, source: int) -> list[Spec]:
        from dfs_merge.models.sources import ties_embeddings

        prefix = self.families[source].layers_attr + "."
        tied = ties_embeddings(self.configs[source])
        seen: set[int] = set()
        out = []
        for key, t in self._state(source).items():
            if key.startswith(prefix):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr and ptr in seen and tied:  # the head that shares the embeddings' storage
                continue
            seen.add(ptr)
            out.append((key, t.dtype, tuple(t.shape)))
        return out

    def layer_state(self, source: int, layer: int) -> dict[str, torch.Tensor]:
        return self.pool.layer(source, layer).state_dict()

    def tensor(self, source: int, key: str) -> torch.Tensor:
        return self._state(source)[key]

    def same_weights(self, a: int, b: int) -> bool:
        return self.pool.sources[a].model is self.pool.sources[b].model


def as_provider(tensors: TensorProvider | SourcePool) -> TensorProvider:
    """A provider as is; a `SourcePool` as its `PoolTensors`."""
    return tensors if isinstance(tensors, TensorProvider) else PoolTensors(tensors)


# --------------------------------------------------------------------------- safetensors files


def safetensors_files(folder: Path) -> list[Path] | None:
    """The weight files transformers would load from `folder`: the index's shards, else `model.safetensors`;
    None when it has neither."""
    index = folder / INDEX_NAME
    if index.is_file():
        data = read_json(index, SourceError)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SourceError(f"{index}: no weight_map of tensor names to shard files")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SourceError(f"{index}: names shard {missing[0]}, which is not in the folder")
        return files
    single = folder / WEIGHTS_NAME
    return [single] if single.is_file() else None


def read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The tensors a safetensors file holds (name -> dtype, shape), from its header alone."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= _MAX_HEADER:
                raise SourceError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as err:
        raise SourceError(f"{path}: cannot read its safetensors header ({one_line(err)})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: not a safetensors file (its header is no JSON object)")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = _FROM_CODE[info["dtype"]], tuple(int(x) for x in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{path}: tensor {name!r} has an unreadable or unsupported dtype/shape") from None
        out[name] = (dtype, shape)
    return out


class FileTensors(TensorProvider):
    """The tensors of each source's safetensors files (`folders[i]`: source i's folder), read on demand."""

    def __init__(self, folders: Sequence[Path], configs: Sequence[PretrainedConfig], families: Sequence[Family]):
        self.folders = [Path(f) for f in folders]
        self.configs, self.families = list(configs), list(families)
        by_folder: dict[Path, dict[str, tuple[Path, torch.dtype, tuple[int, ...]]]] = {}
        self._where = []
        for f in self.folders:
            key = f.resolve()
            if key not in by_folder:
                by_folder[key] = self._index(f)
            self._where.append(by_folder[key])
        self._layers: list[dict[int, dict[str, str]]] = []
        for i, where in enumerate(self._where):
            pattern = re.compile(re.escape(self.families[i].layers_attr) + r"\.(\d+)\.(.+)")
            layers: dict[int, dict[str, str]] = {}
            for name in sorted(where):
                m = pattern.fullmatch(name)
                if m:
                    layers.setdefault(int(m.group(1)), {})[m.group(2)] = name
            self._layers.append(layers)

    @staticmethod
    def _index(folder: Path) -> dict[str, tuple[Path, torch.dtype, tuple[int, ...]]]:
        files = safetensors_files(folder)
        if not files:
            raise SourceError(f"{folder}: no .safetensors weights (pickled weights are not read, for safety)")
        where: dict[str, tuple[Path, torch.dtype, tuple[int, ...]]] = {}
        for file in files:
            for name, (dtype, shape) in read_header(file).items():
                if name in where:
                    raise SourceError(f"{folder}: tensor {name} is in both {where[name][0].name} and {file.name}")
                where[name] = (file, dtype, shape)
        return where

    def _layer_names(self, source: int, layer: int) -> dict[str, str]:
        names = self._layers[source].get(layer, {})
        missing = [w for w in self.families[source].layer_weights if w not in names]
        if missing:
            raise SourceError(f"{self.folders[source]}: the weights lack {self.families[source].layers_attr}.{layer}."
                              f"{missing[0]}, which its config.json asks for; does the config claim more layers "
                              "than the weights hold?")
        return names

    def layer_specs(self, source: int, layer: int) -> list[Spec]:
        where = self._where[source]
        return [(inner, *where[full][1:]) for inner, full in self._layer_names(source, layer).items()]

    def non_layer_specs(self, source: int) -> list[Spec]:
        from dfs_merge.models.sources import ties_embeddings

        prefix = self.families[source].layers_attr + "."
        specs = {name: (name, dt, shape) for name, (_, dt, shape) in sorted(self._where[source].items())
                 if not name.startswith(prefix)}
        embed, *_, head = self.families[source].non_layer_weights
        if embed not in specs:
            raise SourceError(f"{self.folders[source]}: the weights lack {embed}")
        if ties_embeddings(self.configs[source]):
            specs.pop(head, None)
        return list(specs.values())

    def _read(self, source: int, names: dict[str, str]) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError, safe_open

        where = self._where[source]
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for inner, full in names.items():
            by_file.setdefault(where[full][0], []).append((inner, full))
        out = {}
        for file, pairs in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:  # opened per call: see the module's docstring
                    for inner, full in pairs:
                        out[inner] = f.get_tensor(full)
            except (OSError, RuntimeError, SafetensorError) as err:
                raise SourceError(f"{file}: cannot read {pairs[0][1]} ({one_line(err)})") from None
        return out

    def layer_state(self, source: int, layer: int) -> dict[str, torch.Tensor]:
        return self._read(source, self._layer_names(source, layer))

    def tensor(self, source: int, key: str) -> torch.Tensor:
        if key not in self._where[source]:
            raise SourceError(f"{self.folders[source]}: the weights lack {key}")
        return self._read(source, {key: key})[key]

    def same_weights(self, a: int, b: int) -> bool:
        return self.folders[a].resolve() == self.folders[b].resolve()
