"""A merge whose base is a vision-language model, exported as that VLM: a tiny VLM (source 0) of each supported
family (LLaVA, Idefics3, SmolVLM, Gemma 3) and a tiny LLM of its hidden space; a DFS route and a PS recipe over them,
scored on the bundled image suite through lm-eval, then written as a plain checkpoint of the VLM's class whose logits
on a picture and a question are the stitched (merged) model's; mergekit and GGUF refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from builders import IMAGE_TOKEN, assert_refused, picture, run_cli, tree_state
from transformers import AutoModelForImageTextToText, AutoProcessor

from dfs_merge.candidate import CandidateScorer
from dfs_merge.errors import ExportError
from dfs_merge.export.vlm import export_vlm
from dfs_merge.fitness.score import Fitness
from dfs_merge.genome import Genome, Route
from dfs_merge.genome_files import save_genome
from dfs_merge.merging.blend import Blender
from dfs_merge.merging.recipe import Recipe
from dfs_merge.stitch import stitch

ROUTE = "0:0-2, 1:1-3, 0:1-3"  # both sources, a repeated block, pinned ends
SCALES = [1.0, 1.25, 1.0, 0.8, 1.0, 1.1, 1.0, 0.9, 1.0]
TASKS = {"image_qa_e_dev": 1.0, "image_qa_j_dev": 1.0}
QUESTION = "What is it? Answer:"


def route_genome(pool) -> Genome:
    return Genome.from_route(Route.parse(ROUTE, SCALES), list(pool.paths), [4, 4], 2)


def recipe(pool) -> Recipe:
    return Recipe(tuple(pool.paths), 4, "task_arithmetic", 0, 2, ((0.5, 0.2),), lam=0.8)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module")
def image_fitness(tmp_path_factory):
    return Fitness(TASKS, limit=2, batch_size=2, max_length=256, cache_dir=tmp_path_factory.mktemp("lm-eval"))


def score_export_and_compare(pool, genome, fitness, folder):
    """Score `genome` over `pool` on the image suite, export it as the VLM (verified in full), check the folder, and
    compare the export's logits on a picture and a question (and on text) with the stitched (merged) VLM's; the
    loaded export."""
    scored = CandidateScorer(pool, fitness).genome(genome)
    assert scored.ok and set(scored.tasks) == set(TASKS), scored.error

    out = export_vlm(pool, genome, folder, verify="full")
    assert (out / "processor_config.json").is_file() and (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert all(f"`{p}`" in card for p in pool.paths)
    assert f"| {pool.vision.model_type} |" in card and f"| {pool.family.name} |" in card
    assert "AutoModelForImageTextToText.from_pretrained" in card
    assert "greedy generations (16 new tokens) identical" in card
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(pool.vision.model).__name__]
    assert config["text_config"]["num_hidden_layers"] == (len(SCALES) if isinstance(genome, Genome) else 4)

    loaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(loaded) is type(pool.vision.model)
    processor = AutoProcessor.from_pretrained(out)
    inputs = dict(processor(images=[picture((30, 60, 220))], text=[f"{processor.image_token}\n{QUESTION}"],
                            return_tensors="pt"))
    lm = stitch(pool, genome.check()) if isinstance(genome, Genome) else Blender(pool, keep=0).apply(genome)
    stitched, _ = pool.candidate(lm)
    with torch.no_grad():
        want, got = stitched(**inputs).logits, loaded(**inputs).logits
        text = {"input_ids": processor.tokenizer([QUESTION], return_tensors="pt")["input_ids"]}
        assert relative(stitched(**text).logits, loaded(**text).logits) < 1e-5
    assert relative(want, got) < 1e-5, relative(want, got)
    written = loaded.state_dict()
    for name, t in pool.vision.vision_tensors().items():  # the vision tower and projector: the base VLM's own
        assert torch.equal(written[name], t), name
    if pool.family.name == "gemma3":  # each written layer's attention type: its hop's layer's (a recipe's: the base's)
        hops = genome.check() if isinstance(genome, Genome) else Route.parse("0:0-3")
        assert config["text_config"]["layer_types"] == [pool.layer_type(h.source, h.layer) for h in hops]

    again = fitness.score(loaded, processor)  # the export scores as the candidate did
    assert {n: t.value for n, t in again.tasks.items()} == {n: t.value for n, t in scored.tasks.items()}
    return loaded


@pytest.mark.parametrize("kind", ["route", "recipe"])
def test_scored_on_the_image_suite_then_exported_as_the_vlm(kind, vlm_pool, image_fitness, tmp_path):
    pool = vlm_pool
    genome = route_genome(pool) if kind == "route" else recipe(pool)
    score_export_and_compare(pool, genome, image_fitness, tmp_path / "vlm")


@pytest.mark.parametrize("kind", ["route", "recipe"])
def test_an_llm_of_a_prefix_vocabulary_scores_and_exports_with_the_vlm(kind, tiny_prefix_pool, image_fitness,
                                                                        tmp_path):
    """The tiny LLM's 320 tokens are a prefix of the VLM's 321 (`<image>` appended), as Mistral-7B's are of
    LLaVA-1.6-Mistral's: the route keeps the VLM's embeddings and head; the recipe merges their first 320 rows."""
    pool = tiny_prefix_pool
    genome = route_genome(pool) if kind == "route" else recipe(pool)
    loaded = score_export_and_compare(pool, genome, image_fitness, tmp_path / "vlm")
    written = {"embed": loaded.model.language_model.embed_tokens.weight, "head": loaded.lm_head.weight}
    base = {"embed": pool.base.model.model.embed_tokens.weight, "head": pool.base.model.lm_head.weight}
    llm = {"embed": pool.sources[1].model.model.embed_tokens.weight, "head": pool.sources[1].model.lm_head.weight}
    for part, w in (("embed", 0.5), ("head", 0.2)):  # the recipe's first and last layer group's weights
        assert written[part].shape == (321, 48) and torch.equal(written[part][320:], base[part][320:])
        want = base[part] if kind == "route" else base[part][:320] + 0.8 * w * (llm[part] - base[part][:320])
        assert torch.allclose(written[part][:320], want[:320], rtol=0, atol=1e-6), part


def test_the_identity_route_exports_the_vlm_itself(vlm_pool, tmp_path):
    pool = vlm_pool
    genome = Genome.from_route(Route.parse("0:0-3"), list(pool.paths), [4, 4], 2)
    loaded = AutoModelForImageTextToText.from_pretrained(export_vlm(pool, genome, tmp_path / "same")).eval()
    vlm = pool.vision.model.state_dict()
    assert type(loaded) is type(pool.vision.model) and set(loaded.state_dict()) == set(vlm)
    assert all(torch.equal(t, vlm[n]) for n, t in loaded.state_dict().items())


def test_a_text_base_is_not_exported_as_a_vlm(tiny_pool, tmp_path):
    genome = Genome.from_route(Route.parse("0:0-3"), list(tiny_pool.paths), [4, 4], 2)
    with pytest.raises(ExportError, match=r"^source 0 \(.*\) is not a vision-language model"):
        export_vlm(tiny_pool, genome, tmp_path / "out")


@pytest.fixture(scope="module")
def genome_file(tiny_vlm_pool, tmp_path_factory):
    path = tmp_path_factory.mktemp("genome") / "vlm.yaml"
    save_genome(route_genome(tiny_vlm_pool), path)
    return path


def test_the_cli_exports_the_vlm_with_format_hf(vlm_pool, tmp_path):
    save_genome(route_genome(vlm_pool), tmp_path / "vlm.yaml")
    result = run_cli("export", tmp_path / "vlm.yaml", "--out", tmp_path / "vlm")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "vlm" / "config.json").read_text())["model_type"] == vlm_pool.vision.model_type


@pytest.mark.parametrize("fmt,why", [("mergekit", "mergekit's configs merge language models only"),
                                     ("gguf", "separate mmproj file")])
def test_mergekit_and_gguf_are_refused_in_one_line(fmt, why, genome_file, tmp_path):
    before = tree_state(tmp_path)
    result = run_cli("export", genome_file, "--out", tmp_path / f"out.{fmt}", "--format", fmt)
    assert_refused(result, f"--format {fmt}: source 0 is a vision-language model (llava)", why, "--format hf")
    assert tree_state(tmp_path) == before


@pytest.fixture(scope="module")
def next_pool(tiny_vlm_dirs, tmp_path_factory):
    """A tiny LLaVA-NeXT (the base) and the tiny LLM, loaded."""
    from builders import build_vlm_tokenizer, save_vlm, tiny_vlm

    from dfs_merge.models.sources import SourcePool

    folder = save_vlm(*tiny_vlm(build_vlm_tokenizer(), seed=3, kind="llava_next"),
                      tmp_path_factory.mktemp("next") / "vlm")
    return SourcePool.load([str(folder), str(tiny_vlm_dirs["llm"])])


def test_a_llava_next_base_reproduces_itself_and_exports(next_pool, tmp_path):
    pool = next_pool
    inputs = dict(pool.vision.processor(images=[picture()], text=[f"{IMAGE_TOKEN}\nWhat is it? Answer:"],
                                        return_tensors="pt"))
    assert "image_sizes" in inputs
    with torch.no_grad():
        same, _ = pool.candidate(stitch(pool, Route.parse("0:0-3")))
        assert torch.equal(same(**inputs).logits, pool.vision.model(**inputs).logits)
        genome = Genome.from_route(Route.parse(ROUTE, SCALES), list(pool.paths), [4, 4], 2)
        stitched, _ = pool.candidate(stitch(pool, genome.check()))
        loaded = AutoModelForImageTextToText.from_pretrained(export_vlm(pool, genome, tmp_path / "next")).eval()
        assert type(loaded).__name__ == "LlavaNextForConditionalGeneration"
        assert relative(stitched(**inputs).logits, loaded(**inputs).logits) < 1e-5
