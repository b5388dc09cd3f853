"""Parameter-space recipes against mergekit 0.1.5: the config `write_recipe_config` writes builds, with
mergekit, the model `recipe_model` merges in memory (every method: linear, task arithmetic, TIES, DARE,
breadcrumbs, DELLA, slerp with and without filters, nuslerp with and without a base, model stock); mergekit
configs read by `import_mergekit` (models and slices forms, gradients, filters, uneven slices) merge in memory
as mergekit builds them, and write back to configs that build the same; DARE's and DELLA's masks are seeded
(DELLA's equal to mergekit's own pruning drawn from the same generator state); what a recipe cannot express,
and bad values (slerp over three models, t outside [0, 1], rows of the wrong length), are refused with one line.

Three random tiny Llama sources (hidden 48, 4 layers, fp32). Every mergekit build of the module runs in one
`mergekit-multi` process (the same `run_merge` as `mergekit-yaml`, one interpreter start instead of ten);
one test runs `mergekit-yaml` itself on a written config.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from builders import assert_refused, run_cli, save_source, tiny_llama_config

from dfs_merge.errors import ExportError, GenomeError
from dfs_merge.export.mergekit import import_mergekit, write_mergekit_config, write_recipe_config
from dfs_merge.genome_files import save_genome
from dfs_merge.merging.blend import recipe_model
from dfs_merge.merging.methods import METHODS, merge_tensor, tensor_generator
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.sources import SourcePool

BIN = Path(sys.executable).parent
needs_mergekit = pytest.mark.skipif(
    not ((BIN / "mergekit-yaml").exists() and (BIN / "mergekit-multi").exists()), reason="mergekit is not installed"
)
IDS = torch.tensor([[(5 + 41 * i) % 300 for i in range(20)], [(9 + 13 * i) % 300 for i in range(20)]])
TOL = 1e-4
SUPPORTED = "supported: passthrough, " + ", ".join(METHODS)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def three(tmp_path_factory, tiny_tokenizer) -> list[str]:
    """Three random tiny Llama sources of one shape (seeds 10, 11, 12)."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("ps_sources")
    dirs = []
    for seed in (10, 11, 12):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer))).eval()
        dirs.append(str(save_source(model, tiny_tokenizer, root / f"s{seed}")))
    return dirs


@pytest.fixture(scope="module")
def pool(three) -> SourcePool:
    return SourcePool.load(three)


def parity_recipes(src: list[str]) -> dict[str, Recipe]:
    """Two layer groups over the 4 layers, other weights (and densities) in each."""
    s = tuple(src)
    return {
        "linear": Recipe(s, 4, "linear", 0, 2, ((0.5, 0.2), (0.3, 0.6), (0.4, 0.1))),
        "task_arithmetic": Recipe(s, 4, "task_arithmetic", 0, 2, ((0.5, 0.2), (0.3, 0.9)), lam=0.8),
        "ties": Recipe(s, 4, "ties", 0, 2, ((0.5, 0.2), (0.3, 0.9)), ((0.5, 0.9), (0.3, 0.7))),
        # density 1: no random mask, so mergekit's build must equal ours (sign election with DARE's defaults)
        "dare_ties_dense": Recipe(s, 4, "dare_ties", 0, 2, ((0.6, 0.4), (0.7, 0.2)), ((1.0, 1.0), (1.0, 1.0))),
        "breadcrumbs": Recipe(s, 4, "breadcrumbs", 0, 2, ((0.5, 0.2), (0.3, 0.9)), ((0.5, 0.9), (0.3, 0.7)),
                              options=(("gamma", 0.05),)),
        "breadcrumbs_ties": Recipe(s, 4, "breadcrumbs_ties", 0, 2, ((0.5, 0.2), (0.3, 0.9)), ((0.6, 0.8), (0.4, 0.7)),
                                   rescale=True),
        "della_dense": Recipe(s, 4, "della", 0, 2, ((0.6, 0.4), (0.7, 0.2)), ((1.0, 1.0), (1.0, 1.0)), lam=0.9),
        "della_linear_dense": Recipe(s, 4, "della_linear", 0, 2, ((0.6, 0.4), (0.7, 0.2)), ((1.0, 1.0), (1.0, 1.0))),
        "slerp": Recipe(s[:2], 4, "slerp", 0, 2, ((0.3, 0.8),)),
        "slerp_filtered": Recipe(s[:2], 4, "slerp", 0, 2, ((0.5, 0.4),), filters=("self_attn", "mlp"),
                                 filtered=(((0.1, 0.9),), ((1.0, 0.25),))),
        "nuslerp": Recipe(s, 4, "nuslerp", 0, 2, ((0.4, 0.7), (0.6, 0.2))),
        "nuslerp_rows": Recipe(s[1:], 4, "nuslerp", None, 2, ((0.2, 1.0), (0.5, 0.5)),
                               options=(("nuslerp_flatten", False), ("nuslerp_row_wise", True))),
        "model_stock": Recipe(s, 4, "model_stock", 0, 2, ()),
    }


def ends_recipes(src: list[str]) -> dict[str, Recipe]:
    """Recipes whose embeddings and final norm + head have values of their own (`ends`): each row is
    [embeddings, group 0, group 1, norm and head]."""
    s = tuple(src)
    return {
        "ties_ends": Recipe(s, 4, "ties", 0, 2, ((0.1, 0.5, 0.2, 0.9), (0.7, 0.3, 0.9, 0.2)),
                            ((0.4, 0.5, 0.9, 0.6), (0.8, 0.3, 0.7, 0.5)), ends=True),
        "linear_ends": Recipe(s, 4, "linear", 0, 2, ((0.2, 0.5, 0.2, 0.6), (0.3, 0.3, 0.6, 0.1), (0.5, 0.4, 0.1, 0.3)),
                              ends=True),
        # the filters select layer tensors only: the embeddings and the head take the unfiltered ends, and a
        # filter's own ends repeat its first and last group's values (what an import gives them)
        "slerp_filtered_ends": Recipe(s[:2], 4, "slerp", 0, 2, ((0.2, 0.5, 0.4, 0.9),), filters=("self_attn", "mlp"),
                                      filtered=(((0.1, 0.1, 0.9, 0.9),), ((1.0, 1.0, 0.25, 0.25),)), ends=True),
    }


ENDS = ["ties_ends", "linear_ends", "slerp_filtered_ends"]

NEW = ["breadcrumbs", "breadcrumbs_ties", "della_dense", "della_linear_dense", "slerp", "slerp_filtered", "nuslerp",
       "nuslerp_rows", "model_stock"]
"""The parity recipes of the methods added after the first five."""


def hand_written(src: list[str]) -> dict[str, dict]:
    """mergekit configs as a person writes them, and what each imports to (layer groups, weights, densities)."""
    a, b, c = src
    return {
        "models_ties": {
            "merge_method": "ties", "base_model": a, "dtype": "float32", "parameters": {"normalize": True},
            "models": [{"model": b, "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": c, "parameters": {"weight": 0.4, "density": 0.7}}],
        },
        "slices_task_arithmetic": {  # precedence: the model's own, then the slice's, then the config's
            "merge_method": "task_arithmetic", "base_model": a, "dtype": "float32",
            "parameters": {"weight": 0.5, "lambda": 0.9},
            "slices": [
                {"sources": [{"model": b, "layer_range": [0, 2], "parameters": {"weight": 0.7}},
                             {"model": c, "layer_range": [0, 2]}, {"model": a, "layer_range": [0, 2]}]},
                {"parameters": {"weight": 0.3},
                 "sources": [{"model": b, "layer_range": [2, 4], "parameters": {"weight": 1.1}},
                             {"model": c, "layer_range": [2, 4]}, {"model": a, "layer_range": [2, 4]}]},
            ],
        },
        "gradient_linear": {  # a gradient whose first and last values agree: the head's t = 0 value is the last layer's
            "merge_method": "linear", "dtype": "float32",
            "models": [{"model": a, "parameters": {"weight": [0.2, 0.8, 0.2]}},
                       {"model": b, "parameters": {"weight": 0.5}},
                       {"model": c, "parameters": {"weight": [0.3, 0.3]}}],
        },
        "neuralpipe_slerp": {  # NeuralPipe-7B-slerp's and mergekit's gradient-slerp's form: filtered gradients of t
            "merge_method": "slerp", "base_model": a, "dtype": "float32",
            "slices": [{"sources": [{"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        },
        "gradient_slerp": {  # a plain gradient whose ends agree (the head's t = 0 value is the last layer's)
            "merge_method": "slerp", "base_model": b, "dtype": "float32",
            "models": [{"model": c}], "parameters": {"t": [0.25, 0.75, 0.25]},
        },
        "nuslerp_models": {
            "merge_method": "nuslerp", "dtype": "float32", "parameters": {"nuslerp_row_wise": True},
            "models": [{"model": b, "parameters": {"weight": 0.3}}, {"model": c, "parameters": {"weight": 0.7}}],
        },
        "model_stock_models": {
            "merge_method": "model_stock", "base_model": a, "dtype": "float32", "parameters": {"filter_wise": True},
            "models": [{"model": b}, {"model": c}],
        },
        "breadcrumbs_models": {
            "merge_method": "breadcrumbs_ties", "base_model": a, "dtype": "float32",
            "parameters": {"gamma": 0.02, "normalize": True},
            "models": [{"model": b, "parameters": {"weight": 0.6, "density": 0.7}},
                       {"model": c, "parameters": {"weight": [0.4, 0.2, 0.4], "density": 0.5}}],
        },
        # issue 31: gradients whose t = 0 value (the embeddings' and the norm and head's) is not the first / last
        # layer's: recipes with ends
        "gradient_ties": {
            "merge_method": "ties", "base_model": a, "dtype": "float32",
            "models": [{"model": b, "parameters": {"weight": [0.3, 0.9, 0.5], "density": 0.6}},
                       {"model": c, "parameters": {"weight": 0.6, "density": [0.4, 0.9]}}],
        },
        "gradient_linear_head": {
            "merge_method": "linear", "dtype": "float32",
            "models": [{"model": a, "parameters": {"weight": [0.2, 0.8]}}, {"model": b, "parameters": {"weight": 0.5}}],
        },
        "gradient_task_arithmetic": {
            "merge_method": "task_arithmetic", "base_model": a, "dtype": "float32",
            "models": [{"model": b, "parameters": {"weight": [0.7, 0.1, 1.2]}}, {"model": c, "parameters": {"weight": 0.4}}],
        },
        "embeddings_filter": {  # a filter that selects the embeddings alone
            "merge_method": "task_arithmetic", "base_model": a, "dtype": "float32",
            "models": [{"model": b, "parameters": {"weight": [{"filter": "embed_tokens", "value": 0.1}, {"value": 0.5}]}}],
        },
        "uneven_linear": {  # slices of 1 and 3 layers: a recipe of 4 groups
            "merge_method": "linear", "base_model": a, "dtype": "float32",
            "slices": [
                {"sources": [{"model": m, "layer_range": [0, 1], "parameters": {"weight": w}}
                             for m, w in ((a, 0.2), (b, 0.5), (c, 0.3))]},
                {"sources": [{"model": m, "layer_range": [1, 4], "parameters": {"weight": w}}
                             for m, w in ((a, 0.6), (b, 0.1), (c, 0.3))]},
            ],
        },
    }


EXPECTED = {  # layer groups, weights, densities of each hand-written config
    "models_ties": (1, [[0.6], [0.4]], [[0.5], [0.7]]),
    "slices_task_arithmetic": (2, [[0.7, 1.1], [0.5, 0.3]], []),
    "gradient_linear": (4, [[0.2, 0.6, 0.6, 0.2], [0.5] * 4, [0.3] * 4], []),
    "neuralpipe_slerp": (4, [[0.5] * 4], []),
    "gradient_slerp": (4, [[0.25, 0.5 + 0.25 / 3, 0.5 + 0.25 / 3, 0.25]], []),
    "nuslerp_models": (1, [[0.3], [0.7]], []),
    "model_stock_models": (1, [], []),
    "breadcrumbs_models": (4, [[0.6] * 4, [0.4, 0.4 - 0.2 / 1.5, 0.4 - 0.2 / 1.5, 0.4]], [[0.7] * 4, [0.5] * 4]),
    "uneven_linear": (4, [[0.2, 0.6, 0.6, 0.6], [0.5, 0.1, 0.1, 0.1], [0.3] * 4], []),
    # with ends: [embeddings, layer 0..3, norm and head]; a gradient's t = 0 value at both ends
    "gradient_ties": (4, [[0.3, 0.3, 0.3 + 0.6 * 2 / 3, 0.9 - 0.4 / 3, 0.5, 0.3], [0.6] * 6],
                      [[0.6] * 6, [0.4, 0.4, 0.4 + 0.5 / 3, 0.4 + 1 / 3, 0.9, 0.4]]),
    "gradient_linear_head": (4, [[0.2, 0.2, 0.4, 0.6, 0.8, 0.2], [0.5] * 6], []),
    "gradient_task_arithmetic": (4, [[0.7, 0.7, 0.7 - 0.6 * 2 / 3, 0.1 + 1.1 / 3, 1.2, 0.7], [0.4] * 6], []),
    "embeddings_filter": (1, [[0.1, 0.5, 0.5]], []),
}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def built(three, tmp_path_factory) -> dict[str, Path]:
    """Every mergekit build of the module, from one `mergekit-multi` run: the written parity configs
    (`recipe_NAME`), the hand-written configs (`hand_NAME`) and their import -> export (`back_NAME`)."""
    if not (BIN / "mergekit-multi").exists():
        pytest.skip("mergekit is not installed")
    root = tmp_path_factory.mktemp("mergekit_builds")
    configs: dict[str, Path] = {}
    for name, r in (parity_recipes(three) | ends_recipes(three)).items():
        configs[f"recipe_{name}"] = write_recipe_config(r, root / f"{name}.yaml")
    for name, data in hand_written(three).items():
        configs[f"hand_{name}"] = src = write_yaml(root / f"{name}.hand.yaml", data)
        configs[f"back_{name}"] = write_recipe_config(import_mergekit(src), root / f"{name}.back.yaml")
    multi = root / "all.yaml"
    multi.write_text("\n---\n".join(f"name: {n}\n{p.read_text()}" for n, p in configs.items()))
    done = subprocess.run([str(BIN / "mergekit-multi"), str(multi), "-I", str(root / "out"), "--no-lazy", "--quiet",
                           "--no-cuda"], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {n: root / "out" / n for n in configs} | {f"{n}.yaml": p for n, p in configs.items()}


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def theirs(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits_of(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())


def rel(ours: torch.Tensor, other: torch.Tensor) -> float:
    return float((ours - other).abs().max() / ours.abs().max())


# --------------------------------------------------------------------------- recipe -> mergekit


@needs_mergekit
@pytest.mark.slow  # the module's mergekit-multi build (the `built` fixture)
@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_ties_dense", *NEW])
def test_written_config_builds_the_in_memory_merge(name, three, built):
    r = parity_recipes(three)[name]
    cfg = yaml.safe_load(built[f"recipe_{name}.yaml"].read_text())
    assert len(cfg["slices"]) == 2 and [s["layer_range"] for s in cfg["slices"][1]["sources"]][0] == [2, 4]
    assert cfg.get("base_model") == (r.sources[r.base] if r.base is not None else None) and cfg["dtype"] == "float32"
    if r.spec.takes_base and r.base is not None:  # the base closes every slice, without parameters (mergekit-evolve's)
        assert all(sl["sources"][-1] == {"model": three[0], "layer_range": sl["sources"][0]["layer_range"]}
                   for sl in cfg["slices"])
    sources = SourcePool.load(list(r.sources))
    ours = logits_of(recipe_model(r, sources))
    d = rel(ours, theirs(built[f"recipe_{name}"]))
    print(f"{name}: relative max|dlogit| vs mergekit {d:.3g}")
    assert d < TOL, d
    assert min(rel(ours, logits_of(s.model)) for s in sources.sources) > 0.01  # a merge, not one source's copy
    assert import_mergekit(built[f"recipe_{name}.yaml"]).key() == r.key()


@needs_mergekit
@pytest.mark.slow  # the module's mergekit-multi build (the `built` fixture)
@pytest.mark.parametrize("name", list(ENDS))
def test_a_recipe_with_ends_is_written_with_one_layer_gradient_slices(name, three, built):
    r = ends_recipes(three)[name]
    cfg = yaml.safe_load(built[f"recipe_{name}.yaml"].read_text())
    assert [s["sources"][0]["layer_range"] for s in cfg["slices"]] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    ours = logits_of(recipe_model(r, SourcePool.load(list(r.sources))))
    d = rel(ours, theirs(built[f"recipe_{name}"]))
    print(f"{name}: relative max|dlogit| vs mergekit {d:.3g}")
    assert d < TOL, d
    assert import_mergekit(built[f"recipe_{name}.yaml"]).key() == r.key()
    plain = replace(r, ends=False, weights=tuple(row[1:-1] for row in r.weights), filtered=tuple(
        tuple(row[1:-1] for row in b) for b in r.filtered), densities=tuple(row[1:-1] for row in r.densities))
    assert rel(ours, logits_of(recipe_model(plain, SourcePool.load(list(r.sources))))) > 1e-3  # the ends matter


@pytest.mark.slow
@needs_mergekit
def test_mergekit_yaml_builds_a_written_ties_config(three, pool, tmp_path):
    r = parity_recipes(three)["ties"]
    cfg = write_mergekit_config(r, tmp_path / "ties.yaml")  # a Recipe dispatches to write_recipe_config
    with pytest.raises(ExportError, match="already exists"):
        write_mergekit_config(r, cfg)
    done = subprocess.run([str(BIN / "mergekit-yaml"), str(cfg), str(tmp_path / "built"), "--quiet", "--no-cuda"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    d = rel(logits_of(recipe_model(r, pool)), theirs(tmp_path / "built"))
    print(f"ties via mergekit-yaml: relative max|dlogit| {d:.3g}")
    assert d < TOL, d


# --------------------------------------------------------------------------- mergekit -> recipe -> mergekit


@pytest.mark.slow  # the module's mergekit-multi build (the `built` fixture)
@needs_mergekit
@pytest.mark.parametrize("name", list(EXPECTED))
def test_imported_config_merges_like_mergekit_and_round_trips(name, three, built):
    r = import_mergekit(built[f"hand_{name}.yaml"])
    assert isinstance(r, Recipe)
    groups, weights, densities = EXPECTED[name]
    assert r.layer_groups == groups
    assert [list(row) for row in r.weights] == [pytest.approx(row) for row in weights]
    assert [list(row) for row in r.densities] == [pytest.approx(row) for row in densities]
    data = hand_written(three)[name]
    assert r.sources[0] == data.get("base_model", r.sources[0]) and set(r.sources) <= set(three)
    assert r.base == (0 if "base_model" in data else None)
    if name == "neuralpipe_slerp":  # the filters' gradients, layer by layer
        assert r.filters == ("self_attn", "mlp")
        third = 0.5 * 2 / 3 + 0.3 / 3  # [0, 0.5, 0.3, 0.7, 1] at t = 1/3 (position 4/3), and its mirror
        assert [list(b[0]) for b in r.filtered] == [pytest.approx([0, third, 1 - third, 1]),
                                                    pytest.approx([1, 1 - third, third, 0])]
    pool = SourcePool.load(list(r.sources))
    ours = logits_of(recipe_model(r, pool))
    d_hand, d_back = rel(ours, theirs(built[f"hand_{name}"])), rel(ours, theirs(built[f"back_{name}"]))
    print(f"{name}: relative max|dlogit| vs the hand-written config {d_hand:.3g}, vs its export {d_back:.3g}")
    assert d_hand < TOL and d_back < TOL, (d_hand, d_back)
    assert import_mergekit(built[f"back_{name}.yaml"]).key() == r.key()


def test_a_slice_repeating_a_default_is_one_merge(three, tmp_path):
    """`normalize: true` on one slice and nothing on the other is mergekit's default twice: one recipe."""
    a, b, _ = three
    cfg = write_yaml(tmp_path / "n.yaml", {"merge_method": "ties", "base_model": a, "slices": [
        {"parameters": {"normalize": True},
         "sources": [{"model": b, "layer_range": [0, 2], "parameters": {"weight": 0.5, "density": 0.4}},
                     {"model": a, "layer_range": [0, 2]}]},
        {"sources": [{"model": b, "layer_range": [2, 4], "parameters": {"weight": 0.5, "density": 0.4}},
                     {"model": a, "layer_range": [2, 4]}]}]})
    r = import_mergekit(cfg)
    assert r.normalize is True and r.layer_groups == 2 and r.weights == ((0.5, 0.5),) and r.sources == (a, b)


def test_sources_given_reorder_the_recipe(three, tmp_path):
    a, b, c = three
    cfg = write_yaml(tmp_path / "t.yaml", hand_written(three)["models_ties"])
    r = import_mergekit(cfg, sources=[c, a, b])
    assert r.sources == (c, a, b) and r.base == 1 and r.merged == (0, 2)
    assert [list(row) for row in r.weights] == [[0.4], [0.6]]
    with pytest.raises(GenomeError, match="is not one of the sources"):
        import_mergekit(cfg, sources=[a, b])


# --------------------------------------------------------------------------- DARE


def dare_recipe(src: list[str], method: str, seed: int) -> Recipe:
    return Recipe(tuple(src), 4, method, 0, 2, ((0.6, 0.4), (0.5, 0.8)), ((0.5, 0.7), (0.3, 0.9)), seed=seed)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_seeded(method, three, pool, tmp_path):
    def state(seed: int) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in recipe_model(dare_recipe(three, method, seed), pool).named_parameters()}

    one, again, other = state(3), state(3), state(4)
    assert all(torch.equal(one[n], again[n]) for n in one)
    assert sum(not torch.equal(one[n], other[n]) for n in one) > len(one) // 2
    cfg = write_recipe_config(dare_recipe(three, method, 3), tmp_path / "dare.yaml")
    text = cfg.read_text()
    assert "mergekit cannot reproduce" in text and "seed 3" in text
    data = yaml.safe_load(text)
    assert data["parameters"] == {"normalize": False, "rescale": True}
    assert import_mergekit(cfg).key() == dare_recipe(three, method, 0).key()  # a config has no seed


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_keeps_the_density_fraction_and_the_l1_norm(method, density):
    torch.manual_seed(0)
    base, x = torch.randn(256, 256), torch.randn(256, 256)
    out = merge_tensor(METHODS[method], [x], [1.0], base=base, densities=[density],
                       generator=tensor_generator(5, "model.layers.0.mlp.up_proj.weight"))
    delta, kept = x - base, out - base
    fraction = float((kept != 0).sum() / (delta != 0).sum())
    assert abs(fraction - density) < 0.02, fraction
    assert float(kept.abs().sum() / delta.abs().sum()) == pytest.approx(1.0, rel=1e-4)  # rescale: L1 norm kept


# --------------------------------------------------------------------------- the new methods' arithmetic


def test_pruning_and_interpolations_equal_mergekits_functions():
    """Breadcrumbs' and DELLA's pruning (DELLA's mask drawn from a generator in the state of mergekit's global
    one, the rank kept or not), slerp and nuslerp, tensor by tensor against mergekit's own functions (model
    stock, whose function takes mergekit's tensor groups, is compared on whole models)."""
    from mergekit.merge_methods.nuslerp import nuslerp as mk_nuslerp
    from mergekit.merge_methods.slerp import slerp as mk_slerp
    from mergekit.sparsify import RescaleNorm, della_magprune, magnitude_outliers

    from dfs_merge.merging.methods import (
        della_prune,
        della_rank,
        magnitude_rank,
        nuslerp,
        outliers_prune,
        slerp,
    )

    torch.manual_seed(0)
    delta = torch.randn(64, 48)
    for density, gamma, rescale in ((0.5, 0.01, False), (0.3, 0.1, True), (0.95, 0.2, False)):
        theirs = magnitude_outliers(delta, density, RescaleNorm.l1 if rescale else None, gamma)
        assert torch.equal(outliers_prune(delta, density, gamma, rescale), theirs)
        assert torch.equal(outliers_prune(delta, density, gamma, rescale, magnitude_rank(delta, descending=False)), theirs)
    for shape in ((64, 48), (48,)):
        d = torch.randn(*shape)
        for density, eps in ((0.5, 0.15), (0.3, 0.2)):
            torch.manual_seed(7)
            theirs = della_magprune(d, density, eps, RescaleNorm.l1)
            ours = della_prune(d, density, eps, True, torch.Generator().manual_seed(7))
            kept = della_prune(d, density, eps, True, torch.Generator().manual_seed(7), della_rank(d))
            assert torch.equal(ours, theirs) and torch.equal(kept, theirs)
    a, b = torch.randn(32, 16), torch.randn(32, 16)
    for t in (0.0, 0.3, 1.0):
        for v1 in (b, 2 * a, -a):  # spherical, parallel and antiparallel (linear)
            theirs = mk_slerp(torch.tensor([t]), a.unsqueeze(0), v1.unsqueeze(0))[0]
            assert torch.allclose(slerp(t, a, v1), theirs, rtol=1e-6, atol=1e-7)
        for dim, flatten in ((-1, True), (-1, False), (0, False)):
            assert torch.equal(nuslerp(t, a, b, dim, flatten), mk_nuslerp(t, a, b, dim=dim, flatten=flatten))


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_is_seeded_and_keeps_the_density_fraction_and_the_l1_norm(method):
    torch.manual_seed(0)
    base, x = torch.randn(256, 256), torch.randn(256, 256)
    name = "model.layers.0.mlp.up_proj.weight"

    def merged(seed: int, density: float) -> torch.Tensor:
        return merge_tensor(METHODS[method], [x], [1.0], base=base, densities=[density],
                            generator=tensor_generator(seed, name), options={"epsilon": 0.1})

    assert torch.equal(merged(5, 0.5), merged(5, 0.5)) and not torch.equal(merged(5, 0.5), merged(6, 0.5))
    for density in (0.3, 0.7):
        delta, kept = x - base, merged(5, density) - base
        fraction = float((kept != 0).sum() / (delta != 0).sum())
        assert abs(fraction - density) < 0.02, fraction
        assert float(kept.abs().sum() / delta.abs().sum()) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("method", ["breadcrumbs_ties", "della"])
def test_the_resident_model_with_kept_ranks_merges_as_a_one_off_merge(method, three, pool):
    """Ranks kept between candidates (the search's path) give the merge that pruning from scratch gives."""
    from dfs_merge.merging.blend import Blender

    blender = Blender(pool)
    for densities in (((0.5, 0.7), (0.3, 0.6)), ((0.6, 0.4), (0.8, 0.5))):
        r = Recipe(tuple(three), 4, method, 0, 2, ((0.5, 0.2), (0.3, 0.9)), densities, seed=3)
        kept = {n: p.detach().clone() for n, p in blender.apply(r).named_parameters()}
        once = dict(recipe_model(r, pool).named_parameters())
        assert all(torch.equal(kept[n], once[n]) for n in once)
    assert blender.kept_bytes > 0


# --------------------------------------------------------------------------- refusals


def refusals(src: list[str]) -> dict[str, dict]:
    a, b, c = src

    def ties_slices(entries_0, entries_1=None, **top):
        return {"merge_method": "ties", "base_model": a, **top,
                "slices": [{"sources": entries_0}, *([{"sources": entries_1}] if entries_1 else [])]}

    def entry(m, rng, **p):
        return {"model": m, "layer_range": rng, **({"parameters": p} if p else {})}

    return {
        "'sce', which is not supported": {"merge_method": "sce", "base_model": a,
                                          "models": [{"model": b}, {"model": c}]},
        "'karcher', which is not supported": {"merge_method": "karcher", "models": [{"model": b}, {"model": c}]},
        # bad values: slerp over three models, t outside [0, 1] (a gradient's too), one gamma per merge
        "method slerp merges exactly 1 model besides the base; this recipe has 2": {
            "merge_method": "slerp", "base_model": a, "models": [{"model": b}, {"model": c}], "parameters": {"t": 0.5}},
        "t 1.5 is outside [0, 1]": {"merge_method": "slerp", "base_model": a,
                                    "slices": [{"sources": [entry(a, [0, 4]), entry(b, [0, 4])]}],
                                    "parameters": {"t": [{"filter": "mlp", "value": 1.5}, {"value": 0.5}]}},
        "t -0.5 is outside [0, 1]": {"merge_method": "slerp", "base_model": a, "models": [{"model": b}],
                                     "parameters": {"t": [-0.5, 1, -0.5]}},
        "parameters.t: a shared parameter": {"merge_method": "slerp", "base_model": a,
                                             "models": [{"model": b, "parameters": {"t": 0.5}}]},
        "a recipe has one gamma for the whole merge": {
            "merge_method": "breadcrumbs", "base_model": a,
            "models": [{"model": b, "parameters": {"weight": 0.5, "density": 0.5, "gamma": 0.02}},
                       {"model": c, "parameters": {"weight": 0.5, "density": 0.5}}]},
        "DELLA needs density +- epsilon within (0, 1)": {
            "merge_method": "della", "base_model": a, "parameters": {"epsilon": 0.3},
            "models": [{"model": b, "parameters": {"weight": 0.5, "density": 0.8}}]},
        "model_stock merges at least 2 models besides the base": {
            "merge_method": "model_stock", "base_model": a, "models": [{"model": b}]},
        "filters give the tensors of layer 0 different values": {  # a recipe filters weights, not densities
            "merge_method": "ties", "base_model": a,
            "models": [{"model": b, "parameters": {"weight": 0.5,
                                                   "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}]}}]},
        "layer_range [0, 2] differs": ties_slices([entry(b, [0, 4], weight=0.5), entry(a, [0, 2])]),
        "parameters.gamma": ties_slices([entry(b, [0, 4], weight=0.5, gamma=0.1), entry(a, [0, 4])]),
        "parameters.rescale": ties_slices([entry(b, [0, 4], weight=0.5), entry(a, [0, 4])],
                                          parameters={"rescale": True}),
        "needs a base_model": {"merge_method": "ties", "models": [{"model": b, "parameters": {"weight": 1.0}}]},
        "modules": {"merge_method": "linear", "modules": {"decoder": {"models": [{"model": a}]}}},
        "no weight for model": {"merge_method": "linear", "base_model": a,
                                "models": [{"model": b, "parameters": {"weight": 1.0}}]},
        "is not among its sources": ties_slices([entry(b, [0, 2], weight=0.5), entry(c, [0, 2], weight=0.5),
                                                 entry(a, [0, 2])],
                                                [entry(b, [2, 4], weight=0.5), entry(a, [2, 4])]),
        "tokenizer_source 'union'": {"merge_method": "linear", "tokenizer_source": "union",
                                     "models": [{"model": b, "parameters": {"weight": 1.0}}]},
        "slices[1].parameters.lambda: 2.0 differs": {"merge_method": "ties", "base_model": a, "slices": [
            {"sources": [entry(b, [0, 2], weight=0.5), entry(a, [0, 2])]},
            {"parameters": {"lambda": 2.0}, "sources": [entry(b, [2, 4], weight=0.5), entry(a, [2, 4])]}]},
        "must start at layer 2": ties_slices([entry(b, [0, 2], weight=0.5), entry(a, [0, 2])],
                                             [entry(b, [0, 2], weight=0.5), entry(a, [0, 2])]),
    }


def test_what_a_recipe_cannot_express_is_one_line(three, tmp_path):
    for needle, data in refusals(three).items():
        path = write_yaml(tmp_path / "cfg.yaml", data)
        with pytest.raises(GenomeError) as err:
            import_mergekit(path)
        msg = str(err.value)
        assert "\n" not in msg and needle in msg, (needle, msg)
        if "which is not supported" in needle:
            assert SUPPORTED in msg, msg


def test_cli_refuses_an_unsupported_method(three, tmp_path):
    for method in ("sce", "karcher"):
        cfg = write_yaml(tmp_path / f"{method}.yaml", refusals(three)[f"'{method}', which is not supported"])
        res = run_cli("import-mergekit", cfg, "--out", tmp_path / "g.genome.yaml")
        assert_refused(res, f"merge_method is '{method}'", SUPPORTED)
        assert not (tmp_path / "g.genome.yaml").exists()


def test_bad_slerp_input_is_one_line_and_exit_2(three, tmp_path):
    """Slerp over three models, t outside [0, 1], a row of the wrong length: in a mergekit config, a recipe file
    and the run config, each one line (exit 2 from the CLI)."""
    table = refusals(three)
    for needle in ("method slerp merges exactly 1 model besides the base", "t 1.5 is outside [0, 1]"):
        cfg = write_yaml(tmp_path / "slerp.yaml", table[next(k for k in table if k.startswith(needle))])
        assert_refused(run_cli("import-mergekit", cfg, "--out", tmp_path / "g.recipe.yaml"), needle)
        assert not (tmp_path / "g.recipe.yaml").exists()
    good = Recipe(tuple(three[:2]), 4, "slerp", 0, 2, ((0.3, 0.8),))
    save_genome(good, tmp_path / "good.recipe.yaml")
    data = yaml.safe_load((tmp_path / "good.recipe.yaml").read_text())
    assert data["weights"] == {1: [0.3, 0.8]} and "normalize" not in data and "lambda" not in data
    bad = {"three sources": ({**data, "sources": data["sources"] + [{"path": three[2], "layers": 4}]},
                             "method slerp merges exactly 1 model besides the base; this recipe has 2"),
           "t outside": ({**data, "weights": {1: [0.3, 1.2]}}, "weights[1][1]: t 1.2 is outside [0, 1]"),
           "wrong length": ({**data, "weights": {1: [0.3, 0.5, 0.8]}},
                            "weights[1]: expected 2 values (one per layer group), got 3"),
           "filter wrong length": ({**data, "filters": {"mlp": {1: [0.5]}}},
                                   "filters.mlp[1]: expected 2 values (one per layer group), got 1")}
    for name, (content, needle) in bad.items():
        path = write_yaml(tmp_path / f"{name.replace(' ', '_')}.recipe.yaml", content)
        assert_refused(run_cli("show", path), needle)
    with pytest.raises(GenomeError, match=r"^method slerp merges exactly 1 model besides the base"):
        Recipe(tuple(three), 4, "slerp", 0, 1, ((0.5,), (0.5,)))
    with pytest.raises(GenomeError, match=r"merge.weight_range: \[2.0, 3.0\] leaves no value method slerp takes"):
        good.bounds((2.0, 3.0), (0.1, 1.0))
    cfg = {"sources": list(three), "tasks": {"x": 1.0}, "merge": {"method": "slerp", "base": 0}}
    path = write_yaml(tmp_path / "run.yaml", cfg)
    assert_refused(run_cli("evolve", path), "merge: method slerp merges exactly 1 model besides the base")
