"""Hybrids against mergekit 0.1.5: a DFS genome one of whose sources is a parameter-space recipe file is
written by `write_mergekit_config` as a `mergekit-multi` config (the recipe's merge as a named document, then
the passthrough route naming it), and mergekit-multi builds the model dfs-merge stitches in memory.

The parity module's three random tiny Llama sources (hidden 48, 4 layers, fp32); a task_arithmetic recipe
over them with 2 layer groups. Two hybrids: the recipe as the base (route `0:0-1, 1:2, 0:3`) and the recipe
as source 1 with hop scales other than 1 (the fold on the residual writers). Both builds share one
intermediate folder, so the second mergekit-multi run reuses the first one's merge (its lazy default).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import test_mergekit_parity as parity
import yaml
from builders import assert_refused, run_cli
from test_mergekit_parity import BIN, ENV, TOL, logits_of, needs_mergekit, rel, theirs

from dfs_merge.errors import ExportError, GenomeError
from dfs_merge.export.checkpoint import export_checkpoint
from dfs_merge.export.mergekit import import_mergekit, write_mergekit_config
from dfs_merge.genome import Genome, Route
from dfs_merge.genome_files import save_genome
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.sources import SourcePool
from dfs_merge.stitch import stitch

three = parity.three  # the parity module's three random tiny sources (seeds 10, 11, 12)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recipe_file(three, tmp_path_factory) -> tuple[Recipe, str]:
    r = Recipe(tuple(three), 4, "task_arithmetic", 0, 2, ((0.5, 0.2), (0.3, 0.9)), lam=0.8)
    path = tmp_path_factory.mktemp("hybrid") / "ps.recipe.yaml"
    save_genome(r, path)
    return r, str(path)


def hybrids(recipe_path: str, three: list[str]) -> dict[str, Genome]:
    return {
        "recipe_as_base": Genome.from_route(Route.parse("0:0-1, 1:2, 0:3"), [recipe_path, three[2]], [4, 4], 2, "slot"),
        "recipe_scaled": Genome.from_route(Route.parse("0:0, 1:1-2, 0:2-3", [1.0, 1.0, 0.75, 1.25, 1.0]),
                                           [three[1], recipe_path], [4, 4], 2, "slot"),
    }


@pytest.mark.slow
@needs_mergekit
def test_mergekit_multi_builds_the_stitched_hybrid(three, recipe_file, tmp_path):
    recipe, path = recipe_file
    name = recipe.key()
    for label, g in hybrids(path, three).items():
        cfg = write_mergekit_config(g, tmp_path / f"{label}.yaml")
        text = cfg.read_text()
        assert f"# build: mergekit-multi {cfg.name} --intermediate-dir DIR --out-path OUTPUT_DIR" in text
        assert "DARE" not in text
        docs = list(yaml.safe_load_all(text))
        assert len(docs) == 2 and docs[0]["name"] == name and "name" not in docs[1]
        assert docs[0]["merge_method"] == "task_arithmetic" and docs[0]["base_model"] == three[0]
        final = docs[1]
        models = [sl["sources"][0]["model"] for sl in final["slices"]]
        at = 0 if label == "recipe_as_base" else 1
        assert name in models and path not in yaml.safe_dump(docs)  # the recipe file is named in comments only
        assert (final["base_model"] == name) == (at == 0)
        assert all(m == name or m == three[2 if at == 0 else 1] for m in models)

        done = subprocess.run([str(BIN / "mergekit-multi"), str(cfg), "--intermediate-dir", str(tmp_path / "merges"),
                               "--out-path", str(tmp_path / label), "--quiet", "--no-cuda"],
                              env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (tmp_path / "merges" / name / "config.json").is_file()
        pool = SourcePool.load(g.sources)
        built = theirs(tmp_path / label)
        exported = theirs(export_checkpoint(pool, g, tmp_path / f"{label}.dfs"))
        d_export, d_stitch = rel(exported, built), rel(logits_of(stitch(pool, g.check())), built)
        print(f"{label}: relative max|dlogit| of mergekit-multi's build vs export_checkpoint {d_export:.3g}, "
              f"vs stitch {d_stitch:.3g}")
        assert d_export < TOL, d_export
        # a hop scale folds into the residual writers (export and mergekit alike): exact but for RMSNorm's eps,
        # which the tiny random models' small hidden states feel
        assert d_stitch < (TOL if label == "recipe_as_base" else 1e-3), d_stitch

    # a multi-document config is not imported
    with pytest.raises(GenomeError, match="2 YAML documents, a mergekit-multi config") as err:
        import_mergekit(cfg)
    assert "\n" not in str(err.value)
    res = run_cli("import-mergekit", cfg, "--out", tmp_path / "g.genome.yaml")
    assert_refused(res, "mergekit-multi config", "one document")
    assert not (tmp_path / "g.genome.yaml").exists()


def test_a_dare_hybrid_says_its_masks_differ(three, tmp_path):
    r = Recipe(tuple(three), 4, "dare_ties", 0, 2, ((0.6, 0.4), (0.5, 0.8)), ((0.5, 0.7), (0.3, 0.9)), seed=3)
    save_genome(r, tmp_path / "dare.recipe.yaml")
    g = Genome.from_route(Route.parse("0:0-3"), [str(tmp_path / "dare.recipe.yaml"), three[2]], [4, 4], 1, "slot")
    text = write_mergekit_config(g, tmp_path / "dare.yaml").read_text()
    assert "mergekit cannot reproduce" in text and "seed 3" in text
    docs = list(yaml.safe_load_all(text))
    assert docs[0]["name"] == r.key() and docs[0]["parameters"]["rescale"] is True
    assert docs[1]["slices"] == [{"sources": [{"model": r.key(), "layer_range": [0, 4]}]}]


def test_one_recipe_twice_is_one_merge_and_a_nested_recipe_is_refused(three, recipe_file, tmp_path):
    recipe, path = recipe_file
    copy = tmp_path / "copy.recipe.yaml"
    copy.write_text(Path(path).read_text())
    g = Genome.from_route(Route.parse("0:0-1, 1:2, 0:3"), [path, str(copy)], [4, 4], 2, "slot")
    docs = list(yaml.safe_load_all(write_mergekit_config(g, tmp_path / "twice.yaml").read_text()))
    assert len(docs) == 2 and {sl["sources"][0]["model"] for sl in docs[1]["slices"]} == {recipe.key()}
    nested = Recipe((path, three[1]), 4, "task_arithmetic", 0, 1, ((0.5,),))
    save_genome(nested, tmp_path / "nested.recipe.yaml")
    g = Genome.from_route(Route.parse("0:0-3"), [str(tmp_path / "nested.recipe.yaml"), three[2]], [4, 4], 1, "slot")
    with pytest.raises(ExportError, match="is itself a recipe file"):
        write_mergekit_config(g, tmp_path / "nested.yaml")
