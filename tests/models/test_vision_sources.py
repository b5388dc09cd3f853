"""A vision-language model (a tiny LLaVA) as source 0 beside a tiny Llama LLM of the same hidden space: its language
model's layers join the pool, its vision tower and projector stay its own, and a stitched route or a parameter-space
merge over (VLM, LLM) runs on image + text inputs and on text alone."""

from __future__ import annotations

import json

import pytest
import torch
from builders import IMAGE_TOKEN, assert_refused, build_vlm_tokenizer, picture, run_cli, save_vlm, tiny_vlm

from dfs_merge.errors import IncompatibleSources, SourceError
from dfs_merge.merging.blend import Blender
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.sources import SourcePool
from dfs_merge.route import Route
from dfs_merge.stitch import stitch

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = f"{IMAGE_TOKEN}\nWhat colour is the shape? Answer:"


def image_inputs(pool: SourcePool) -> dict[str, torch.Tensor]:
    """A picture and a question, through the base VLM's processor."""
    return dict(pool.vision.processor(images=[picture()], text=[PROMPT], return_tensors="pt"))


def test_the_language_model_joins_the_pool_and_the_rest_stays_the_vlms(tiny_vlm_pool):
    pool = tiny_vlm_pool
    vlm = pool.vision.model
    assert pool.layers_per_source == (4, 4)
    assert type(pool.base.model).__name__ == "LlamaForCausalLM" and pool.family.name == "llama"
    assert pool.layer(0, 2) is vlm.model.language_model.layers[2]  # the VLM's own layer, not a copy
    assert pool.base.model.lm_head is vlm.lm_head
    assert pool.sources[1].vision is None


def test_the_identity_route_reproduces_the_vlm_exactly(tiny_vlm_pool):
    pool = tiny_vlm_pool
    inputs = image_inputs(pool)
    assert (inputs["input_ids"] == pool.vision.model.config.image_token_id).sum() == 4  # the picture is in the text
    with torch.no_grad():
        expected = pool.vision.model(**inputs).logits
        model, processor = pool.candidate(stitch(pool, Route.parse("0:0-3")))
        got = model(**inputs).logits
    assert processor is pool.vision.processor
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert torch.equal(got, expected)


def test_a_route_over_the_vlm_and_the_llm_reads_pictures_and_text(tiny_vlm_pool):
    pool = tiny_vlm_pool
    vlm = pool.vision.model
    route = Route.parse("0:0-1, 1:1-3, 0:3", [1.0, 1.0, 0.9, 1.0, 1.1, 1.0])
    lm = stitch(pool, route)
    model, _ = pool.candidate(lm)
    inputs = image_inputs(pool)
    assert model.model.vision_tower is vlm.model.vision_tower
    assert model.model.multi_modal_projector is vlm.model.multi_modal_projector
    assert model.model.language_model.layers[3].layer is pool.layer(1, 2)  # the LLM's layer, referenced
    with torch.no_grad():
        with_picture = model(**inputs).logits
        text_only = model(input_ids=inputs["input_ids"][:, 5:]).logits
        assert torch.equal(text_only, lm(input_ids=inputs["input_ids"][:, 5:]).logits)
        other = dict(inputs, pixel_values=torch.zeros_like(inputs["pixel_values"]))
        assert not torch.allclose(model(**other).logits, with_picture)  # the picture reaches the language model
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.isfinite(with_picture).all()
    assert torch.equal(cached, uncached)
    assert model.config.text_config.num_hidden_layers == len(route)


def test_a_parameter_space_merge_of_the_vlm_and_the_llm_reads_pictures(tiny_vlm_pool):
    pool = tiny_vlm_pool
    inputs = image_inputs(pool)
    blender = Blender(pool)
    sources = tuple(pool.paths)
    unchanged = blender.apply(Recipe(sources, 4, "linear", 0, 1, ((1.0,), (0.0,))))
    model, _ = pool.candidate(unchanged)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, pool.vision.model(**inputs).logits)
    merged = blender.apply(Recipe(sources, 4, "linear", 0, 2, ((0.7, 0.4), (0.3, 0.6))))
    model, _ = pool.candidate(merged)
    name = "model.layers.3.mlp.down_proj.weight"
    want = 0.4 * pool.base.model.get_parameter(name) + 0.6 * pool.sources[1].model.get_parameter(name)
    assert torch.allclose(model.model.language_model.layers[3].mlp.down_proj.weight, want, atol=1e-6)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, pool.vision.model(**inputs).logits)
    assert pool.vision.model.model.language_model.layers[3].mlp.down_proj.weight.data_ptr() != \
        model.model.language_model.layers[3].mlp.down_proj.weight.data_ptr()  # the VLM's own weights untouched


@pytest.fixture(scope="module")
def narrow_vlm_dir(tmp_path_factory):
    """A tiny LLaVA whose language model is 32 wide (the LLM's is 48)."""
    tokenizer = build_vlm_tokenizer()
    return save_vlm(*tiny_vlm(tokenizer, seed=2, hidden=32), tmp_path_factory.mktemp("narrow") / "vlm")


@pytest.fixture(scope="module")
def unsupported_vlm_dir(tmp_path_factory):
    """A folder whose config is a vision-language architecture no family handles (Idefics3, SmolVLM's)."""
    folder = tmp_path_factory.mktemp("idefics3") / "vlm"
    folder.mkdir()
    text = {"model_type": "llama", "hidden_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4}
    (folder / "config.json").write_text(json.dumps({"model_type": "idefics3", "vision_config": {},
                                                    "text_config": text}))
    return folder


def test_a_language_model_of_another_hidden_size_is_refused_naming_it(narrow_vlm_dir, tiny_vlm_dirs):
    with pytest.raises(IncompatibleSources, match=r"^sources 0 and 1 differ in hidden_size: 32 vs 48$"):
        SourcePool.load([str(narrow_vlm_dir), str(tiny_vlm_dirs["llm"])])


def test_an_unsupported_vlm_family_is_refused_naming_it(unsupported_vlm_dir, tiny_vlm_dirs):
    with pytest.raises(SourceError, match=r"unsupported vision-language architecture 'idefics3'; supported: llava"):
        SourcePool.load([str(unsupported_vlm_dir), str(tiny_vlm_dirs["llm"])])


@pytest.mark.parametrize("which", ["narrow", "unsupported"])
def test_the_cli_refuses_them_in_one_line_with_exit_2(which, narrow_vlm_dir, unsupported_vlm_dir, tiny_vlm_dirs,
                                                      tmp_path):
    import yaml

    vlm = narrow_vlm_dir if which == "narrow" else unsupported_vlm_dir
    config = tmp_path / "vlm.yaml"
    config.write_text(yaml.safe_dump({"sources": [str(vlm), str(tiny_vlm_dirs["llm"])],
                                      "tasks": {"image_qa_e_dev": 1.0}, "limit": 2, "out": str(tmp_path / "run")}))
    result = run_cli("eval", str(config))
    assert_refused(result, "hidden_size: 32 vs 48" if which == "narrow" else "'idefics3'")


def test_each_source_alone_is_scored_as_itself(tiny_vlm_pool):
    vlm, processor = tiny_vlm_pool.alone(0)
    llm, tokenizer = tiny_vlm_pool.alone(1)
    assert vlm is not tiny_vlm_pool.vision.model and type(vlm).__name__ == "LlavaForConditionalGeneration"
    assert processor is tiny_vlm_pool.vision.processor
    assert llm is tiny_vlm_pool.sources[1].model and tokenizer is tiny_vlm_pool.tokenizer_for(1)


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


def test_a_vlm_whose_config_claims_fewer_layers_than_its_weights_is_refused(tiny_vlm_dirs, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_vlm_dirs["vlm"], tmp_path / "short")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"config.json says 3 layers \(num_hidden_layers\) while its weights hold 4"):
        SourcePool.load([str(folder)])
