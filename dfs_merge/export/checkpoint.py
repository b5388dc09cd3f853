"""Writing a route as a plain Hugging Face checkpoint: the orchestration, the side files, publishing.

`export_checkpoint` writes the route as an ordinary Hugging Face checkpoint of the
base's own class (`num_hidden_layers` = hops), with each hop's running scale
product folded into its weights by the family (`Family.fold_scale`). The weights
are written shard by shard straight from the pool's tensors (`tensors`), so the
output is never held in memory twice. Everything goes into a staging folder beside
the target (`dfs_merge.atomic.Staging`), is verified there against the in-memory
stitched model (`verify`), gets its model card (`card`), and is renamed into place
only when complete: a killed or failed export never leaves a half folder under the
target's name. This module also writes the config, the generation config, the
tokenizer files and the genome.

mergekit passthrough configs of the same route, out and in: `dfs_merge.export.mergekit`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dfs_merge.atomic import Staging
from dfs_merge.errors import ExportError, SourceError
from dfs_merge.export.card import model_card
from dfs_merge.export.tensors import Entry, FoldedLayers, parse_size, plan_tensors, running_products, shards
from dfs_merge.export.tensors import save_shard as _save_shard
from dfs_merge.export.verify import (
    VERIFY_PROMPTS,
    VerifyResult,
    check_verified,
    verify_export,
    verify_tolerance,
)
from dfs_merge.genome import Genome, Route, save_genome
from dfs_merge.merging.blend import merged_pool
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.metadata import check_same_sources
from dfs_merge.models.sources import SourcePool
from dfs_merge.outputs import check_output

__all__ = [
    "GENOME_FILE", "INDEX_NAME", "TOKENIZER_FILES", "WEIGHTS_NAME", "Progress", "VerifyResult", "export_checkpoint",
    "export_config", "export_genome", "parse_size", "running_products", "verify_export",
]

log = logging.getLogger(__name__)

GENOME_FILE = "dfs-merge-genome.yaml"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# staging folder beside DIR: .<DIR name>.dfs-export-<pid>-<hex>; a replaced DIR: .<DIR name>.dfs-replaced-<pid>-<hex>
_STAGING = Staging(tag="dfs-export", old_tag="dfs-replaced", what="export")
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


class Progress:
    """Short stage lines on stderr (`export: loading 2 sources ...`, then `export: loaded 2 sources (3.1 s)`)
    and a bar over the tensors being written, when `on`; silent otherwise (library calls, tests)."""

    def __init__(self, on: bool = False):
        self.on = on

    def say(self, text: str) -> None:
        if self.on:
            print(f"export: {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, doing: str, done: str) -> Iterator[None]:
        """`doing ...` before the block, `done (seconds)` after it (nothing when it raises)."""
        self.say(f"{doing} ...")
        t0 = time.perf_counter()
        yield
        self.say(f"{done} ({time.perf_counter() - t0:.1f} s)")

    def bar(self, total: int, unit: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc="writing", unit=unit, disable=not self.on, leave=False, file=sys.stderr,
                    dynamic_ncols=True)


def export_checkpoint(
    pool: SourcePool,
    genome: Genome,
    out: str | Path,
    *,
    force: bool = False,
    verify: bool = True,
    max_shard_size: int | str = "2GB",
    command: str | None = None,
    progress: bool | Progress = False,
) -> Path:
    """Write `genome`'s route over `pool` (or a parameter-space recipe's merge of it) as a plain HF
    checkpoint in `out`; returns its path.

    The folder holds safetensors shards (and an index when sharded), config, generation
    config, the base's tokenizer files, the genome (`dfs-merge-genome.yaml`) and a model
    card. An existing `out` is refused unless `force`. With `verify`, the written
    checkpoint is loaded and compared with the stitched model before it is published;
    a mismatch is an ExportError and nothing is left under `out`'s name. `progress` prints stage lines and a
    bar to stderr (the CLI's; off for library calls).
    """
    show = progress if isinstance(progress, Progress) else Progress(bool(progress))
    route = genome.check()
    _check_pool(pool, genome)
    written = pool  # whose route is written: the sources, or for a recipe its merge as the one source
    if isinstance(genome, Recipe):
        with show.stage(f"merging ({genome.method}, {genome.layer_groups} layer groups)", "merged"):
            written = merged_pool(genome, pool)
    out = check_output(out, kind="folder", force=force, inputs=[*genome.sources, *pool.paths], error=ExportError,
                       what=None, force_hint="force=True (--force)")
    limit = parse_size(max_shard_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    _STAGING.remove_leftovers(out)
    with _STAGING.folder(out, replace=force, refuse=_appeared) as staging:
        _write_weights(written, route, staging, limit, show)
        _write_config(written, route, staging)
        _write_generation_config(pool, staging)
        _write_tokenizer(pool, staging)
        save_genome(genome, staging / GENOME_FILE)
        result = None
        if verify:
            with show.stage(f"verifying against the stitched model on {len(VERIFY_PROMPTS)} prompts",
                            "verified"):
                result = verify_export(written, route, staging, verify_tolerance(pool.dtype))
                log.info("verify: %s", result.text())
                check_verified(result, pool.dtype)
            show.say(f"verify: {result.text()}")
        card = model_card(pool, genome, route, title=out.name, genome_file=GENOME_FILE, result=result, command=command)
        (staging / "README.md").write_text(card)
    return out


def _appeared(out: Path) -> ExportError:
    return ExportError(f"{out}: appeared while exporting; pass force=True (--force) to replace it")


def export_genome(genome: Genome, out: str | Path, *, device: str = "cpu", dtype: str = "float32", **kwargs: Any) -> Path:
    """Load the genome's own sources and export it (`export_checkpoint`); missing sources are a SourceError."""
    pool = SourcePool.load(list(genome.sources), device=device, dtype=dtype)
    return export_checkpoint(pool, genome, out, **kwargs)


def _check_pool(pool: SourcePool, genome: Genome) -> None:
    """The pool must hold the genome's sources: same number, same layer counts, the same weights."""
    have, want = pool.layers_per_source, genome.source_layers
    if have != want:
        raise SourceError(
            f"the loaded sources ({len(have)} with layers {list(have)}) are not the genome's "
            f"({len(want)} with layers {list(want)}: {', '.join(genome.sources)})"
        )
    check_same_sources(genome.sources, genome.fingerprints, pool.paths)


def _write_weights(pool: SourcePool, route: Route, folder: Path, limit: int, show: Progress | None = None) -> None:
    """The safetensors shards (and index), streamed from the pool's tensors: only one folded layer is ever copied."""
    show = show or Progress()
    entries = plan_tensors(pool, route)
    groups = shards(entries, limit)
    base_state = pool.base.model.state_dict()
    layers = FoldedLayers(pool, route, running_products(route))
    n = len(groups)
    weight_map: dict[str, str] = {}
    total = sum(e.nbytes for e in entries)
    with show.stage(f"writing {len(route)} hops: {len(entries)} tensors, {total / 2**20:.0f} MB in "
                    f"{n} shard{'s' if n != 1 else ''}", f"wrote {n} shard{'s' if n != 1 else ''}"), \
            show.bar(len(entries), "tensor") as bar:
        for i, shard in enumerate(groups, start=1):
            name = WEIGHTS_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            by_name = {e.name: e for e in shard}

            def get(tensor: str, by_name: dict[str, Entry] = by_name) -> torch.Tensor:
                e = by_name[tensor]
                bar.update(1)
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


def _write_generation_config(pool: SourcePool, folder: Path) -> None:
    """The base folder's generation_config.json, copied verbatim; else the base model's saved; else none."""
    base_dir = pool.base.folder
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
    """The base folder's tokenizer files, copied verbatim; else the pool's tokenizer saved; else none."""
    base_dir = pool.base.folder
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


