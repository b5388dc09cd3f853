"""Writing a route as a plain Hugging Face checkpoint.

`export_checkpoint` writes the route as an ordinary Hugging Face checkpoint of the
base's own class (`num_hidden_layers` = hops), with each hop's running scale
product folded into its weights by the family (`Family.fold_scale`). The weights
are written shard by shard straight from the pool's tensors, so the output is
never held in memory twice. Everything goes into a temporary folder beside the
target, is verified there against the in-memory stitched model, and is renamed
into place only when complete: a killed or failed export never leaves a half
folder under the target's name.

mergekit passthrough configs of the same route, out and in: `dfs_merge.export.mergekit`.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import math
import os
import re
import secrets
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

import dfs_merge
from dfs_merge.atomic import fsync_dir, fsync_tree
from dfs_merge.errors import DfsMergeError, ExportError, SourceError
from dfs_merge.genome import Genome, Route, save_genome
from dfs_merge.models.families import Family
from dfs_merge.models.sources import SourcePool, locate

log = logging.getLogger(__name__)

GENOME_FILE = "dfs-merge-genome.yaml"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_TMP_TAG = "dfs-export"  # staging folder beside DIR: .<DIR name>.dfs-export-<pid>-<hex>
_OLD_TAG = "dfs-replaced"  # a replaced DIR, removed right after the swap
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
# Tensors that a mergekit `scale` must leave alone for the slice to be a hop scale:
# the base's non-layer tensors, and a layer's tensors other than the family's residual writers.
NON_LAYER_NAMES = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
LAYER_NAMES = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
VERIFY_TOLERANCE_HALF = 5e-2
VERIFY_NEW_TOKENS = 16
VERIFY_PROMPTS = ("The capital of France is", "def add(a, b):\n    return")


# --------------------------------------------------------------------------- the checkpoint


@dataclass(frozen=True)
class VerifyResult:
    """How closely a written checkpoint reproduces the stitched model."""

    max_abs_diff: float  # max |logit(export) - logit(stitched)| over the verify batch
    max_abs_logit: float  # max |logit(stitched)| over the same batch
    generations_equal: bool | None  # greedy continuations of every prompt identical (None: not compared)
    new_tokens: int

    @property
    def rel_error(self) -> float:
        """max|Δlogit| / max|logit|."""
        return self.max_abs_diff / max(self.max_abs_logit, 1e-30)

    def text(self) -> str:
        gen = {True: "identical", False: "DIFFERENT", None: "not compared"}[self.generations_equal]
        return (
            f"max|Δlogit|/max|logit| = {self.rel_error:.2e} (max|Δ| {self.max_abs_diff:.2e}); "
            f"greedy generations ({self.new_tokens} new tokens) {gen}"
        )


def export_checkpoint(
    pool: SourcePool,
    genome: Genome,
    out: str | Path,
    *,
    force: bool = False,
    verify: bool = True,
    max_shard_size: int | str = "2GB",
    command: str | None = None,
) -> Path:
    """Write `genome`'s route over `pool` as a plain HF checkpoint in `out`; returns its path.

    The folder holds safetensors shards (and an index when sharded), config, generation
    config, the base's tokenizer files, the genome (`dfs-merge-genome.yaml`) and a model
    card. An existing `out` is refused unless `force`. With `verify`, the written
    checkpoint is loaded and compared with the stitched model before it is published;
    a mismatch is an ExportError and nothing is left under `out`'s name.
    """
    route = genome.check()
    _check_pool(pool, genome)
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists; pass force=True (--force) to replace it")
    limit = parse_size(max_shard_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    staging = out.parent / f".{out.name}.{_TMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        _write_weights(pool, route, staging, limit)
        _write_config(pool, route, staging)
        _write_generation_config(pool, staging)
        _write_tokenizer(pool, staging)
        save_genome(genome, staging / GENOME_FILE)
        tol = VERIFY_TOLERANCE.get(pool.dtype, VERIFY_TOLERANCE_HALF)
        result = verify_export(pool, route, staging, tol) if verify else None
        if result is not None:
            log.info("verify: %s", result.text())
            _check_verified(result, pool.dtype)
        _write_card(pool, genome, route, staging, out.name, result, command)
        fsync_tree(staging)
        _publish(staging, out, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def export_genome(genome: Genome, out: str | Path, *, device: str = "cpu", dtype: str = "float32", **kwargs: Any) -> Path:
    """Load the genome's own sources and export it (`export_checkpoint`); missing sources are a SourceError."""
    pool = SourcePool.load(list(genome.sources), device=device, dtype=dtype)
    return export_checkpoint(pool, genome, out, **kwargs)


def _check_pool(pool: SourcePool, genome: Genome) -> None:
    """The pool must hold the genome's sources: same number, same layer counts."""
    have, want = pool.layers_per_source, genome.layout.layers
    if have != want:
        raise SourceError(
            f"the loaded sources ({len(have)} with layers {list(have)}) are not the genome's "
            f"({len(want)} with layers {list(want)}: {', '.join(genome.sources)})"
        )
    for i, (p, g) in enumerate(zip(pool.paths, genome.sources, strict=True)):
        if Path(p).expanduser().resolve() != Path(g).expanduser().resolve():
            log.warning("source %d: the pool loaded %s, the genome names %s", i, p, g)


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
class _Entry:
    """One output tensor: where it comes from and how big it is."""

    name: str
    hop: int | None  # index into the route, None for the base's non-layer tensors
    key: str  # key in the hop's layer state dict, or in the base's state dict
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _plan_tensors(pool: SourcePool, route: Route) -> list[_Entry]:
    """Every tensor of the output in HF order: embeddings, the hops' layers, final norm, head.

    A non-layer tensor that shares storage with an earlier one (the LM head of a base with
    tied embeddings) is left out, as `save_pretrained` does.
    """
    family, base = pool.family, pool.base.model
    prefix = family.layers_attr + "."
    base_state = base.state_dict()
    seen: dict[int, str] = {}
    pre: list[_Entry] = []
    post: list[_Entry] = []
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
        (post if in_layers else pre).append(_Entry(key, None, key, t.dtype, tuple(t.shape)))
    hops = []
    for k, h in enumerate(route):
        for key, t in pool.layer(h.source, h.layer).state_dict().items():
            hops.append(_Entry(f"{prefix}{k}.{key}", k, key, t.dtype, tuple(t.shape)))
    return pre + hops + post


def _ties_embeddings(config: Any) -> bool:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _shards(entries: list[_Entry], limit: int) -> list[list[_Entry]]:
    """Consecutive groups of at most `limit` bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def running_products(route: Route) -> list[float]:
    """The running product of hop scales up to and including each hop."""
    out, p = [], 1.0
    for h in route:
        p *= h.scale
        out.append(p)
    return out


class _FoldedLayers:
    """The hops' layer states with the running scale product folded in; the last one is kept."""

    def __init__(self, pool: SourcePool, route: Route):
        self.pool, self.route = pool, route
        self.products = running_products(route)
        self._hop: int | None = None
        self._state: dict[str, torch.Tensor] = {}

    def get(self, hop: int) -> dict[str, torch.Tensor]:
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


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code


def _save_shard(path: Path, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], get: Callable[[str], torch.Tensor]) -> None:
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


def _write_weights(pool: SourcePool, route: Route, folder: Path, limit: int) -> None:
    """The safetensors shards (and index), streamed from the pool's tensors: only one folded layer is ever copied."""
    entries = _plan_tensors(pool, route)
    shards = _shards(entries, limit)
    base_state = pool.base.model.state_dict()
    layers = _FoldedLayers(pool, route)
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = WEIGHTS_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        by_name = {e.name: e for e in shard}

        def get(tensor: str, by_name: dict[str, _Entry] = by_name) -> torch.Tensor:
            e = by_name[tensor]
            return (layers.get(e.hop) if e.hop is not None else base_state)[e.key]

        _save_shard(folder / name, [(e.name, e.dtype, e.shape) for e in shard], get)
        weight_map.update(dict.fromkeys(by_name, name))
    if n > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in entries)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def export_config(pool: SourcePool, route: Route) -> Any:
    """The base's config for `route`: `num_hidden_layers` = hops, `layer_types` per hop where it has them."""
    base = pool.base.model
    config = copy.deepcopy(base.config)
    config.num_hidden_layers = len(route)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [pool.layer_type(h.source, h.layer) for h in route]
    config.architectures = [type(base).__name__]
    config.dtype = pool.dtype
    return config


def _write_config(pool: SourcePool, route: Route, folder: Path) -> None:
    export_config(pool, route).save_pretrained(folder)


def _base_folder(pool: SourcePool) -> Path | None:
    """The base's HF folder when its path names one (without converting anything)."""
    try:
        return locate(pool.paths[0])  # a GGUF or packaged name was converted when the pool loaded it
    except DfsMergeError:
        return None


def _write_generation_config(pool: SourcePool, folder: Path) -> None:
    base_dir = _base_folder(pool)
    if base_dir is not None and (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", folder / "generation_config.json")
        return
    gen = getattr(pool.base.model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(folder)
        except Exception as err:  # noqa: BLE001 - a generation config is optional
            log.warning("generation config not written (%s)", err)


def _write_tokenizer(pool: SourcePool, folder: Path) -> None:
    """The base's tokenizer files, copied verbatim; else the pool's tokenizer saved; else none."""
    base_dir = _base_folder(pool)
    copied = []
    if base_dir is not None:
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, folder / name)
                copied.append(name)
    if copied:
        return
    if pool.tokenizer is not None:
        pool.tokenizer.save_pretrained(folder)
    else:
        log.warning("the base has no tokenizer: the export has none either")


# --------------------------------------------------------------------------- verification


def _verify_inputs(pool: SourcePool, vocab: int) -> list[torch.Tensor]:
    """Prompts as token ids (1 x n each): the fixed text prompts, or fixed id rows without a tokenizer."""
    tok = pool.tokenizer
    if tok is not None:
        rows = [tok(p, return_tensors="pt")["input_ids"] for p in VERIFY_PROMPTS]
        if all(r.numel() and int(r.max()) < vocab for r in rows):
            return rows
    return [torch.tensor([[(7 + 31 * i + 101 * j) % vocab for i in range(12)]]) for j in range(2)]


@torch.no_grad()
def verify_export(pool: SourcePool, route: Route, folder: str | Path, tolerance: float | None = None) -> VerifyResult:
    """Load the checkpoint in `folder` and compare it with the stitched model on a fixed batch.

    Logits are compared on every prompt and on a 32-token id sequence; each prompt is then
    continued greedily for `VERIFY_NEW_TOKENS` tokens by both models (skipped when the
    logits already miss `tolerance`).
    """
    from transformers import AutoModelForCausalLM

    from dfs_merge.stitch import stitch

    stitched = stitch(pool, route)
    placement = {} if pool.device.type == "cpu" else {"device_map": str(pool.device)}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=pool.dtype, **placement)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"the written checkpoint does not load ({type(err).__name__}: {err})") from None
    loaded = loaded.to(pool.device).eval()
    vocab = int(loaded.config.get_text_config(decoder=True).vocab_size)
    prompts = _verify_inputs(pool, vocab)
    batch = [*prompts, torch.tensor([[(3 + 37 * i) % vocab for i in range(32)]])]
    diff = top = 0.0
    for ids in batch:
        ids = ids.to(pool.device)
        a = stitched(input_ids=ids).logits.float()
        b = loaded(input_ids=ids).logits.float()
        diff = max(diff, float((a - b).abs().max()))
        top = max(top, float(a.abs().max()))
    if tolerance is not None and not diff <= tolerance * top:
        del loaded
        return VerifyResult(diff, top, None, VERIFY_NEW_TOKENS)
    same = True
    pad = getattr(pool.tokenizer, "pad_token_id", None) if pool.tokenizer is not None else None
    for ids in prompts:
        ids = ids.to(pool.device)
        kw = dict(
            attention_mask=torch.ones_like(ids), max_new_tokens=VERIFY_NEW_TOKENS, do_sample=False,
            num_beams=1, pad_token_id=pad if pad is not None else 0,
        )
        ga = stitched.generate(ids, **kw)
        gb = loaded.generate(ids, **kw)
        same = same and ga.shape == gb.shape and bool((ga == gb).all())
    del loaded
    return VerifyResult(diff, top, same, VERIFY_NEW_TOKENS)


def _check_verified(result: VerifyResult, dtype: torch.dtype) -> None:
    """Refuse an export whose logits or greedy generations differ from the stitched model's."""
    tol = VERIFY_TOLERANCE.get(dtype, VERIFY_TOLERANCE_HALF)
    if not math.isfinite(result.rel_error) or result.rel_error > tol:
        raise ExportError(f"verify failed: {result.text()} (tolerance {tol:g}); nothing was written")
    if result.generations_equal is False:
        if dtype in VERIFY_TOLERANCE:
            raise ExportError(f"verify failed: {result.text()}; nothing was written")
        log.warning("verify: greedy generations differ in %s (near-ties); logits agree: %s", dtype, result.text())


# --------------------------------------------------------------------------- publishing


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove staging and replaced folders of `out` left by exports whose process is gone."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:{_TMP_TAG}|{_OLD_TAG})-(\d+)-[0-9a-f]+")
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and not _pid_alive(int(m.group(1))):
            log.info("removing %s, left by an interrupted export", p)
            shutil.rmtree(p, ignore_errors=True)


def _publish(staging: Path, out: Path, force: bool) -> None:
    """Rename the finished folder into place; with `force`, the old one is moved away first, then deleted."""
    old = None
    if out.exists() or out.is_symlink():
        if not force:
            raise ExportError(f"{out}: appeared while exporting; pass force=True (--force) to replace it")
        old = out.parent / f".{out.name}.{_OLD_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the model card


def _license(pool: SourcePool) -> str | None:
    """The base's licence: a packaged model's, or the `license:` of the base folder's model card."""
    from dfs_merge.models import store as model_store

    spec = model_store.PACKAGED_MODELS.get(pool.paths[0])
    if spec is not None:
        return spec.license
    base_dir = _base_folder(pool)
    if base_dir is not None and (base_dir / model_store.MARKER).is_file():  # a converted packaged model
        try:
            package = json.loads((base_dir / model_store.MARKER).read_text()).get("source", {}).get("package")
        except (OSError, ValueError, AttributeError):
            package = None
        spec = next((m for m in model_store.PACKAGED_MODELS.values() if m.package == package), None)
        if spec is not None:
            return spec.license
    if base_dir is not None and (base_dir / "README.md").is_file():
        m = re.match(r"---\n(.*?)\n---", (base_dir / "README.md").read_text(errors="replace"), re.S)
        if m:
            try:
                front = yaml.safe_load(m.group(1)) or {}
            except yaml.YAMLError:
                front = {}
            if isinstance(front, dict) and front.get("license"):
                return str(front["license"])
    return None


def _scales_text(route: Route) -> str:
    scales = route.scales
    if all(s == 1.0 for s in scales):
        return "all 1 (plain stacking)"
    return ", ".join(f"{k}: {s:.6g}" for k, s in enumerate(scales) if s != 1.0) + " (other hops 1)"


def _write_card(
    pool: SourcePool,
    genome: Genome,
    route: Route,
    folder: Path,
    title: str,
    result: VerifyResult | None,
    command: str | None,
) -> None:
    """README.md: sources, route, scales, scores, how it was made, licence."""
    import transformers

    lic = _license(pool)
    front = {"library_name": "transformers", "tags": ["dfs-merge", "merge", "data-flow-merge"]}
    if lic:
        front = {"license": lic.lower() if " " not in lic else "other", **front}
        if " " in lic:
            front["license_name"] = lic
    rows = "\n".join(
        f"| {i} | `{p}` | {n} | {pool.sources[i].config.model_type} |"
        for i, (p, n) in enumerate(zip(genome.sources, genome.layout.layers, strict=True))
    )
    products = running_products(route)
    scores = yaml.safe_dump(genome.scores, sort_keys=False).strip() if genome.scores else "none recorded"
    cmd = command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    verified = result.text() if result is not None else "not verified (verify=False)"
    if lic:
        license_text = f"Inherited from the base model (source 0): **{lic}**. Check the other sources' licences too."
    else:
        license_text = "Unknown: the base model's licence could not be determined; check the licences of all sources."
    text = f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {title}

A data-flow-space merge (Akiba et al. 2024, arXiv:2403.13187) made with dfs-merge: the hidden
state takes the route below through the decoder layers of the sources. It is an ordinary
`{type(pool.base.model).__name__}` checkpoint with {len(route)} layers; load it with
`AutoModelForCausalLM.from_pretrained(...)`.

## Sources

| # | path | layers | model type |
| --- | --- | --- | --- |
{rows}

Source 0 is the base: it supplies the embeddings, final norm, LM head, tokenizer and config.

## Route

- hops: {len(route)}
- route (`source:first-last`): `{route.text()}`
- hop scales: {_scales_text(route)}
- running scale product at the last hop: {products[-1]:.6g}; each hop's product is folded into its
  weights ({pool.family.name} family)
- genome: `{GENOME_FILE}` (repeats {genome.layout.repeats}, scaling {genome.scaling}, key {genome.key()})

## Scores

```yaml
{scores}
```

## How it was made

- dfs-merge {dfs_merge.__version__}, transformers {transformers.__version__}, torch {torch.__version__}
- command: `{cmd}`
- written: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
- verified against the in-memory stitched model: {verified}

## License

{license_text}
"""
    (folder / "README.md").write_text(text)
