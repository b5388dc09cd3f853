"""The model card (README.md) of an exported checkpoint: sources, route, scales, scores, provenance, licence.

The licence is the base's, as recorded when its source was loaded (`Source.license`).
"""

from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path

import torch
import yaml

import dfs_merge
from dfs_merge.export.tensors import running_products
from dfs_merge.export.verify import VerifyResult
from dfs_merge.genome import Genome, Route
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.sources import SourcePool


def _scales_text(route: Route) -> str:
    scales = route.scales
    if all(s == 1.0 for s in scales):
        return "all 1 (plain stacking)"
    return ", ".join(f"{k}: {s:.6g}" for k, s in enumerate(scales) if s != 1.0) + " (other hops 1)"


def _route_text(pool: SourcePool, genome: Genome, route: Route, genome_file: str, rows: str) -> str:
    products = running_products(route)
    return f"""A data-flow-space merge (Akiba et al. 2024, arXiv:2403.13187) made with dfs-merge: the hidden
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
- genome: `{genome_file}` (repeats {genome.layout.repeats}, scaling {genome.scaling}, key {genome.key()})"""


def _recipe_text(recipe: Recipe, genome_file: str, rows: str) -> str:
    table = "\n".join(recipe.table())
    base = f"source {recipe.base}" if recipe.base is not None else "none"
    return f"""A parameter-space merge ({recipe.method}) made with dfs-merge: each tensor is a mix of the
sources' tensors, with one weight per source and layer group below. It is an ordinary checkpoint of
the base's architecture with {recipe.layers} layers; load it with `AutoModelForCausalLM.from_pretrained(...)`.

## Sources

| # | path | layers | model type |
| --- | --- | --- | --- |
{rows}

The embeddings, final norm and LM head are merged too (with the first and the last layer group's
values); the tokenizer and config are source 0's.

## Recipe

- method: {recipe.method}; base: {base}; layer groups: {recipe.layer_groups}; normalize:
  {recipe.normalize}; lambda: {recipe.lam:g}
- recipe: `{genome_file}` (key {recipe.key()})

```
{table}
```"""


def _front_matter(lic: str | None) -> dict[str, object]:
    """The card's YAML header: a licence identifier (or `other` with its name), library and tags."""
    front: dict[str, object] = {"library_name": "transformers", "tags": ["dfs-merge", "merge", "data-flow-merge"]}
    if lic:
        front = {"license": lic.lower() if " " not in lic else "other", **front}
        if " " in lic:
            front["license_name"] = lic
    return front


def _license_text(lic: str | None) -> str:
    if lic:
        return f"Inherited from the base model (source 0): **{lic}**. Check the other sources' licences too."
    return "Unknown: the base model's licence could not be determined; check the licences of all sources."


def model_card(
    pool: SourcePool,
    genome: Genome,
    route: Route,
    *,
    title: str,
    genome_file: str,
    result: VerifyResult | None,
    command: str | None,
) -> str:
    """The README.md text of an export of `route` over `pool`, titled `title`.

    `genome_file` is the genome's file name inside the export; `result` the verification
    (None: not verified); `command` the command line that made it (default: this process's).
    """
    import transformers

    lic = pool.base.license
    rows = "\n".join(
        f"| {i} | `{p}` | {n} | {pool.sources[i].config.model_type} |"
        for i, (p, n) in enumerate(zip(genome.sources, genome.source_layers, strict=True))
    )
    how = (_recipe_text(genome, genome_file, rows) if isinstance(genome, Recipe)
           else _route_text(pool, genome, route, genome_file, rows))
    scores = yaml.safe_dump(genome.scores, sort_keys=False).strip() if genome.scores else "none recorded"
    cmd = command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    verified = result.text() if result is not None else "not verified (verify=False)"
    return f"""---
{yaml.safe_dump(_front_matter(lic), sort_keys=False).strip()}
---

# {title}

{how}

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

{_license_text(lic)}
"""
