"""Parameter-space recipes against mergekit 0.1.5: the config `write_recipe_config` writes builds, with
mergekit, the model `recipe_model` merges in memory; mergekit configs read by `import_mergekit` (models and
slices forms, gradients, uneven slices) merge in memory as mergekit builds them, and write back to configs
that build the same; DARE's masks are seeded; what a recipe cannot express is refused with one line.

Three random tiny Llama sources (hidden 48, 4 layers, fp32). Every mergekit build of the module runs in one
`mergekit-multi` process (the same `run_merge` as `mergekit-yaml`, one interpreter start instead of ten);
one test runs `mergekit-yaml` itself on a written config.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from builders import assert_refused, run_cli, save_source, tiny_llama_config

from dfs_merge.errors import ExportError, GenomeError
from dfs_merge.export.mergekit import import_mergekit, write_mergekit_config, write_recipe_config
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
SUPPORTED = "supported: passthrough, linear, task_arithmetic, ties, dare_linear, dare_ties"
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
    }


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
    "uneven_linear": (4, [[0.2, 0.6, 0.6, 0.6], [0.5, 0.1, 0.1, 0.1], [0.3] * 4], []),
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
    for name, r in parity_recipes(three).items():
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
@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_ties_dense"])
def test_written_config_builds_the_in_memory_merge(name, three, pool, built):
    r = parity_recipes(three)[name]
    cfg = yaml.safe_load(built[f"recipe_{name}.yaml"].read_text())
    assert len(cfg["slices"]) == 2 and [s["layer_range"] for s in cfg["slices"][1]["sources"]][0] == [2, 4]
    assert cfg["base_model"] == three[0] and cfg["dtype"] == "float32"
    if name != "linear":  # the base closes every slice, without parameters (mergekit-evolve's layout)
        assert all(sl["sources"][-1] == {"model": three[0], "layer_range": sl["sources"][0]["layer_range"]}
                   for sl in cfg["slices"])
    d = rel(logits_of(recipe_model(r, pool)), theirs(built[f"recipe_{name}"]))
    print(f"{name}: relative max|dlogit| vs mergekit {d:.3g}")
    assert d < TOL, d
    assert import_mergekit(built[f"recipe_{name}.yaml"]).key() == r.key()


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
    assert r.sources == tuple(three) and r.base == (None if name == "gradient_linear" else 0)
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


# --------------------------------------------------------------------------- refusals


def refusals(src: list[str]) -> dict[str, dict]:
    a, b, c = src

    def ties_slices(entries_0, entries_1=None, **top):
        return {"merge_method": "ties", "base_model": a, **top,
                "slices": [{"sources": entries_0}, *([{"sources": entries_1}] if entries_1 else [])]}

    def entry(m, rng, **p):
        return {"model": m, "layer_range": rng, **({"parameters": p} if p else {})}

    return {
        "'slerp', which is not supported": {"merge_method": "slerp", "base_model": a,
                                            "slices": [{"sources": [entry(a, [0, 4]), entry(b, [0, 4])]}],
                                            "parameters": {"t": 0.5}},
        "'model_stock', which is not supported": {"merge_method": "model_stock", "base_model": a,
                                                  "models": [{"model": b}, {"model": c}]},
        "'nuslerp', which is not supported": {"merge_method": "nuslerp", "models": [{"model": b}, {"model": c}]},
        "final norm and LM head": {"merge_method": "linear",
                                   "models": [{"model": a, "parameters": {"weight": [0.2, 0.8]}},
                                              {"model": b, "parameters": {"weight": 0.5}}]},
        "filters give the tensors of layer 0 different values": {
            "merge_method": "task_arithmetic", "base_model": a,
            "models": [{"model": b, "parameters": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}]}}]},
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
        "merges the embeddings of": {
            "merge_method": "task_arithmetic", "base_model": a,
            "models": [{"model": b, "parameters": {"weight": [{"filter": "embed_tokens", "value": 0.1}, {"value": 0.5}]}}]},
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
    for method in ("slerp", "model_stock"):
        cfg = write_yaml(tmp_path / f"{method}.yaml", refusals(three)[f"'{method}', which is not supported"])
        res = run_cli("import-mergekit", cfg, "--out", tmp_path / "g.genome.yaml")
        assert_refused(res, f"merge_method is '{method}'", SUPPORTED)
        assert not (tmp_path / "g.genome.yaml").exists()
