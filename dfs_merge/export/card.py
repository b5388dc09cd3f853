"""The model card (README.md) of an exported checkpoint: sources, route, scales, settings, scores, provenance,
licences, and the genome itself.

The YAML front matter follows the Hub's conventions for merges: `base_model:` lists every source (its Hub
name where known, else its folder's name, `metadata.source_name`), `tags: [merge, dfs-merge]`,
`library_name: transformers`, and `license:` the sources' common licence, or `other` when they differ or
one is unknown, with each source's in the body (`metadata.source_license`: a packaged model's, its model
card's, its LICENSE file's).
"""

from __future__ import annotations

import datetime
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

import dfs_merge
from dfs_merge.export.tensors import running_products
from dfs_merge.genome import Genome
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.adapters import split_source
from dfs_merge.models.metadata import source_license, source_name
from dfs_merge.route import Route

if TYPE_CHECKING:
    from dfs_merge.export.settings import Settings


@dataclass(frozen=True)
class CardSource:
    """One source as the card lists it."""

    path: str  # as the genome names it
    layers: int
    model_type: str
    name: str  # its `base_model:` entry
    license: str | None


def card_sources(paths: Sequence[str], folders: Sequence[Path | None], configs: Sequence[Any],
                 layers: Sequence[int], licenses: Sequence[str | None] | None = None) -> list[CardSource]:
    """The card's sources from what an export knows of them; a licence not given is read from the folder."""
    out = []
    for i, (p, f, cfg, n) in enumerate(zip(paths, folders, configs, layers, strict=True)):
        lic = licenses[i] if licenses is not None else source_license(split_source(p)[0], f)
        out.append(CardSource(str(p), int(n), str(getattr(cfg, "model_type", "?")), source_name(str(p), f), lic))
    return out


def _scales_text(route: Route) -> str:
    scales = route.scales
    if all(s == 1.0 for s in scales):
        return "all 1 (plain stacking)"
    return ", ".join(f"{k}: {s:.6g}" for k, s in enumerate(scales) if s != 1.0) + " (other hops 1)"


def _route_text(architecture: str, family: str, genome: Genome, route: Route, genome_file: str, rows: str,
                loader: str) -> str:
    products = running_products(route)
    return f"""A data-flow-space merge (Akiba et al. 2024, arXiv:2403.13187) made with dfs-merge: the hidden
state takes the route below through the decoder layers of the sources. It is an ordinary
`{architecture}` checkpoint with {len(route)} layers; load it with
`{loader}.from_pretrained(...)`.

## Sources

| # | path | layers | model type |
| --- | --- | --- | --- |
{rows}

## Route

- hops: {len(route)}
- route (`source:first-last`): `{route.text()}`
- hop scales: {_scales_text(route)}
- running scale product at the last hop: {products[-1]:.6g}; each hop's product is folded into its
  weights ({family} family)
- genome: `{genome_file}` (repeats {genome.layout.repeats}, scaling {genome.scaling}, key {genome.key()})"""


def _recipe_text(recipe: Recipe, genome_file: str, rows: str, loader: str) -> str:
    table = "\n".join(recipe.table())
    base = f"source {recipe.base}" if recipe.base is not None else "none"
    return f"""A parameter-space merge ({recipe.method}) made with dfs-merge: each tensor is a mix of the
sources' tensors, with one weight per source and layer group below. It is an ordinary checkpoint of
the base's architecture with {recipe.layers} layers; load it with `{loader}.from_pretrained(...)`.

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


def _dtype_text(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "as the sources store them"


def _settings_text(route: Route, settings: Settings | None, written: torch.dtype | None) -> str:
    embed, head = route.embed_source, route.head_source
    tok = settings.tokenizer_source if settings is not None else 0
    template = settings.chat_template if settings is not None else None
    if template is not None and ("\n" in template or "{" in template):
        template = "the genome's own Jinja text"
    lines = [
        f"- embeddings: source {embed}; final norm and LM head: source {head}; tokenizer: source {tok}; config: "
        "source 0",
        f"- merge computed in: {_dtype_text(settings.dtype if settings else None)}; written in: "
        f"{_dtype_text(written)}",
    ]
    if template:
        lines.append(f"- chat template: {template}")
    return "\n".join(lines)


def combined_license(sources: Sequence[CardSource]) -> str | None:
    """The licence every source has (compared case-insensitively), or None when they differ or one is unknown."""
    found = {s.license.lower() for s in sources if s.license}
    if len(found) == 1 and all(s.license for s in sources):
        return next(s.license for s in sources if s.license)
    return None


def _front_matter(sources: Sequence[CardSource]) -> dict[str, object]:
    """The card's YAML header: base models, tags, library and licence (an identifier, or `other`)."""
    front: dict[str, object] = {"base_model": list(dict.fromkeys(s.name for s in sources)),
                                "tags": ["merge", "dfs-merge"], "library_name": "transformers"}
    lic = combined_license(sources)
    if lic and " " not in lic:
        front["license"] = lic.lower()
    else:
        front["license"] = "other"
        if lic:
            front["license_name"] = lic
    return front


def _license_text(sources: Sequence[CardSource]) -> str:
    rows = "\n".join(f"| {i} | {s.name} | {s.license or 'unknown'} |" for i, s in enumerate(sources))
    lic = combined_license(sources)
    if lic:
        head = f"Every source is under **{lic}**; the merge inherits it."
    else:
        head = ("The sources' licences differ or are not all known: the merge is bound by each of them; check "
                "them before using or publishing it.")
    return f"{head}\n\n| # | source | licence |\n| --- | --- | --- |\n{rows}"


def model_card(
    sources: Sequence[CardSource],
    genome: Genome,
    route: Route,
    *,
    architecture: str,
    family: str,
    title: str,
    genome_file: str,
    genome_text: str,
    verified: str,
    command: str | None,
    written: torch.dtype | None = None,
    settings: Settings | None = None,
    loader: str = "AutoModelForCausalLM",
) -> str:
    """The README.md text of an export of `route` over `sources`, titled `title`.

    `genome_file` is the genome's file name inside the export and `genome_text` its content (inlined);
    `verified` what the verification found; `command` the command line that made it (default: this
    process's); `written` the dtype its tensors were written in; `loader` the transformers Auto class that loads it.
    """
    import transformers

    rows = "\n".join(f"| {i} | `{s.path}` | {s.layers} | {s.model_type} |" for i, s in enumerate(sources))
    how = (_recipe_text(genome, genome_file, rows, loader) if isinstance(genome, Recipe)
           else _route_text(architecture, family, genome, route, genome_file, rows, loader))
    scores = yaml.safe_dump(genome.scores, sort_keys=False).strip() if genome.scores else "none recorded"
    cmd = command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return f"""---
{yaml.safe_dump(_front_matter(sources), sort_keys=False).strip()}
---

# {title}

{how}

## Settings

{_settings_text(route, settings, written)}

## Scores

```yaml
{scores}
```

## How it was made

- dfs-merge {dfs_merge.__version__}, transformers {transformers.__version__}, torch {torch.__version__}
- command: `{cmd}`
- written: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
- verified: {verified}

The genome it was made from (`{genome_file}`):

```yaml
{genome_text.strip()}
```

## License

{_license_text(sources)}
"""
