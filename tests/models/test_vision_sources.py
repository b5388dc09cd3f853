"""A vision-language model as source 0 beside a tiny LLM of the same hidden space: its language model's layers join the
pool, its vision tower and projector stay its own, and a stitched route or a parameter-space merge over (VLM, LLM)
runs on image + text inputs and on text alone. The tests over `vlm_pool` run for each supported family (a tiny
LLaVA, Idefics3 and SmolVLM beside a tiny Llama, a Gemma 3 beside a tiny Gemma 3 text model); the rest on the tiny
LLaVA."""

from __future__ import annotations

import json

import pytest
import torch
from builders import (
    IMAGE_TOKENS_PER_PICTURE,
    assert_refused,
    build_tokenizer,
    build_vlm_tokenizer,
    picture,
    run_cli,
    save_source,
    save_vlm,
    swap_tokens,
    tiny_vlm,
    tiny_vlm_llm,
)

from dfs_merge.errors import GenomeError, IncompatibleSources, SourceError
from dfs_merge.merging.blend import Blender
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.sources import SourcePool
from dfs_merge.models.vocab import VocabMap
from dfs_merge.route import Route
from dfs_merge.stitch import stitch

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION = "What colour is the shape? Answer:"
TEXT_MODELS = {"gemma3": ("gemma3", "Gemma3ForCausalLM")}
"""The family and causal LM class of a VLM's language model, by its model_type (else Llama's)."""


def image_inputs(pool: SourcePool) -> dict[str, torch.Tensor]:
    """A picture and a question, through the base VLM's processor (its placeholder for the picture first)."""
    processor = pool.vision.processor
    return dict(processor(images=[picture()], text=[f"{processor.image_token}\n{QUESTION}"], return_tensors="pt"))


def text_inputs(pool: SourcePool) -> torch.Tensor:
    """The question alone, as the base VLM's tokenizer reads it."""
    return pool.vision.processor.tokenizer([QUESTION], return_tensors="pt")["input_ids"]


def language_model(pool: SourcePool, vlm: torch.nn.Module) -> torch.nn.Module:
    """The language model inside `vlm`, a model of the pool's base VLM's class."""
    return pool.vision.family.language_model(vlm)


def test_the_language_model_joins_the_pool_and_the_rest_stays_the_vlms(vlm_pool):
    pool = vlm_pool
    vlm = pool.vision.model
    family, causal_lm = TEXT_MODELS.get(pool.vision.model_type, ("llama", "LlamaForCausalLM"))
    assert pool.layers_per_source == (4, 4)
    assert type(pool.base.model).__name__ == causal_lm and pool.family.name == family
    assert pool.layer(0, 2) is language_model(pool, vlm).layers[2]  # the VLM's own layer, not a copy
    assert pool.base.model.lm_head is vlm.lm_head
    assert pool.sources[1].vision is None


def test_the_identity_route_reproduces_the_vlm_exactly(vlm_pool):
    pool = vlm_pool
    inputs = image_inputs(pool)
    image_tokens = int((inputs["input_ids"] == pool.vision.model.config.image_token_id).sum())
    assert image_tokens == IMAGE_TOKENS_PER_PICTURE[pool.vision.model_type]  # the picture is in the text
    with torch.no_grad():
        expected = pool.vision.model(**inputs).logits
        model, processor = pool.candidate(stitch(pool, Route.parse("0:0-3")))
        got = model(**inputs).logits
    assert processor is pool.vision.processor
    assert type(model) is type(pool.vision.model)
    assert torch.equal(got, expected)


def test_a_route_over_the_vlm_and_the_llm_reads_pictures_and_text(vlm_pool):
    pool = vlm_pool
    vlm = pool.vision.model
    route = Route.parse("0:0-1, 1:1-3, 0:3", [1.0, 1.0, 0.9, 1.0, 1.1, 1.0])
    lm = stitch(pool, route)
    model, _ = pool.candidate(lm)
    inputs, text = image_inputs(pool), text_inputs(pool)
    inner = pool.vision.family.language_model_attr.split(".")[-1]
    for name, module in vlm.model.named_children():  # the vision tower, the projector: the VLM's own
        assert name == inner or getattr(model.model, name) is module, name
    assert language_model(pool, model).layers[3].layer is pool.layer(1, 2)  # the LLM's layer, referenced
    with torch.no_grad():
        with_picture = model(**inputs).logits
        assert torch.equal(model(input_ids=text).logits, lm(input_ids=text).logits)
        other = dict(inputs, pixel_values=-inputs["pixel_values"])  # not zeros: Idefics3 drops a zero picture
        assert not torch.allclose(model(**other).logits, with_picture)  # the picture reaches the language model
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.isfinite(with_picture).all()
    assert torch.equal(cached, uncached)
    assert model.config.text_config.num_hidden_layers == len(route)
    if pool.family.name == "gemma3":  # each hop keeps its layer's attention type; the picture's tokens see each other
        assert model.config.text_config.layer_types == [pool.layer_type(h.source, h.layer) for h in route]
        one_way = {k: v for k, v in inputs.items() if k != "token_type_ids"}
        with torch.no_grad():
            assert not torch.allclose(model(**one_way).logits, with_picture)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_a_parameter_space_merge_of_the_vlm_and_the_llm_reads_pictures(vlm_pool, method):
    pool = vlm_pool
    inputs = image_inputs(pool)
    blender = Blender(pool)
    sources = tuple(pool.paths)
    unchanged = blender.apply(Recipe(sources, 4, "linear", 0, 1, ((1.0,), (0.0,))))
    model, _ = pool.candidate(unchanged)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, pool.vision.model(**inputs).logits)
    weights = ((0.7, 0.4), (0.3, 0.6)) if method == "linear" else ((0.3, 0.6),)
    merged = blender.apply(Recipe(sources, 4, method, 0, 2, weights))
    model, _ = pool.candidate(merged)
    name = "model.layers.3.mlp.down_proj.weight"
    base, llm = pool.base.model.get_parameter(name), pool.sources[1].model.get_parameter(name)
    want = 0.4 * base + 0.6 * llm if method == "linear" else base + 0.6 * (llm - base)
    assert torch.allclose(language_model(pool, model).layers[3].mlp.down_proj.weight, want, atol=1e-6)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, pool.vision.model(**inputs).logits)
    assert language_model(pool, pool.vision.model).layers[3].mlp.down_proj.weight.data_ptr() != \
        language_model(pool, model).layers[3].mlp.down_proj.weight.data_ptr()  # the VLM's own weights untouched


@pytest.fixture(scope="module")
def narrow_vlm_dir(tmp_path_factory):
    """A tiny LLaVA whose language model is 32 wide (the LLM's is 48)."""
    tokenizer = build_vlm_tokenizer()
    return save_vlm(*tiny_vlm(tokenizer, seed=2, hidden=32), tmp_path_factory.mktemp("narrow") / "vlm")


@pytest.fixture(scope="module")
def unsupported_vlm_dir(tmp_path_factory):
    """A folder whose config is a vision-language architecture no family handles (Qwen2-VL's)."""
    folder = tmp_path_factory.mktemp("qwen2_vl") / "vlm"
    folder.mkdir()
    text = {"model_type": "qwen2", "hidden_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4}
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": {},
                                                    "text_config": text}))
    return folder


@pytest.fixture(scope="module")
def swapped_llm_dir(tmp_path_factory):
    """A tiny LLM whose tokenizer is the tiny one with the tokens at ids 100 and 101 swapped: 320 tokens, not a
    prefix of the VLM's."""
    tokenizer = swap_tokens(build_tokenizer(), 100, 101)
    return save_source(tiny_vlm_llm(tokenizer), tokenizer, tmp_path_factory.mktemp("swapped") / "llm")


def test_a_language_model_of_another_hidden_size_is_refused_naming_it(narrow_vlm_dir, tiny_vlm_dirs):
    with pytest.raises(IncompatibleSources, match=r"^sources 0 and 1 differ in hidden_size: 32 vs 48$"):
        SourcePool.load([str(narrow_vlm_dir), str(tiny_vlm_dirs["llm"])])


def test_an_unsupported_vlm_family_is_refused_naming_it(unsupported_vlm_dir, tiny_vlm_dirs):
    supported = "gemma3, idefics3, llava, llava_next, smolvlm"
    with pytest.raises(SourceError, match=rf"unsupported vision-language architecture 'qwen2_vl'; supported: {supported}$"):
        SourcePool.load([str(unsupported_vlm_dir), str(tiny_vlm_dirs["llm"])])


def test_a_tokenizer_that_is_not_a_prefix_is_refused_naming_the_first_id_that_differs(tiny_vlm_dirs, swapped_llm_dir):
    with pytest.raises(IncompatibleSources, match=r"^sources 0 and 1 differ in tokenizer at token id 100: '¤' vs '¥' "
                                                  r"\(321 vs 320 tokens; one vocabulary must be the other's or a "
                                                  r"prefix of it\)$"):
        SourcePool.load([str(tiny_vlm_dirs["vlm"]), str(swapped_llm_dir)])


@pytest.mark.parametrize("which", ["narrow", "unsupported", "swapped"])
def test_the_cli_refuses_them_in_one_line_with_exit_2(which, narrow_vlm_dir, unsupported_vlm_dir, swapped_llm_dir,
                                                      tiny_vlm_dirs, tmp_path):
    import yaml

    vlm = {"narrow": narrow_vlm_dir, "unsupported": unsupported_vlm_dir}.get(which, tiny_vlm_dirs["vlm"])
    llm = swapped_llm_dir if which == "swapped" else tiny_vlm_dirs["llm"]
    config = tmp_path / "vlm.yaml"
    config.write_text(yaml.safe_dump({"sources": [str(vlm), str(llm)],
                                      "tasks": {"image_qa_e_dev": 1.0}, "limit": 2, "out": str(tmp_path / "run")}))
    result = run_cli("eval", str(config))
    assert_refused(result, {"narrow": "hidden_size: 32 vs 48", "unsupported": "'qwen2_vl'",
                            "swapped": "differ in tokenizer at token id 100"}[which])


# ---- an LLM whose vocabulary is a prefix of the VLM's (LLaVA adds `<image>`): Mistral-7B beside LLaVA-1.6-Mistral

def test_an_llm_whose_vocabulary_is_a_prefix_of_the_vlms_joins_the_pool(tiny_prefix_pool):
    pool = tiny_prefix_pool
    assert pool.vocab == VocabMap((321, 320), (True, False), 320)
    assert pool.sources[1].model.model.embed_tokens.weight.shape[0] == 320
    route = Route.parse("0:0-1, 1:1-3, 0:3", [1.0, 1.0, 0.9, 1.0, 1.1, 1.0])
    lm = stitch(pool, route)
    assert lm.model.embed_tokens is pool.base.model.model.embed_tokens and lm.lm_head is pool.base.model.lm_head
    model, _ = pool.candidate(lm)
    inputs = image_inputs(pool)
    assert int(inputs["input_ids"].max()) == 320  # `<image>`: a row only the base has
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == 321 and torch.isfinite(logits).all()


def test_a_recipe_merges_the_shared_rows_and_keeps_the_bases_others(tiny_prefix_pool):
    pool = tiny_prefix_pool
    merged = Blender(pool).apply(Recipe(tuple(pool.paths), 4, "task_arithmetic", 0, 2, ((0.5, 0.2),), lam=0.8))
    base, llm = pool.base.model, pool.sources[1].model
    for name, w in (("model.embed_tokens.weight", 0.5), ("lm_head.weight", 0.2)):  # group 0's weight, the last's
        got, b, other = merged.get_parameter(name), base.get_parameter(name), llm.get_parameter(name)
        assert got.shape == (321, 48)
        assert torch.allclose(got[:320], b[:320] + 0.8 * w * (other - b[:320]), atol=1e-6), name
        assert torch.equal(got[320:], b[320:]), name  # `<image>`'s row: the VLM's own
    name = "model.layers.3.mlp.down_proj.weight"
    want = base.get_parameter(name) + 0.8 * 0.2 * (llm.get_parameter(name) - base.get_parameter(name))
    assert torch.allclose(merged.get_parameter(name), want, atol=1e-6)
    assert base.model.embed_tokens.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
    model, _ = pool.candidate(merged)
    with torch.no_grad():
        assert torch.isfinite(model(**image_inputs(pool)).logits).all()


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_other_methods_keep_the_bases_extra_rows_too(tiny_prefix_pool, method):
    pool = tiny_prefix_pool
    densities = ((0.5,),) if method == "ties" else ()
    weights = ((0.6,), (0.4,)) if method == "linear" else ((0.7,),)
    blender = Blender(pool)
    for _ in range(2):  # the second apply reuses the resident buffers (and TIES's kept ranks)
        merged = blender.apply(Recipe(tuple(pool.paths), 4, method, 0, 1, weights, densities))
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(merged.get_parameter(name)[320:], pool.base.model.get_parameter(name)[320:])
    if method == "linear":
        name = "lm_head.weight"
        want = 0.6 * pool.base.model.get_parameter(name)[:320] + 0.4 * pool.sources[1].model.get_parameter(name)
        assert torch.allclose(merged.get_parameter(name)[:320], want, atol=1e-6)


def test_the_ends_and_tokenizer_of_the_shorter_vocabulary_are_refused(tiny_prefix_pool):
    pool = tiny_prefix_pool
    message = (r"^{}: source 1's vocabulary \(320 rows\) is not the base's \(321\); where the sources' vocabularies "
               r"differ, the embeddings, LM head and tokenizer are the base's \(source 0\)$")
    with pytest.raises(GenomeError, match=message.format("embed_source 1")):
        stitch(pool, Route(Route.parse("0:0-3").hops, embed_source=1))
    with pytest.raises(GenomeError, match=message.format("head_source 1")):
        stitch(pool, Route(Route.parse("0:0-3").hops, head_source=1))
    with pytest.raises(GenomeError, match=message.format("tokenizer_source 1")):
        pool.candidate(stitch(pool, Route.parse("0:0-3")), tokenizer_source=1)


def test_the_reverse_pair_the_shorter_vocabulary_as_the_base_merges_the_same_rows(tiny_vlm_dirs, tiny_short_llm_dir,
                                                                                  tiny_prefix_pool):
    pool = SourcePool.load([str(tiny_short_llm_dir), str(tiny_vlm_dirs["vlm"])])
    assert pool.vocab == VocabMap((320, 321), (True, False), 320) and pool.vision is None
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert stitch(pool, Route.parse("0:0-1, 1:2-3")).forward(ids).logits.shape[-1] == 320
    recipe = Recipe(tuple(pool.paths), 4, "task_arithmetic", 0, 1, ((0.5,),))
    merged = Blender(pool).apply(recipe)
    forward = Blender(tiny_prefix_pool).apply(Recipe(tuple(tiny_prefix_pool.paths), 4, "task_arithmetic", 1, 1,
                                                     ((0.5,),)))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # the same merge of the shared rows, either way
        assert merged.get_parameter(name).shape == (320, 48)
        assert torch.allclose(merged.get_parameter(name), forward.get_parameter(name)[:320], atol=1e-6)


def test_each_source_alone_is_scored_as_itself(vlm_pool):
    vlm, processor = vlm_pool.alone(0)
    llm, tokenizer = vlm_pool.alone(1)
    assert vlm is not vlm_pool.vision.model and type(vlm) is type(vlm_pool.vision.model)
    assert processor is vlm_pool.vision.processor
    assert llm is vlm_pool.sources[1].model and tokenizer is vlm_pool.tokenizer_for(1)


def test_the_cli_scores_a_vlm_config(tiny_vlm_dirs, tmp_path):
    import yaml

    config = tmp_path / "vlm.yaml"
    config.write_text(yaml.safe_dump({"sources": [str(tiny_vlm_dirs["vlm"]), str(tiny_vlm_dirs["llm"])],
                                      "tasks": {"image_qa_j_dev": 1.0}, "limit": 2, "max_length": 256,
                                      "out": str(tmp_path / "run")}))
    base = run_cli("eval", str(config))
    assert base.code == 0, base.err
    assert "image_qa_j_dev" in base.out and "failed" not in base.out
    alone = run_cli("eval", str(config), "--sources-only")
    assert alone.code == 0, alone.err
    rows = {line.split("  ")[0].strip(): line for line in alone.out.splitlines() if line.startswith("source")}
    assert "failed" not in rows["source 0"]
    assert "failed: FitnessError: tasks image_qa_j_dev show images" in rows["source 1"]  # a text LLM alone


def test_a_vlm_whose_config_claims_fewer_layers_than_its_weights_is_refused(vlm_pool, tmp_path):
    import shutil

    folder = shutil.copytree(vlm_pool.paths[0], tmp_path / "short")
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    text["num_hidden_layers"] = 3
    if "layer_types" in text:
        text["layer_types"] = text["layer_types"][:3]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"config.json says 3 layers \(num_hidden_layers\) while its weights hold 4"):
        SourcePool.load([str(folder)])
