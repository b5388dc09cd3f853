"""The loader's source-kind hook: a kind registered from outside `models/` is located, fingerprinted and loaded
through it, and the recipe file (`merging.hybrid`) is registered in any process that imports the package."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfs_merge.genome_files import save_genome
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models import kinds
from dfs_merge.models.metadata import fingerprint, layer_counts
from dfs_merge.models.sources import Source, SourcePool, locate


class Pointer:
    """A toy kind: a `*.pointer` file whose text is the folder of the model it stands for."""

    name = "pointer"

    def recognises(self, path: str) -> bool:
        return path.endswith(".pointer")

    def locate(self, path: str) -> Path:
        return locate(Path(path).read_text().strip())

    def fingerprint(self, path: str) -> str | None:
        return fingerprint(Path(path).read_text().strip())

    def load(self, path: str, device: str, dtype: str, trust_remote_code: bool) -> Source:
        inner = SourcePool.load([Path(path).read_text().strip()], device, dtype, trust_remote_code).base
        return Source(path, inner.model, inner.family, inner.folder, inner.license)


@pytest.fixture
def pointer() -> Iterator[Pointer]:
    kind = kinds.register_source_kind(Pointer())
    yield kind
    del kinds._KINDS[kind.name]


def test_a_registered_kind_is_located_fingerprinted_and_loaded(pointer, tiny_source_dirs, tmp_path):
    path = tmp_path / "a.pointer"
    path.write_text(str(tiny_source_dirs[1]))
    assert kinds.source_kind(str(path)) is pointer
    assert locate(str(path)) == tiny_source_dirs[1]
    assert fingerprint(str(path)) == fingerprint(str(tiny_source_dirs[1]))
    assert layer_counts([str(path)]) == layer_counts([str(tiny_source_dirs[1])])
    pool = SourcePool.load([str(tiny_source_dirs[0]), str(path)])
    assert pool.paths[1] == str(path) and pool.sources[1].folder == tiny_source_dirs[1]


def test_the_recipe_kind_is_registered_in_a_fresh_process(tiny_source_dirs, tmp_path):
    """A worker started by spawn (a process pool, Ray) imports only what it unpickles; the package's import
    registers the recipe file, so the loader knows it without `merging` being imported by the caller."""
    sources = tuple(str(d) for d in tiny_source_dirs)
    path = tmp_path / "r.recipe.yaml"
    save_genome(Recipe(sources, 4, "linear", None, 1, ((0.5,), (0.5,))), path)
    code = ("import json, sys\nfrom dfs_merge.models.metadata import fingerprint\nfrom dfs_merge.models.kinds import "
            "source_kind\nprint(json.dumps([source_kind(sys.argv[1]).name, fingerprint(sys.argv[1])]))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    assert json.loads(out) == ["recipe", fingerprint(str(path))]
    assert fingerprint(str(path)) not in (None, *(fingerprint(s) for s in sources))
