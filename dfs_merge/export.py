"""Writing a route as a plain checkpoint, and mergekit passthrough configs out and in.

`export_checkpoint` writes the route as an ordinary Hugging Face checkpoint of the
base's own class (`num_hidden_layers` = hops), with each hop's running scale
product folded into its weights by the family (`Family.fold_scale`). The weights
are written shard by shard straight from the pool's tensors, so the output is
never held in memory twice. Everything goes into a temporary folder beside the
target, is verified there against the in-memory stitched model, and is renamed
into place only when complete: a killed or failed export never leaves a half
folder under the target's name.

`write_mergekit_config` writes the same model as a mergekit 0.1.5 `passthrough`
config (`mergekit-yaml cfg.yaml OUT` builds it); `import_mergekit` reads such a
config back into a genome.

mergekit semantics this module relies on (mergekit 0.1.5, `plan.py`, `config.py`,
`merge_methods/passthrough.py`):

- a slice's `parameters.scale` multiplies every tensor it resolves to; a list of
  `{filter, value}` resolves per tensor to the first entry whose `filter` is a
  substring of the output tensor name (no filter, or `*`, matches all); no match
  leaves the tensor as is;
- the embeddings come from the first slice's model, the final norm and LM head
  from the last slice's model; a `layer_range` of `[0, 0]` contributes no layer,
  so an empty slice of the base pins them to the base;
- the output config is the `base_model`'s with `num_hidden_layers` replaced, and
  with `copy_tokenizer` (the default) the base's tokenizer and generation config
  files are copied verbatim.
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
from dfs_merge.atomic import fsync_dir, fsync_tree, write_atomic
from dfs_merge.config import ConstraintsConfig, read_yaml
from dfs_merge.errors import DfsMergeError, ExportError, GenomeError, SourceError
from dfs_merge.families import Family
from dfs_merge.genome import Genome, Hop, Route, Scaling, save_genome
from dfs_merge.sources import SourcePool, locate, read_config

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
_NON_LAYER_NAMES = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_LAYER_NAMES = (
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
    from dfs_merge import model_store

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


# --------------------------------------------------------------------------- mergekit out


@dataclass(frozen=True)
class _Slice:
    source: int
    start: int  # first layer
    end: int  # exclusive
    product: float  # running scale product of every hop in the slice


def mergekit_slices(route: Route) -> list[_Slice]:
    """Fewest slices for mergekit: runs of consecutive layers of one source with one running product."""
    out: list[_Slice] = []
    for h, p in zip(route, running_products(route), strict=True):
        last = out[-1] if out else None
        if last is not None and last.source == h.source and last.end == h.layer and last.product == p:
            out[-1] = _Slice(last.source, last.start, last.end + 1, p)
        else:
            out.append(_Slice(h.source, h.layer, h.layer + 1, p))
    return out


def _residual_writers(family: Family) -> tuple[str, ...] | None:
    """The tensors `family.fold_scale` divides by the factor (and leaves all else alone), or None.

    Probed on a fake layer state, so a family whose fold is not a plain division (Gemma's
    norm gains) is recognised as one mergekit's multiplicative scale cannot express.
    """
    writers = tuple(getattr(family, "residual_writers", ()) or ())
    if not writers:
        return None
    state = {n: torch.ones(2) for n in _LAYER_NAMES}
    state.update({f"{w}.weight": torch.ones(2) for w in writers})
    family.fold_scale(state, 4.0)
    scaled = {n for n, v in state.items() if not torch.equal(v, torch.ones(2))}
    ok = scaled == {f"{w}.weight" for w in writers} and all(torch.equal(state[n], torch.full((2,), 0.25)) for n in scaled)
    return writers if ok else None


def _dtype_name(config: Any) -> str:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(d).replace("torch.", "") if d is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def write_mergekit_config(
    genome: Genome, out: str | Path, *, force: bool = False, dtype: str | None = None
) -> Path:
    """Write a mergekit `passthrough` config that builds the same model as `export_checkpoint`.

    Slices group consecutive layers of one source with one running scale product; a slice
    whose product P is not 1 gets `scale: 1/P` on the family's residual writers (Llama:
    `o_proj`, `down_proj`), exactly the fold of `export_checkpoint`. Empty base slices
    (`layer_range: [0, 0]`) are added first / last where needed so that embeddings, final
    norm and head come from the base. `base_model` is the base: mergekit takes the output
    config from it and, with `copy_tokenizer` (its default), copies the base's tokenizer and
    generation config files verbatim. `tokenizer_source` is left unset on purpose: it would
    rebuild the vocabulary and reset `vocab_size` to the tokenizer's length, which changes
    models whose embedding matrix is padded. `dtype` defaults to the base's stored dtype.
    Families whose fold mergekit cannot express (Gemma 3) are an ExportError.
    """
    route = genome.check()
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists; pass force=True (--force) to replace it")
    folders = [locate(p).resolve() for p in genome.sources]
    configs = [read_config(f) for f in folders]
    for i, ((cfg, _), n) in enumerate(zip(configs, genome.layout.layers, strict=True)):
        if cfg.num_hidden_layers != n:
            raise SourceError(f"source {i} ({genome.sources[i]}) has {cfg.num_hidden_layers} layers, the genome says {n}")
    base_cfg, family = configs[0]
    if any(h.scale != 1.0 for h in route) and _residual_writers(family) is None:
        raise ExportError(
            f"mergekit output is not supported for the {family.name} family with hop scales other than 1: "
            "its scales fold into norm gains, which mergekit's multiplicative scale cannot express"
        )
    base_types = getattr(base_cfg, "layer_types", None)
    if base_types is not None:
        types = [family.layer_type(configs[h.source][0], h.layer) for h in route]
        if list(base_types) != types:
            raise ExportError(
                f"mergekit output is not supported for this {family.name} route: mergekit keeps the base's "
                "layer_types, which differ from the route's attention types"
            )
    writers = _residual_writers(family) or ()
    slices = mergekit_slices(route)
    entries: list[dict[str, Any]] = []
    if slices[0].source != 0:
        entries.append({"sources": [{"model": str(folders[0]), "layer_range": [0, 0]}]})
    for s in slices:
        src: dict[str, Any] = {"model": str(folders[s.source]), "layer_range": [s.start, s.end]}
        if s.product != 1.0:
            value = 1.0 / s.product
            src["parameters"] = {
                "scale": [{"filter": w, "value": value} for w in writers] + [{"value": 1.0}]
            }
        entries.append({"sources": [src]})
    if slices[-1].source != 0:
        entries.append({"sources": [{"model": str(folders[0]), "layer_range": [0, 0]}]})
    data = {
        "merge_method": "passthrough",
        "base_model": str(folders[0]),
        "dtype": dtype or _dtype_name(base_cfg),
        "slices": entries,
    }
    header = (
        f"# mergekit passthrough config written by dfs-merge {dfs_merge.__version__}\n"
        f"# route ({len(route)} hops): {route.text()}\n"
        f"# genome key {genome.key()}; sources: {', '.join(genome.sources)}\n"
        f"# build: mergekit-yaml {out.name} OUTPUT_DIR  (the base's tokenizer is copied)\n"
    )
    write_atomic(out, header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=200))
    return out


# --------------------------------------------------------------------------- mergekit in


def _resolve_setting(setting: Any, tensor: str, t: float) -> float | None:
    """mergekit's `evaluate_setting` for a numeric parameter: filters, then gradients over `t`."""
    if setting is None:
        return None
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, bool) or isinstance(setting, str):
        raise ValueError(f"not a number: {setting!r}")
    if isinstance(setting, (int, float)):
        return float(setting)
    if not isinstance(setting, list):
        raise ValueError(f"unexpected value {setting!r}")
    if not setting:
        return None
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(setting[i0]) + frac * float(setting[i1])
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond:
            raise ValueError(f"expected {{filter, value}} entries, got {cond!r}")
        filt = cond.get("filter")
        if filt is None or filt == "*" or (tensor and str(filt) in tensor):
            return _resolve_setting(cond["value"], tensor, t)
    return None


def _model_name(entry: Any, where: str) -> str:
    model = entry.get("model") if isinstance(entry, dict) else None
    if isinstance(model, dict):  # mergekit's long form {model: {path: ...}, lora: ...}
        if model.get("lora"):
            raise GenomeError(f"{where}: LoRA model references are not supported")
        inner = model.get("model")
        model = inner.get("path") if isinstance(inner, dict) else None
    if not isinstance(model, str) or not model:
        raise GenomeError(f"{where}: needs a 'model' path")
    if "+" in model and not Path(model).exists():
        raise GenomeError(f"{where}: LoRA model references ({model}) are not supported")
    return model


def _same_path(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def import_mergekit(
    config_path: str | Path,
    *,
    repeats: int | None = None,
    scaling: Scaling = "slot",
    sources: Sequence[str] | None = None,
) -> Genome:
    """Turn a mergekit `passthrough` config into a genome.

    Sources are `sources` if given, else `base_model` (when set) and then the slices'
    models in order of first appearance. Layer counts come from each source's
    config.json (no weights are loaded). Hop scales are recovered from the slices'
    `scale` on the residual writers (the inverse running product); any other scaled
    tensor is refused. `repeats` defaults to the smallest that expresses the route; a
    route the layout cannot express is a GenomeError naming the slice. `pin_ends` is
    kept when the route starts and ends with the base's first and last layer.
    """
    path = Path(config_path)
    data = read_yaml(path, GenomeError)
    where = str(path)
    method = data.get("merge_method")
    if method != "passthrough":
        raise GenomeError(f"{where}: merge_method is {method!r}; only 'passthrough' configs describe a route")
    raw = data.get("slices")
    if not isinstance(raw, list) or not raw:
        raise GenomeError(f"{where}: a passthrough config needs a 'slices' list (models/modules forms are not routes)")
    top_params = (data.get("parameters") or {}).get("scale")

    # sources
    named: list[tuple[str, list[int], Any]] = []  # (model, [start, end), scale setting) per slice
    for i, sl in enumerate(raw):
        w = f"{where}: slice {i}"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or len(sl["sources"]) != 1:
            raise GenomeError(f"{w}: a passthrough slice needs exactly one entry under 'sources'")
        entry = sl["sources"][0]
        model = _model_name(entry, w)
        rng = entry.get("layer_range")
        if (
            not isinstance(rng, (list, tuple)) or len(rng) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng) or not 0 <= rng[0] <= rng[1]
        ):
            raise GenomeError(f"{w}: layer_range must be [start, end] with 0 <= start <= end, got {rng!r}")
        setting = (entry.get("parameters") or {}).get("scale")
        if setting is None:
            setting = (sl.get("parameters") or {}).get("scale")
        if setting is None:
            setting = top_params
        named.append((model, [int(rng[0]), int(rng[1])], setting))
    base_model = data.get("base_model")
    if isinstance(base_model, dict):
        base_model = _model_name({"model": base_model}, f"{where}: base_model")
    if sources is None:
        order = ([base_model] if isinstance(base_model, str) else []) + [m for m, _, _ in named]
        src_list: list[str] = []
        for m in order:
            if not any(_same_path(m, s) for s in src_list):
                src_list.append(m)
    else:
        src_list = [str(s) for s in sources]
        if not src_list:
            raise GenomeError(f"{where}: sources is empty")
    index_of: list[int] = []
    for i, (m, _, _) in enumerate(named):
        k = next((j for j, s in enumerate(src_list) if _same_path(m, s)), None)
        if k is None:
            raise GenomeError(f"{where}: slice {i}: model {m} is not one of the sources ({', '.join(src_list)})")
        index_of.append(k)

    tok = data.get("tokenizer_source")
    if isinstance(data.get("tokenizer"), dict):
        tok = data["tokenizer"].get("source", tok)
    if tok is not None and tok != "base" and not (isinstance(tok, str) and _same_path(tok, src_list[0])):
        raise GenomeError(f"{where}: tokenizer_source {tok!r}: a genome always uses the base's tokenizer")

    # layer counts, from config.json only
    layers: list[int] = []
    families: list[Family] = []
    for s in src_list:
        cfg, fam = read_config(locate(s))
        layers.append(int(cfg.num_hidden_layers))
        families.append(fam)
    family = families[0]
    writers = _residual_writers(family)

    # hops and their running products
    hops: list[tuple[int, int, float, int]] = []  # (source, layer, product, slice)
    for i, ((m, (start, end), setting), src) in enumerate(zip(named, index_of, strict=True)):
        w = f"{where}: slice {i} ({m} [{start}, {end}])"
        if end > layers[src]:
            raise GenomeError(f"{w}: layer_range ends past the model's {layers[src]} layers")
        n = end - start
        for j in range(n):
            t = j / (n - 1) if n > 1 else 1.0
            product = _slice_product(setting, writers, len(hops), t, w)
            hops.append((src, start + j, product, i))
        if n == 0 and setting is not None and i in (0, len(named) - 1):
            _slice_product(setting, writers, len(hops), 1.0, w)  # the base's embeddings / head must stay unscaled
    if not hops:
        raise GenomeError(f"{where}: the slices contain no layer")
    first_model, last_model = index_of[0], index_of[-1]
    if first_model != 0 or last_model != 0:
        which = "first" if first_model != 0 else "last"
        slice_i = 0 if which == "first" else len(named) - 1
        raise GenomeError(
            f"{where}: slice {slice_i}: mergekit takes the embeddings / final norm and head from the {which} slice's "
            f"model ({named[slice_i][0]}), but a genome takes them from the base ({src_list[0]}); add an empty "
            "base slice (layer_range [0, 0]) there"
        )

    scales, prev = [], 1.0
    for _, _, p, _ in hops:
        scales.append(float(f"{p / prev:.12g}"))
        prev = p
    if scaling == "none" and any(s != 1.0 for s in scales):
        raise GenomeError(f"{where}: the config scales hops but scaling is 'none'")
    route = Route(tuple(Hop(s, layer, sc) for (s, layer, _, _), sc in zip(hops, scales, strict=True)))

    # the slot layout
    offsets = [sum(layers[:i]) for i in range(len(layers))]
    reps = [0]  # the repetition each hop lands in when every hop takes the next free slot
    for k in range(1, len(hops)):
        here, before = offsets[hops[k][0]] + hops[k][1], offsets[hops[k - 1][0]] + hops[k - 1][1]
        reps.append(reps[-1] + (here <= before))
    need = reps[-1] + 1
    r = repeats if repeats is not None else need
    if r < 1:
        raise GenomeError(f"{where}: repeats must be at least 1, got {r}")
    if need > r:
        k = next(k for k, x in enumerate(reps) if x >= r)
        s, layer, _, i = hops[k]
        raise GenomeError(
            f"{where}: slice {i} ({named[i][0]} [{named[i][1][0]}, {named[i][1][1]}]): hop {k} ({s}:{layer}) "
            f"does not fit in repeats={r}; the route needs repeats >= {need}"
        )
    pin = route[0].source == 0 and route[0].layer == 0 and route[-1].source == 0 and route[-1].layer == layers[0] - 1
    constraints = ConstraintsConfig(pin_ends=pin)
    try:
        genome = Genome.from_route(route, src_list, layers, r, scaling, constraints)
        genome.check()
    except GenomeError as err:
        raise GenomeError(f"{where}: {err}") from None
    return genome


def _slice_product(setting: Any, writers: tuple[str, ...] | None, hop: int, t: float, where: str) -> float:
    """The running product P of output layer `hop`: its residual writers are scaled by 1/P, all else by 1."""
    if setting is None:
        return 1.0
    mine = {f"{w}.weight" for w in writers or ()}
    names = [*_NON_LAYER_NAMES, *(f"model.layers.{hop}.{n}" for n in _LAYER_NAMES if n not in mine)]
    try:
        probe = {n: _resolve_setting(setting, n, t) for n in names}
        values = [_resolve_setting(setting, f"model.layers.{hop}.{w}.weight", t) for w in writers or ()]
    except ValueError as err:
        raise GenomeError(f"{where}: scale: {err}") from None
    others = {n: v for n, v in probe.items() if v is not None and v != 1.0}
    if others:
        name = next(iter(others))
        raise GenomeError(
            f"{where}: scale {others[name]:g} on {name} cannot be read as a hop scale "
            "(only the residual writers may be scaled)"
        )
    vals = {1.0 if v is None else v for v in values}
    if not vals:
        return 1.0
    if len(vals) > 1:
        raise GenomeError(f"{where}: the residual writers ({', '.join(writers or ())}) have different scales {sorted(vals)}")
    v = vals.pop()
    if not (math.isfinite(v) and v > 0):
        raise GenomeError(f"{where}: scale {v} on the residual writers is not a positive number")
    return 1.0 / v

