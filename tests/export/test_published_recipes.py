"""Published frankenmerge recipes, as their authors wrote them, imported and checked against mergekit's build.

The recipes name their models `org/name`. Each name is a tiny random model of the recipe's architecture
(Llama or Mistral, seeded by the name) in a temporary Hugging Face cache laid out as huggingface_hub lays
it out (`models--org--name/snapshots/<commit>/`, `refs/main`), which `HF_HUB_CACHE` points to: the names
are resolved as a user's would be, through the cache, with `HF_HUB_OFFLINE=1`.

The stand-ins have 1/f of the real model's layers and the recipes' layer ranges are scaled by the same f
(`shrink`): a boundary b becomes round(b / f), half up, except b = 1 and b = L - 1, which stay one layer
from the ends (the one-layer end slices of miquliz). f is chosen per recipe so that the scaled slices keep
their overlaps and gaps.

Each recipe is imported (`import_mergekit`), exported (`export_checkpoint`, verified against the stitched
model) and compared with mergekit's build of the same YAML (`run_merge`, what `mergekit-yaml` runs) in
fp32, within 1e-4 relative logits. For mergekit the names are replaced by their cache folders (mergekit
0.1.5 asks the Hub for a name even when it is cached, which fails offline) and `dtype` is set to float32;
`tokenizer_source: model:NAME` (the older mergekit syntax recipes use) becomes the folder too, as mergekit
0.1.5 reads it as a path. The recipes that no route expresses are refused in one line, which is asserted.
The parameter-space recipes (slerp's with filtered gradients of t) are imported as recipes, exported and
compared the same way.
"""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from builders import (
    assert_refused,
    build_tokenizer,
    mergekit_writes_full_attention_layer_types,
    mergekit_yaml,
    run_cli,
    save_source,
    tiny_llama_config,
)

from dfs_merge.config import ConstraintsConfig
from dfs_merge.errors import ExportError, GenomeError, SourceError
from dfs_merge.export.checkpoint import export_checkpoint
from dfs_merge.export.mergekit import import_mergekit, write_mergekit_config
from dfs_merge.genome import Genome, Route
from dfs_merge.genome_files import genome_to_dict, load_genome, save_genome
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.sources import SourcePool

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOL = 1e-4
IDS = torch.tensor([[(5 + 41 * i) % 300 for i in range(24)], [(9 + 13 * i) % 300 for i in range(24)]])

# --------------------------------------------------------------------------- the recipes, as published

def stack(slices: list[tuple[str, int, int]], dtype: str) -> str:
    """A passthrough recipe of one-model slices `(model, start, end)`, in the key order of mergekit's model cards."""
    body = "".join(f"- sources:\n  - layer_range: [{a}, {b}]\n    model: {m}\n" for m, a, b in slices)
    return f"dtype: {dtype}\nmerge_method: passthrough\nslices:\n{body}"


def self_stack(model: str, ranges: list[tuple[int, int]], dtype: str) -> str:
    """A recipe that stacks slices of one model (mlabonne's, Eric Hartford's, elinas' and Na0s' configs)."""
    return stack([(model, a, b) for a, b in ranges], dtype)


# Goliath's card lists its ranges (Xwin 0-16, Euryale 8-24, Xwin 17-32, ...): that list as the config.
GOLIATH = stack([("Xwin-LM/Xwin-LM-70B-V0.1" if k % 2 == 0 else "Sao10K/Euryale-1.3-L2-70B", a, b) for k, (a, b) in
                 enumerate([(0, 16), (8, 24), (17, 32), (25, 40), (33, 48), (41, 56), (49, 64), (57, 72), (65, 80)])],
                "float16")
LLAMA3_120B = self_stack("meta-llama/Meta-Llama-3-70B-Instruct", [(i, i + 20) for i in range(0, 61, 10)], "float16")
MEGADOLPHIN = self_stack("cognitivecomputations/dolphin-2.2-70b", [(i, i + 20) for i in range(0, 61, 10)], "float16")
BIGSTRAL = self_stack("mistralai/Mistral-7B-Instruct-v0.2", [(i, i + 8) for i in range(0, 25, 4)], "bfloat16")
LLAMA3_13B = self_stack("meta-llama/Meta-Llama-3-8B-Instruct",
                        [(0, 10), (5, 15), (10, 20), (15, 25), (20, 25), (22, 32)], "bfloat16")
PRUNED = self_stack("meta-llama/Meta-Llama-3.1-8B", [(0, 23), (28, 32)], "bfloat16")

SOLAR = """\
slices:
  - sources:
    - model: mistralai/Mistral-7B-v0.1
      layer_range: [0, 24]
  - sources:
    - model: mistralai/Mistral-7B-v0.1
      layer_range: [8, 32]
merge_method: passthrough
dtype: bfloat16
"""

ZERO_WRITERS = """\
      parameters:
        scale:
          - filter: o_proj
            value: 0.0
          - filter: down_proj
            value: 0.0
          - value: 1.0
"""
LLAMA_PRO = "slices:\n" + "".join(
    f"  - sources:\n    - model: openchat/openchat-3.5-0106\n      layer_range: [{i}, {i + 4}]\n"
    f"  - sources:\n    - model: openchat/openchat-3.5-0106\n      layer_range: [{i + 3}, {i + 4}]\n" + ZERO_WRITERS
    for i in range(0, 32, 4)
) + "merge_method: passthrough\ndtype: bfloat16\n"

ORCAMINI_PLATY = """\
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
"""

NEURALPIPE = """\
slices:
  - sources:
    - model: OpenPipe/mistral-ft-optimized-1218
      layer_range: [0, 32]
  - sources:
    - model: mlabonne/NeuralHermes-2.5-Mistral-7B
      layer_range: [24, 32]
merge_method: passthrough
dtype: bfloat16
"""

MIQULIZ = """\
dtype: float16
merge_method: linear
parameters:
  weight: 1.0
slices:
  - sources:
      - model: 152334H/miqu-1-70b-sf
        layer_range: [0, 1]
      - model: lizpreciatior/lzlv_70b_fp16_hf
        layer_range: [0, 1]
        parameters:
          weight: 0
  - sources:
      - model: 152334H/miqu-1-70b-sf
        layer_range: [1, 20]
  - sources:
      - model: lizpreciatior/lzlv_70b_fp16_hf
        layer_range: [10, 30]
  - sources:
      - model: 152334H/miqu-1-70b-sf
        layer_range: [20, 40]
  - sources:
      - model: lizpreciatior/lzlv_70b_fp16_hf
        layer_range: [30, 50]
  - sources:
      - model: 152334H/miqu-1-70b-sf
        layer_range: [40, 60]
  - sources:
      - model: lizpreciatior/lzlv_70b_fp16_hf
        layer_range: [50, 70]
  - sources:
      - model: 152334H/miqu-1-70b-sf
        layer_range: [60, 79]
  - sources:
      - model: 152334H/miqu-1-70b-sf
        layer_range: [79, 80]
      - model: lizpreciatior/lzlv_70b_fp16_hf
        layer_range: [79, 80]
        parameters:
          weight: 0
tokenizer_source: model:152334H/miqu-1-70b-sf
"""

GRADIENT_SLERP = """\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""

NEURALPIPE_SLERP = """\
slices:
  - sources:
      - model: OpenPipe/mistral-ft-optimized-1218
        layer_range: [0, 32]
      - model: mlabonne/NeuralHermes-2.5-Mistral-7B
        layer_range: [0, 32]
merge_method: slerp
base_model: OpenPipe/mistral-ft-optimized-1218
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""

# mergekit's own examples (arcee-ai/mergekit, examples/ties.yml at a9e23f0, linear.yml at bc62b54, bio-merge.yml
# at 7ee1c40), verbatim: gradients of density and weight, a filtered weight, int8_mask
MERGEKIT_TIES = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

MERGEKIT_LINEAR = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""

BIO_MERGE = """\
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.5
      weight: 0.5
  - model: BioMistral/BioMistral-7B
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true
dtype: float16
"""

# name -> (its architecture, its real layer count)
MODELS = {
    "Xwin-LM/Xwin-LM-70B-V0.1": ("llama", 80),
    "Sao10K/Euryale-1.3-L2-70B": ("llama", 80),
    "meta-llama/Meta-Llama-3-70B-Instruct": ("llama", 80),
    "cognitivecomputations/dolphin-2.2-70b": ("llama", 80),
    "mistralai/Mistral-7B-Instruct-v0.2": ("mistral", 32),
    "mistralai/Mistral-7B-v0.1": ("mistral", 32),
    "meta-llama/Meta-Llama-3-8B-Instruct": ("llama", 32),
    "meta-llama/Meta-Llama-3.1-8B": ("llama", 32),
    "openchat/openchat-3.5-0106": ("mistral", 32),
    "psmathur/orca_mini_v3_13b": ("llama", 40),
    "garage-bAInd/Platypus2-13B": ("llama", 40),
    "OpenPipe/mistral-ft-optimized-1218": ("mistral", 32),
    "mlabonne/NeuralHermes-2.5-Mistral-7B": ("mistral", 32),
    "152334H/miqu-1-70b-sf": ("llama", 80),
    "lizpreciatior/lzlv_70b_fp16_hf": ("llama", 80),
    "TheBloke/Llama-2-13B-fp16": ("llama", 40),
    "WizardLM/WizardMath-13B-V1.0": ("llama", 40),
    "WizardLM/WizardLM-13B-V1.2": ("llama", 40),
    "BioMistral/BioMistral-7B": ("mistral", 32),
}

# recipe -> (published YAML, shrink factor f, the route it imports to (scaled), embed, head, tokenizer source)
BUILT = {
    "goliath-120b": (GOLIATH, 8, "0:0-1, 1:1-2, 0:2-3, 1:3-4, 0:4-5, 1:5-6, 0:6-7, 1:7-8, 0:8-9", 0, 0, 0),
    "Meta-Llama-3-120B-Instruct": (LLAMA3_120B, 10, "0:0-1, 0:1-2, 0:2-3, 0:3-4, 0:4-5, 0:5-6, 0:6-7", 0, 0, 0),
    "MegaDolphin-120b": (MEGADOLPHIN, 10, "0:0-1, 0:1-2, 0:2-3, 0:3-4, 0:4-5, 0:5-6, 0:6-7", 0, 0, 0),
    "bigstral-12b-32k": (BIGSTRAL, 4, "0:0-1, 0:1-2, 0:2-3, 0:3-4, 0:4-5, 0:5-6, 0:6-7", 0, 0, 0),
    "SOLAR depth up-scaling": (SOLAR, 4, "0:0-5, 0:2-7", 0, 0, 0),
    "Llama-3-13B-Instruct": (LLAMA3_13B, 2, "0:0-4, 0:3-7, 0:5-9, 0:8-12, 0:10-12, 0:11-15", 0, 0, 0),
    "Llama-3.1-8B-Pruned-4-Layers": (PRUNED, 4, "0:0-5, 0:7", 0, 0, 0),
    "orcamini-platy-44layer": (ORCAMINI_PLATY, 4, "0:0-5, 1:5-9", 0, 1, 0),
    "NeuralPipe-9B-merged": (NEURALPIPE, 4, "0:0-7, 1:6-7", 0, 1, 0),
    "miquliz-120b-v2.0": (MIQULIZ, 5, "0:0-3, 1:2-5, 0:4-7, 1:6-9, 0:8-11, 1:10-13, 0:12-15", 0, 0, 0),
}

# recipe -> (published YAML, f, the refusal's phrase)
REFUSED = {
    "LLaMA-Pro block expansion (OpenChat-3.5-0106 40 layers interleaved)": (
        LLAMA_PRO, 1, "slice 1 (openchat/openchat-3.5-0106 [3, 4]): scale 0 on the residual writers (self_attn.o_proj, "
                      "mlp.down_proj) makes output layer 4 an identity block"),
}

# parameter-space recipe -> (published YAML, f, its method, filters, layer groups: one per stand-in layer)
PS_BUILT = {
    "gradient-slerp": (GRADIENT_SLERP, 4, "slerp", ("self_attn", "mlp"), 10),
    "NeuralPipe-7B-slerp": (NEURALPIPE_SLERP, 4, "slerp", ("self_attn", "mlp"), 8),
    # gradients over all 10 stand-in layers, their t = 0 values at the embeddings and the head (ends)
    "mergekit examples/ties.yml": (MERGEKIT_TIES, 4, "ties", ("mlp",), 10),
    "mergekit examples/linear.yml": (MERGEKIT_LINEAR, 4, "linear", (), 1),
    "mergekit examples/bio-merge.yml": (BIO_MERGE, 4, "ties", (), 1),
}


def shrink(b: int, f: int, layers: int) -> int:
    """A layer boundary of a real model on its stand-in with 1/f of the layers (see the module docstring)."""
    if f > 1 and b == 1:
        return 1
    if f > 1 and b == layers - 1:
        return layers // f - 1
    return math.floor(b / f + 0.5)


def scaled(text: str, f: int) -> dict[str, Any]:
    """The recipe with every layer_range scaled to the stand-ins (names and everything else as published)."""
    data = yaml.safe_load(text)
    for sl in data.get("slices", []):
        for src in sl["sources"]:
            n = MODELS[src["model"]][1]
            src["layer_range"] = [shrink(b, f, n) for b in src["layer_range"]]
    return data


def for_mergekit(data: dict[str, Any], cache: Path, dtype: str | None = "float32") -> dict[str, Any]:
    """The same recipe for mergekit 0.1.5 offline: names as their cache folders (`tokenizer_source: model:NAME`
    too), `dtype` replaced."""
    out = copy.deepcopy(data)
    for src in [*(src for sl in out.get("slices", []) for src in sl["sources"]), *out.get("models", [])]:
        src["model"] = str(snapshot(cache, src["model"]))
    for key in ("base_model", "tokenizer_source"):
        value = out.get(key)
        if isinstance(value, str) and value.removeprefix("model:") in MODELS:
            out[key] = str(snapshot(cache, value.removeprefix("model:")))
    if dtype is not None:
        out["dtype"] = dtype
    return out


def snapshot(cache: Path, name: str) -> Path:
    """Where huggingface_hub keeps `name`'s files in `cache`."""
    return cache / f"models--{name.replace('/', '--')}" / "snapshots" / COMMIT


def write(folder: Path, name: str, data: dict[str, Any]) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / a.abs().max())


def stand_in(arch: str, layers: int, tokenizer: Any, seed: int) -> Any:
    """A tiny random model of `arch` with `layers` decoder layers."""
    from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tiny_llama_config(len(tokenizer))
        cfg.num_hidden_layers = layers
        return LlamaForCausalLM(cfg).eval()
    cfg = MistralConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=4096,
                        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return MistralForCausalLM(cfg).eval()


def factors() -> dict[str, int]:
    """Each stand-in's shrink factor: the f of the recipes that name it (one f per name)."""
    out: dict[str, int] = {}
    for text, f, *_ in [*BUILT.values(), *REFUSED.values(), *PS_BUILT.values()]:
        data = yaml.safe_load(text)
        names = [src["model"] for sl in data.get("slices", []) for src in sl["sources"]]
        names += [m["model"] for m in data.get("models", [])] + [data[k] for k in ("base_model",) if k in data]
        for name in names:
            assert out.setdefault(name, f) == f, name
    return out


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """Every name the recipes use as a stand-in in a Hugging Face cache, which HF_HUB_CACHE points to (offline)."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    tokenizer = build_tokenizer()
    shrunk = factors()
    for name, (arch, layers) in MODELS.items():
        folder = snapshot(cache, name)
        folder.mkdir(parents=True)
        save_source(stand_in(arch, layers // shrunk[name], tokenizer, zlib.crc32(name.encode())), tokenizer, folder)
        refs = folder.parent.parent / "refs"
        refs.mkdir()
        (refs / "main").write_text(COMMIT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("DFS_MERGE_ALLOW_DOWNLOAD", raising=False)
        yield cache


# --------------------------------------------------------------------------- the recipes against mergekit


@pytest.mark.parametrize("recipe", list(BUILT))
def test_published_recipe_builds_mergekits_model(recipe, hub_cache, tmp_path):
    text, f, route, embed, head, tokenizer = BUILT[recipe]
    published = scaled(text, f)
    g = import_mergekit(write(tmp_path, "recipe.yaml", published))
    assert g.decode().text() == route
    assert (g.embed_source, g.head_source, g.tokenizer_source) == (embed, head, tokenizer)
    assert g.dtype == g.out_dtype == published["dtype"]
    assert all("/" in s and not Path(s).exists() for s in g.sources)  # the names as written, resolved in the cache

    fp32 = import_mergekit(write(tmp_path, "fp32.yaml", {**published, "dtype": "float32"}))
    assert fp32.key() == g.key()
    pool = SourcePool.load(list(fp32.sources))
    ours = export_checkpoint(pool, fp32, tmp_path / "ours")  # verified against the stitched model
    theirs = mergekit_yaml(write(tmp_path, "mergekit.yaml", for_mergekit(published, hub_cache)), tmp_path / "theirs")
    diff = rel_diff(logits(theirs), logits(ours))
    print(f"\n{recipe}: {len(g.decode())} hops, max|Δlogit|/max|logit| vs mergekit-yaml = {diff:.2e}")
    assert diff <= TOL

    back = import_mergekit(write_mergekit_config(g, tmp_path / "back.yaml"))  # the writer's YAML, read back
    assert back.key() == g.key() and back.settings() == g.settings()


@pytest.mark.parametrize("recipe", list(PS_BUILT))
def test_published_parameter_space_recipe_builds_mergekits_model(recipe, hub_cache, tmp_path):
    """A slerp recipe with filtered t gradients: imported (t per layer and filter), exported as a checkpoint
    (verified against the in-memory merge) whose logits are mergekit-yaml's, and written back as a config that
    imports to the same recipe."""
    text, f, method, filters, groups = PS_BUILT[recipe]
    published = scaled(text, f)
    r = import_mergekit(write(tmp_path, "recipe.yaml", published))
    assert isinstance(r, Recipe) and (r.method, r.filters, r.layer_groups) == (method, filters, groups)
    pool = SourcePool.load(list(r.sources))
    ours = export_checkpoint(pool, r, tmp_path / "ours")
    theirs = mergekit_yaml(write(tmp_path, "mergekit.yaml", for_mergekit(published, hub_cache)), tmp_path / "theirs")
    diff = rel_diff(logits(theirs), logits(ours))
    print(f"\n{recipe}: {r.text()}, max|Δlogit|/max|logit| vs mergekit-yaml = {diff:.2e}")
    assert diff <= TOL
    assert import_mergekit(write_mergekit_config(r, tmp_path / "back.yaml")).key() == r.key()


@pytest.mark.parametrize("recipe", list(REFUSED))
def test_published_recipe_is_refused_in_one_line(recipe, hub_cache, tmp_path):
    text, f, phrase = REFUSED[recipe]
    path = write(tmp_path, "recipe.yaml", scaled(text, f))
    assert_refused(run_cli("import-mergekit", path, "--out", tmp_path / "g.yaml"), phrase)
    assert not (tmp_path / "g.yaml").exists()


def test_writer_round_trips_embeddings_head_and_tokenizer_through_mergekit(hub_cache, tmp_path):
    """orcamini-platy's head and miquliz's tokenizer_source, written back by `--format mergekit`: mergekit's
    build of dfs-merge's YAML is the model the genome exports."""
    for recipe in ("orcamini-platy-44layer", "miquliz-120b-v2.0"):
        text, f, *_ = BUILT[recipe]
        g = import_mergekit(write(tmp_path, "fp32.yaml", {**scaled(text, f), "dtype": "float32"}))
        cfg = write_mergekit_config(g, tmp_path / f"{recipe}.yaml")
        data = yaml.safe_load(cfg.read_text())
        assert data["dtype"] == "float32" and "out_dtype" not in data
        assert ("tokenizer_source" in data) == bool(g.tokenizer_source)
        ours = export_checkpoint(SourcePool.load(list(g.sources)), g, tmp_path / f"{recipe}-ours", verify=False)
        theirs = mergekit_yaml(cfg, tmp_path / f"{recipe}-theirs")
        assert rel_diff(logits(theirs), logits(ours)) <= TOL


def test_head_from_another_source_is_added_as_an_empty_slice(hub_cache, tmp_path):
    """A genome whose route ends in source 0 but whose head is source 1's: the writer appends an empty slice of
    source 1, and mergekit builds the same model."""
    a, b = "psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B"
    route = replace(Route.parse("1:0-2, 0:3-9", [1.0, 1.0, 1.0, 0.8] + [1.0] * 6), embed_source=1, head_source=1)
    g = Genome.from_route(route, [a, b], [10, 10], 2, constraints=ConstraintsConfig(pin_ends=False))
    cfg = write_mergekit_config(g, tmp_path / "m.yaml")
    ranges = [(s["sources"][0]["model"], s["sources"][0]["layer_range"]) for s in yaml.safe_load(cfg.read_text())["slices"]]
    assert ranges[-1] == (str(snapshot(hub_cache, b).resolve()), [0, 0])
    ours = export_checkpoint(SourcePool.load(list(g.sources)), g, tmp_path / "ours", verify=False)
    assert rel_diff(logits(mergekit_yaml(cfg, tmp_path / "theirs")), logits(ours)) <= TOL
    assert import_mergekit(cfg).key() == g.key()


# --------------------------------------------------------------------------- the settings mergekit users set


def test_bf16_recipe_gives_a_bf16_genome_and_mergekit_config(hub_cache, tmp_path):
    text, f, *_ = BUILT["bigstral-12b-32k"]
    recipe = write(tmp_path, "bigstral.yaml", scaled(text, f))
    done = run_cli("import-mergekit", recipe, "--out", tmp_path / "g.yaml")
    assert done.code == 0, done.err
    g = load_genome(tmp_path / "g.yaml")
    assert (g.dtype, g.out_dtype) == ("bfloat16", "bfloat16")
    assert "dtype: bfloat16" in run_cli("show", tmp_path / "g.yaml").out
    done = run_cli("export", tmp_path / "g.yaml", "--format", "mergekit", "--out", tmp_path / "cfg.yaml")
    assert done.code == 0, done.err
    data = yaml.safe_load((tmp_path / "cfg.yaml").read_text())
    assert data["dtype"] == "bfloat16" and "out_dtype" not in data
    save_genome(replace(g, dtype=None, out_dtype=None), tmp_path / "plain.yaml")
    for extra, want in (((), "float32"), (("--dtype", "bfloat16"), "bfloat16")):  # the sources' stored dtype; --dtype
        done = run_cli("export", tmp_path / "plain.yaml", "--format", "mergekit", "--out", tmp_path / "p.yaml",
                       "--force", *extra)
        assert done.code == 0, done.err
        assert yaml.safe_load((tmp_path / "p.yaml").read_text())["dtype"] == want

    fp32 = replace(g, dtype="float32", out_dtype="float16")
    data = yaml.safe_load(write_mergekit_config(fp32, tmp_path / "mixed.yaml").read_text())
    assert (data["dtype"], data["out_dtype"]) == ("float32", "float16")
    data = yaml.safe_load(write_mergekit_config(fp32, tmp_path / "given.yaml", dtype="bfloat16").read_text())
    assert data["dtype"] == "bfloat16" and "out_dtype" not in data  # --dtype given: it decides


def test_chat_template_is_carried_to_mergekits_build(hub_cache, tmp_path):
    text, f, *_ = BUILT["NeuralPipe-9B-merged"]
    published = {**scaled(text, f), "chat_template": "chatml"}
    g = import_mergekit(write(tmp_path, "r.yaml", published))
    assert g.chat_template == "chatml"
    save_genome(g, tmp_path / "g.yaml")
    assert load_genome(tmp_path / "g.yaml").chat_template == "chatml"
    cfg = write_mergekit_config(replace(g, dtype="float32", out_dtype="float32"), tmp_path / "m.yaml")
    assert yaml.safe_load(cfg.read_text())["chat_template"] == "chatml"
    from transformers import AutoTokenizer

    built = AutoTokenizer.from_pretrained(mergekit_yaml(cfg, tmp_path / "theirs"))
    assert "<|im_start|>" in built.chat_template

    jinja = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    g = import_mergekit(write(tmp_path, "j.yaml", {**published, "chat_template": jinja}))
    save_genome(g, tmp_path / "j.genome.yaml")
    assert load_genome(tmp_path / "j.genome.yaml").chat_template == jinja
    assert yaml.safe_load(write_mergekit_config(g, tmp_path / "j.mk.yaml").read_text())["chat_template"] == jinja

    for value, phrase in (("nosuch", "'nosuch' is neither a mergekit template name"),
                          ("{% for m in messages %}{{ m }", "the Jinja text does not parse")):
        path = write(tmp_path, "bad.yaml", {**published, "chat_template": value})
        assert_refused(run_cli("import-mergekit", path, "--out", tmp_path / "bad.genome.yaml"), "chat_template: ", phrase)


def test_tokenizer_source_names_a_source(hub_cache, tmp_path):
    text, f, *_ = BUILT["NeuralPipe-9B-merged"]
    published = scaled(text, f)
    second = published["slices"][1]["sources"][0]["model"]
    for tok, want in (("base", 0), (f"model:{published['slices'][0]['sources'][0]['model']}", 0),
                      (f"model:{second}", 1), (str(snapshot(hub_cache, second)), None)):
        if want is None:  # mergekit 0.1.5's syntax, a model reference: here a folder, not the name the slices use
            with pytest.raises(GenomeError) as err:
                import_mergekit(write(tmp_path, "t.yaml", {**published, "tokenizer_source": tok}))
            assert "is none of the config's models" in str(err.value)
            continue
        g = import_mergekit(write(tmp_path, "t.yaml", {**published, "tokenizer_source": tok}))
        assert g.tokenizer_source == want, tok
    save_genome(g, tmp_path / "g.yaml")
    assert load_genome(tmp_path / "g.yaml").tokenizer_source == 1
    data = yaml.safe_load(write_mergekit_config(g, tmp_path / "m.yaml").read_text())
    assert data["tokenizer_source"] == str(snapshot(hub_cache, second).resolve())
    pool = SourcePool.load(list(g.sources))
    assert pool.tokenizer_for(1) is pool.tokenizers[1] and pool.tokenizer_for(0) is pool.tokenizer

    cases = {
        "union": "tokenizer_source 'union': mergekit builds a new vocabulary",
        "model:nobody/else": "tokenizer_source 'model:nobody/else' is none of the config's models",
    }
    for tok, phrase in cases.items():
        path = write(tmp_path, "bad.yaml", {**published, "tokenizer_source": tok})
        assert_refused(run_cli("import-mergekit", path, "--out", tmp_path / "bad.genome.yaml"), phrase)
    path = write(tmp_path, "tokens.yaml", {**published, "tokenizer": {"source": "base", "tokens": {"<x>": {}}}})
    assert_refused(run_cli("import-mergekit", path, "--out", tmp_path / "bad.genome.yaml"), "tokenizer.tokens")


def test_scale_filters_apply_where_mergekit_applies_them(hub_cache, tmp_path):
    """A middle slice's scale does not touch the embeddings (mergekit scales them with the first slice's); the
    first slice's does. An unfiltered scale on a middle slice is refused naming a layer tensor."""
    name = "mistralai/Mistral-7B-v0.1"
    writers_and_embed = [{"filter": "embed_tokens", "value": 2.0}, {"filter": "o_proj", "value": 0.5},
                         {"filter": "down_proj", "value": 0.5}, {"value": 1.0}]

    def recipe(*slices: tuple[list[int], Any]) -> Path:
        out = []
        for rng, scale in slices:
            src: dict[str, Any] = {"model": name, "layer_range": rng}
            if scale is not None:
                src["parameters"] = {"scale": scale}
            out.append({"sources": [src]})
        return write(tmp_path, "s.yaml", {"merge_method": "passthrough", "dtype": "float32", "slices": out})

    path = recipe(([0, 4], None), ([2, 6], writers_and_embed), ([6, 8], None))
    g = import_mergekit(path)
    assert g.decode().scales[4] == pytest.approx(2.0) and g.decode().scales[8] == pytest.approx(0.5)
    ours = export_checkpoint(SourcePool.load([name]), g, tmp_path / "ours", verify=False)
    built = mergekit_yaml(write(tmp_path, "mk.yaml", for_mergekit(yaml.safe_load(path.read_text()), hub_cache)),
                          tmp_path / "theirs")
    assert rel_diff(logits(built), logits(ours)) <= TOL

    with pytest.raises(GenomeError) as err:
        import_mergekit(recipe(([0, 4], writers_and_embed), ([4, 8], None)))
    assert "slice 0" in str(err.value) and "scale 2 on model.embed_tokens.weight" in str(err.value)
    with pytest.raises(GenomeError) as err:
        import_mergekit(recipe(([0, 4], None), ([2, 6], 0.5), ([6, 8], None)))
    assert "scale 0.5 on model.layers.4.input_layernorm.weight" in str(err.value)


def test_qwen2_depth_change_writes_a_mergekit_config(tmp_path, tiny_tokenizer, monkeypatch):
    """A Qwen2 route of another depth (every layer full attention) is written; mergekit 0.1.5 builds its weights
    but, under transformers 5, cannot save the base's layer_types beside the new depth, so its build is checked
    with that one line of its config fixed. A base that mixes sliding and full layers is refused."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def qwen(name: str, **extra: Any) -> str:
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **extra)
        return str(save_source(Qwen2ForCausalLM(cfg).eval(), tiny_tokenizer, tmp_path / name))

    folder = qwen("qwen")
    g = Genome.from_route(Route.parse("0:0-2, 0:1-3"), [folder], [4], 2)
    cfg = write_mergekit_config(g, tmp_path / "q.yaml")
    assert "keeps the base's layer_types (4 entries) beside num_hidden_layers 6" in cfg.read_text()
    ours = export_checkpoint(SourcePool.load([folder]), g, tmp_path / "ours", verify=False)

    mergekit_writes_full_attention_layer_types(monkeypatch)
    assert rel_diff(logits(mergekit_yaml(cfg, tmp_path / "theirs")), logits(ours)) <= TOL
    assert import_mergekit(cfg).key() == g.key()

    mixed = qwen("mixed", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    with pytest.raises(ExportError) as err:
        write_mergekit_config(Genome.from_route(Route.parse("0:0-2, 0:1-3"), [mixed], [4], 2), tmp_path / "m.yaml")
    assert "mix attention types" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- embeddings and head in memory


def test_stitched_model_takes_embeddings_and_head_from_their_sources(hub_cache):
    from dfs_merge.stitch import stitch

    a, b = "psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B"
    pool = SourcePool.load([a, b])
    model = stitch(pool, Route(Route.parse("0:0-5, 1:5-9").hops, embed_source=0, head_source=1))
    assert model.model.embed_tokens is pool.sources[0].model.model.embed_tokens
    assert model.model.norm is pool.sources[1].model.model.norm and model.lm_head is pool.sources[1].model.lm_head
    base = stitch(pool, Route.parse("0:0-5, 1:5-9"))
    assert base.lm_head is pool.sources[0].model.lm_head and base.model.norm is pool.sources[0].model.model.norm


def test_tied_embeddings_keep_head_and_embeddings_together(tiny_tokenizer, tmp_path):
    from transformers import LlamaForCausalLM

    from dfs_merge.stitch import stitch

    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = tiny_llama_config(len(tiny_tokenizer))
        cfg.tie_word_embeddings = True
        dirs.append(str(save_source(LlamaForCausalLM(cfg).eval(), tiny_tokenizer, tmp_path / f"t{seed}")))
    pool = SourcePool.load(dirs)
    with pytest.raises(GenomeError) as err:
        stitch(pool, Route(Route.parse("0:0-3, 1:2-3").hops, embed_source=0, head_source=1))
    assert "tie the LM head to the embeddings" in str(err.value)
    model = stitch(pool, Route(Route.parse("0:0-3, 1:2-3").hops, embed_source=1, head_source=1))
    assert model.lm_head.weight is pool.sources[1].model.model.embed_tokens.weight
    path = write(tmp_path, "tied.yaml", {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": dirs[0], "layer_range": [0, 4]}]}, {"sources": [{"model": dirs[1], "layer_range": [2, 4]}]}]})
    with pytest.raises(GenomeError) as err:
        import_mergekit(path)
    assert "a genome takes norm and head from one source" in str(err.value)


# --------------------------------------------------------------------------- Hub names and the download switch


def test_a_name_neither_folder_nor_cached_is_one_line(hub_cache, tmp_path):
    path = write(tmp_path, "r.yaml", {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "nobody/no-such-model", "layer_range": [0, 2]}]}]})
    done = run_cli("import-mergekit", path, "--out", tmp_path / "g.yaml")
    assert_refused(done, "nobody/no-such-model: no such folder, and not in the Hugging Face cache", str(hub_cache),
                   "--allow-download")
    genome = write(tmp_path, "g.genome.yaml", {"format": "dfs-merge/genome@1", "route": "0:0-1",
                                                "sources": [{"path": "nobody/no-such-model", "layers": 2}]})
    assert_refused(run_cli("export", genome, "--out", tmp_path / "out"), "not in the Hugging Face cache")
    cfg = write(tmp_path, "run.yaml", {"sources": ["nobody/no-such-model"], "tasks": {"prose_ppl_dev": 1.0}, "limit": 1})
    assert_refused(run_cli("eval", cfg), "not in the Hugging Face cache")


def test_downloads_happen_only_when_allowed(hub_cache, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from dfs_merge.models.hub import ENV

    calls = []

    def fake_snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append((repo_id, kwargs))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        target = Path(kwargs["cache_dir"]) / "downloaded"
        if not target.exists():
            shutil.copytree(snapshot(hub_cache, "mistralai/Mistral-7B-v0.1"), target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv(ENV, "0")  # restored (unset) after the test, whatever the CLI sets
    monkeypatch.delenv("HF_HUB_OFFLINE")
    path = write(tmp_path, "r.yaml", {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "someone/new-model", "layer_range": [0, 8]}]}]})
    assert_refused(run_cli("import-mergekit", path, "--out", tmp_path / "g.yaml"), "--allow-download")
    assert all(kw.get("local_files_only") for _, kw in calls)
    done = run_cli("import-mergekit", path, "--out", tmp_path / "g.yaml", "--allow-download")
    assert done.code == 0, done.err
    fetched = [kw for _, kw in calls if not kw.get("local_files_only")]
    assert fetched and "*.safetensors" in fetched[0]["allow_patterns"] and "*.bin" not in fetched[0]["allow_patterns"]
    assert load_genome(tmp_path / "g.yaml").sources == ("someone/new-model",)

    from dfs_merge.models.sources import locate

    monkeypatch.setenv(ENV, "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError) as err:
        locate("someone/other-model")
    assert "HF_HUB_OFFLINE is set" in str(err.value)


# --------------------------------------------------------------------------- hostile genome files


@pytest.mark.parametrize("field, value, phrase", [
    ("head_source", 2, "head_source: 2 is not a source index (0..1)"),
    ("embed_source", -1, "embed_source: Input should be greater than or equal to 0"),
    ("tokenizer_source", "1", "tokenizer_source: Input should be a valid integer"),
    ("dtype", "fp8", "dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ("out_dtype", "int8", "out_dtype: Input should be"),
    ("chat_template", "nosuch", "chat_template: 'nosuch' is neither a mergekit template name"),
    ("chat_template", "", "chat_template: expected a template name or Jinja text"),
])
def test_bad_settings_in_a_genome_file_are_one_line(field, value, phrase, tiny_source_dirs, tmp_path):
    g = Genome.from_route(Route.parse("0:0-1, 1:1, 0:2-3"), [str(s) for s in tiny_source_dirs], [4, 4], 2)
    data = {**genome_to_dict(g), field: value}
    path = write(tmp_path, "g.genome.yaml", data)
    for command in (("show", path), ("export", path, "--format", "mergekit", "--out", tmp_path / "m.yaml")):
        assert_refused(run_cli(*command), phrase)
    assert not (tmp_path / "m.yaml").exists()


def test_a_genome_is_scored_with_its_tokenizer_sources_tokenizer(hub_cache):
    from dfs_merge.candidate import CandidateScorer

    seen = []

    class Recorder:
        def score(self, model: Any, tokenizer: Any, hops: int, docs: Any = None) -> None:
            seen.append((tokenizer, model.lm_head))

    a, b = "psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B"
    pool = SourcePool.load([a, b])
    g = Genome.from_route(Route(Route.parse("0:0-5, 1:5-9").hops, head_source=1), [a, b], [10, 10], 1,
                          constraints=ConstraintsConfig(pin_ends=False))
    scorer = CandidateScorer(pool, Recorder())
    scorer.genome(g)
    scorer.genome(replace(g, tokenizer_source=1))
    assert seen == [(pool.tokenizer, pool.sources[1].model.lm_head), (pool.tokenizers[1], pool.sources[1].model.lm_head)]


def test_prefix_cache_keeps_apart_routes_over_other_embeddings(hub_cache):
    from dfs_merge.stitch import ActivationCache, stitch

    a, b = "psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B"
    pool = SourcePool.load([a, b])
    cache = ActivationCache(64)
    hops = Route.parse("0:0-5, 1:5-9").hops
    with torch.no_grad():
        first = stitch(pool, Route(hops), cache)(input_ids=IDS).logits
        other = stitch(pool, Route(hops, embed_source=1), cache)(input_ids=IDS).logits
        alone = stitch(pool, Route(hops, embed_source=1))(input_ids=IDS).logits
    assert torch.equal(other, alone) and not torch.equal(first, other)


@pytest.mark.slow
def test_the_mergekit_yaml_command_builds_what_run_merge_builds(hub_cache, tmp_path):
    """The in-process build above is the `mergekit-yaml` command's: once through the command itself."""
    import os
    import subprocess
    import sys

    text, f, *_ = BUILT["orcamini-platy-44layer"]
    cfg = write(tmp_path, "mk.yaml", for_mergekit(scaled(text, f), hub_cache))
    done = subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(cfg), str(tmp_path / "cli"),
                           "--quiet", "--no-cuda"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(logits(tmp_path / "cli"), logits(mergekit_yaml(cfg, tmp_path / "api")))
