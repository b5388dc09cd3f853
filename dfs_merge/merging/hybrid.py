"""A parameter-space recipe file as a source (the paper's hybrid: a data-flow route over merged models).

A source path naming a `dfs-merge/recipe@1` file is the merge of that recipe, made in memory when the pool
loads: its own sources are loaded, merged (`blend.merged_source`), and stand as one source with the base's
config, tokenizer and licence. `RECIPE_SOURCE` is that kind of source; importing `dfs_merge.merging`
registers it with the loader's hook (`dfs_merge.models.kinds`). This module is imported with the `dfs_merge`
package, in every process, so it imports what it uses (the recipe, the blend, the loader) where it uses it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from dfs_merge.models.kinds import register_source_kind

if TYPE_CHECKING:
    from dfs_merge.models.sources import Source

__all__ = ["RECIPE_SOURCE", "RecipeSource"]

log = logging.getLogger(__name__)


class RecipeSource:
    """The source kind of a recipe file: located at its base source, fingerprinted by its file and its
    sources' weights, loaded as its merge."""

    name = "recipe"

    def recognises(self, path: str) -> bool:
        """Whether `path` is a recipe file (`genome_files.is_recipe_file`)."""
        from dfs_merge.genome_files import is_recipe_file

        return is_recipe_file(path)

    def locate(self, path: str) -> Path:
        """The folder of the recipe's base source (source 0 for a method without one): the merge's config and
        tokenizer are the base's."""
        from dfs_merge.genome_files import load_recipe_source
        from dfs_merge.models.folders import locate

        recipe = load_recipe_source(path)
        return locate(recipe.sources[recipe.base if recipe.base is not None else 0])

    def fingerprint(self, path: str) -> str | None:
        """blake2b over the recipe's key (what it merges: method, values, options) and its sources'
        fingerprints: a change to either is a new source, while scores or comments written into the file are
        not. None while one of its sources has none."""
        from dfs_merge.genome_files import load_recipe_source
        from dfs_merge.models.metadata import fingerprint

        recipe = load_recipe_source(path)
        inner = [fingerprint(s) for s in recipe.sources]
        if any(f is None for f in inner):
            return None
        h = hashlib.blake2b(digest_size=16)
        h.update((recipe.key() + "".join(map(str, inner))).encode())
        return "blake2b:" + h.hexdigest()

    def load(self, path: str, device: str, dtype: str, trust_remote_code: bool) -> Source:
        """The recipe's sources loaded and merged in memory, as one source named `path`."""
        from dfs_merge.genome_files import load_recipe_source
        from dfs_merge.merging.blend import merged_source
        from dfs_merge.models.sources import SourcePool

        recipe = load_recipe_source(path)
        log.info("merging the recipe %s (%s over %d sources)", path, recipe.method, len(recipe.sources))
        inner = SourcePool.load(list(recipe.sources), device, dtype, trust_remote_code)
        return merged_source(recipe, inner, str(path))


RECIPE_SOURCE = register_source_kind(RecipeSource())
