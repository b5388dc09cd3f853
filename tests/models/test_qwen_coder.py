"""The real Qwen2.5-Coder-0.5B-Instruct: one GGUF split over six PyPI packages, joined and converted once into the
cache (`dfs_merge.models.store`): slow tests.

Neither `make test` nor CI runs them (marked `qwen`; about 4 minutes on 2 cores, and the six packages, about
490 MB, would take minutes of CI's budget to install and convert): `make test-qwen` does, after installing the
packages; without them these tests skip.

What is tested on SmolLM2 and on tiny Qwen2 models, on this one: a route of 28 hops (layers 0-15, then 12-23
again, two scales other than 1) generates alike with and without the KV cache; its HF export (the scales folded
into the residual writers, q/k/v and their biases copied as they are), its F32 GGUF and mergekit's build of its
config give its logits; a LoRA adapter over the model (`qwen2.5-coder-0.5b-instruct+ADAPTER`) is PEFT's merge;
a task-arithmetic recipe of the model and the adapter merges and exports. Every output is written under the
test's temporary folder and removed when the test ends (an fp32 export is about 2.7 GB).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from builders import mergekit_writes_full_attention_layer_types, mergekit_yaml, write_lora

from dfs_merge.export.checkpoint import export_checkpoint, running_products
from dfs_merge.export.gguf import QUANTS, export_gguf, verify_gguf
from dfs_merge.export.mergekit import import_mergekit, write_mergekit_config
from dfs_merge.genome import Genome, Hop, Route
from dfs_merge.merging.blend import recipe_model
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models import store as ms
from dfs_merge.models.sources import SourcePool
from dfs_merge.stitch import stitch

QWEN = "qwen2.5-coder-0.5b-instruct"
SPEC = ms.PACKAGED_MODELS[QWEN]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.qwen,
    pytest.mark.skipif(
        any(importlib.util.find_spec(part.module) is None for part in SPEC.parts),
        reason=f"needs the six part packages of {QWEN}: `{SPEC.install_command}` (make models does it)",
    ),
]

# 24 -> 28 hops: layers 12-15 run twice; the repeat enters with a damped stream and hop 22 with a raised one, so
# that the running products (what the export folds) are 1, 0.8 and 0.88
SCALES = [1.0] * 28
SCALES[16], SCALES[22] = 0.8, 1.1
ROUTE = Route.parse("0:0-15, 0:12-23", SCALES)
GENOME = Genome.from_route(ROUTE, [QWEN], [24], 2)
PROMPT = "def fibonacci(n):\n    "
REL = 1e-5  # max|Δlogit| / max|logit| of an fp32 export (the fold through RMSNorm's eps) against the stitched model
ADAPTED = [3, 20]  # the LoRA adapter's layers, one in each of the recipe's two layer groups
ADAPTED_WEIGHTS = ("self_attn.q_proj.weight", "self_attn.v_proj.weight", "mlp.down_proj.weight")


@torch.inference_mode()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def rel_err(ref: torch.Tensor, other: torch.Tensor) -> float:
    assert ref.shape == other.shape, (ref.shape, other.shape)
    return float((ref - other).abs().max() / ref.abs().max())


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """The test's temporary folder, emptied when the test ends: pytest keeps the last runs' folders, and these
    outputs are gigabytes."""
    yield tmp_path
    for p in tmp_path.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


@pytest.fixture(scope="module")
def pool() -> SourcePool:
    return SourcePool.load([QWEN])  # converted once into the shared test model cache


@pytest.fixture(scope="module")
def ids(pool) -> torch.Tensor:
    return pool.tokenizer(PROMPT, return_tensors="pt").input_ids


def test_identity_route_equals_transformers_load_of_the_joined_gguf(pool, ids, scratch: Path) -> None:
    """The converted folder, through the identity route, gives the logits of transformers' own load of the joined
    GGUF, in float32 (relative 1e-6); and the two tokenizers agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = pool.base.model.config
    assert pool.layers_per_source == (24,) and config.model_type == "qwen2" and config.hidden_size == 896
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (14, 2, 151_936)
    assert pool.dtype == torch.float32
    assert "4-bit" in (ms.models_dir() / QWEN / "README.md").read_text()

    gguf = ms.join_parts(SPEC, scratch / SPEC.gguf_file)  # checked against the registry's size and sha256
    theirs = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=gguf.name, dtype=torch.float32)
    their_tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf.name)
    gguf.unlink()

    assert ids.tolist() == their_tokenizer(PROMPT, return_tensors="pt").input_ids.tolist()
    model = stitch(pool, Route(tuple(Hop(0, i) for i in range(24))))
    ours, reference = logits(model, ids), logits(theirs, ids)
    assert ours.dtype == reference.dtype == torch.float32 and ours.shape == reference.shape
    relative = rel_err(reference, ours)
    assert relative <= 1e-6, relative


# --------------------------------------------------------------------------- a route with a repeat, exported


@pytest.fixture(scope="module")
def route_export(pool, tmp_path_factory) -> Iterator[Path]:
    """GENOME as an HF checkpoint (the export's own quick verify: tensors read back, logits), removed at the end."""
    out = export_checkpoint(pool, GENOME, tmp_path_factory.mktemp("route") / "hf")
    yield out
    shutil.rmtree(out)


@pytest.fixture(scope="class")
def exported(route_export):
    """The export loaded by transformers, for one class's tests."""
    return load(route_export)


class TestRouteExport:
    def test_route_generates_alike_with_and_without_cache_and_as_its_export(self, pool, exported, ids):
        """Greedy tokens of the stitched route (one cache slot per hop: layers 12-15 have two) with the KV cache,
        without it, and of the plain Qwen2ForCausalLM of its export."""
        model = stitch(pool, ROUTE)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                  pad_token_id=pool.tokenizer.pad_token_id)
        with torch.inference_mode():
            cached = model.generate(ids, use_cache=True, **kw)
            uncached = model.generate(ids, use_cache=False, **kw)
            theirs = exported.generate(ids, **kw)
        assert cached.shape == (1, ids.shape[1] + 8)
        assert torch.equal(cached, uncached) and torch.equal(cached, theirs), (cached, uncached, theirs)
        assert len(model(ids, use_cache=True).past_key_values.layers) == 28

    def test_hf_export_folds_scales_into_residual_writers_only(self, pool, exported, ids):
        """The export is a plain Qwen2 of 28 layers with the stitched logits (relative 1e-5 in fp32); each hop's
        running scale product divides its o_proj and down_proj, while q/k/v (weights and biases), the norms, the
        embeddings and the untied LM head are the source's, bit for bit, also where a scale is folded."""
        from transformers import Qwen2ForCausalLM

        assert type(exported) is Qwen2ForCausalLM
        cfg = exported.config
        assert cfg.num_hidden_layers == 28 and cfg.layer_types == ["full_attention"] * 28
        assert cfg.tie_word_embeddings is False and cfg.vocab_size == 151_936
        relative = rel_err(logits(stitch(pool, ROUTE), ids), logits(exported, ids))
        assert relative <= REL, relative

        base = pool.base.model
        assert torch.equal(exported.model.embed_tokens.weight, base.model.embed_tokens.weight)
        assert torch.equal(exported.lm_head.weight, base.lm_head.weight)
        assert exported.lm_head.weight.data_ptr() != exported.model.embed_tokens.weight.data_ptr()
        products = running_products(ROUTE)
        assert sorted({round(p, 6) for p in products}) == [0.8, 0.88, 1.0]
        for k, h in enumerate(ROUTE):
            src, dst = pool.layer(h.source, h.layer), exported.model.layers[k]
            torch.testing.assert_close(dst.self_attn.o_proj.weight, src.self_attn.o_proj.weight / products[k])
            torch.testing.assert_close(dst.mlp.down_proj.weight, src.mlp.down_proj.weight / products[k])
            assert dst.self_attn.o_proj.bias is None and dst.mlp.down_proj.bias is None  # Qwen2: no writer biases
            for proj in ("q_proj", "k_proj", "v_proj"):
                mine, theirs = getattr(dst.self_attn, proj), getattr(src.self_attn, proj)
                assert mine.bias is not None and torch.equal(mine.bias, theirs.bias), (k, proj)
                assert torch.equal(mine.weight, theirs.weight), (k, proj)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                assert torch.equal(getattr(dst, norm).weight, getattr(src, norm).weight), (k, norm)


def test_f32_gguf_of_the_route_reads_back_with_the_stitched_logits_and_tokenizer(pool, scratch):
    """The route as an F32 GGUF (qwen2: no q/k permutation, q/k/v biases, its own output.weight), read back by
    transformers: logits within the F32 tolerance, the same greedy tokens, the tokenizer round-trips."""
    from gguf import GGUFReader

    out = export_gguf(pool, GENOME, scratch / "route.gguf", quant="f32", verify=False)
    reader = GGUFReader(str(out))
    names = {t.name for t in reader.tensors}
    assert reader.fields["qwen2.block_count"].contents() == 28
    assert {"output.weight", "token_embd.weight", "blk.27.attn_q.bias", "blk.27.attn_k.bias"} <= names
    del reader
    result = verify_gguf(pool, ROUTE, out, "f32")  # what the export's own verify checks, read back once
    assert result.tokenizer_problem is None, result.tokenizer_problem
    assert result.logits.rel_error <= QUANTS["f32"].tolerance, result.text()
    assert result.logits.generations_equal, result.text()


def test_mergekit_builds_the_route_from_its_config(pool, ids, scratch, monkeypatch):
    """The route's mergekit config (the packaged model as its converted folder) built by mergekit 0.1.5 gives the
    stitched logits. A Qwen2 of a new depth needs the header note's layer_types: patched into mergekit's build."""
    cfg = write_mergekit_config(GENOME, scratch / "merge.yaml")
    assert "keeps the base's layer_types (24 entries) beside num_hidden_layers 28" in cfg.read_text()
    assert str(ms.models_dir().resolve() / QWEN) in cfg.read_text()
    mergekit_writes_full_attention_layer_types(monkeypatch)
    theirs = load(mergekit_yaml(cfg, scratch / "theirs"))
    assert theirs.config.num_hidden_layers == 28
    relative = rel_err(logits(stitch(pool, ROUTE), ids), logits(theirs, ids))
    assert relative <= REL, relative
    assert import_mergekit(cfg).key() == GENOME.key()


# --------------------------------------------------------------------------- a LoRA adapter, a PS recipe


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A random LoRA adapter (r 4, non-zero B) on q_proj, v_proj and down_proj of layers 3 and 20."""
    return write_lora(ms.fetch(QWEN), tmp_path_factory.mktemp("lora") / "lora", 0, ADAPTED)


@pytest.fixture(scope="module")
def adapted(adapter) -> SourcePool:
    """The model and the model with the adapter, `NAME+ADAPTER` as the family genomes name it."""
    return SourcePool.load([QWEN, f"{QWEN}+{adapter}"])


def adapted_names() -> set[str]:
    return {f"model.layers.{i}.{w}" for i in ADAPTED for w in ADAPTED_WEIGHTS}


def test_adapter_source_is_peft_merge_and_shares_the_rest(adapted, adapter, ids):
    """The identity route over the adapter source gives the logits of PEFT's merge of the adapter into a fresh
    load; only the adapted weights are tensors of its own (the q/k/v biases among the shared)."""
    from peft import PeftModel

    want = PeftModel.from_pretrained(load(ms.fetch(QWEN)), str(adapter)).merge_and_unload()
    reference = logits(want, ids)
    del want
    ours = logits(stitch(adapted, Route(tuple(Hop(1, i) for i in range(24)))), ids)
    assert torch.equal(ours, reference), rel_err(reference, ours)

    base = dict(adapted.sources[0].model.named_parameters())
    own = {n for n, p in adapted.sources[1].model.named_parameters() if p.data_ptr() != base[n].data_ptr()}
    assert own == adapted_names()


def test_task_arithmetic_recipe_merges_in_memory_and_exports(adapted, adapter, ids, scratch):
    """Task arithmetic of the model (base) and the adapter source, weights 0.5 on layers 0-11 and 1.5 on 12-23: every
    adapted tensor is base + w (adapted - base), every other one the base's; its export loads with the merge's
    logits."""
    recipe = Recipe((QWEN, f"{QWEN}+{adapter}"), 24, "task_arithmetic", 0, 2, ((0.5, 1.5),))
    merged = recipe_model(recipe, adapted)
    base = dict(adapted.sources[0].model.named_parameters())
    lora = dict(adapted.sources[1].model.named_parameters())
    for name, p in merged.named_parameters():
        if name in adapted_names():
            w = 0.5 if int(name.split(".")[2]) < 12 else 1.5
            torch.testing.assert_close(p, base[name] + w * (lora[name] - base[name]), rtol=1e-6, atol=1e-7)
            assert not torch.equal(p, base[name])
        else:
            assert torch.equal(p, base[name]), name
    expected = logits(merged, ids)

    out = export_checkpoint(adapted, recipe, scratch / "ps")
    relative = rel_err(expected, logits(load(out), ids))
    assert relative <= 1e-6, relative
