"""The bundled image suite (eval_suites/image_qa_*): made here by make_image_data.py, disjoint splits, loaded
offline as lm-eval multimodal tasks, and scored through lm-eval's multimodal model type over a stitched and a
merged tiny VLM (a tiny LLaVA and a tiny Llama LLM)."""

from __future__ import annotations

import importlib.util
import json
import math
from collections import Counter

import pytest

from dfs_merge import CHECKOUT

SUITES = CHECKOUT / "eval_suites"
SPLITS = {"dev": 48, "val": 24, "test": 48}
TASKS = [f"image_qa_{lang}_{split}" for lang in "ej" for split in SPLITS]

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(lang: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (SUITES / "data" / f"image_qa_{lang}_{split}.jsonl").open(encoding="utf-8")]


def pixels(path) -> bytes:
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB").tobytes()


def test_splits_are_disjoint_and_balanced():
    seen: dict[bytes, str] = {}
    words: dict[str, set[str]] = {}
    for split, size in SPLITS.items():
        e, j = rows("e", split), rows("j", split)
        assert len(e) == len(j) == size
        assert [r["image"] for r in e] == [r["image"] for r in j]  # one picture, asked in English and in Japanese
        assert [r["kind"] for r in e] == [r["kind"] for r in j]
        assert Counter(r["kind"] for r in e) == dict.fromkeys(("colour", "shape", "count", "text"), size // 4)
        for r in e:
            png = pixels(SUITES / r["image"])
            assert png not in seen, (r["image"], seen.get(png))  # no picture twice, in any split
            seen[png] = r["image"]
        words[split] = {r["answer"] for r in e if r["kind"] == "text"}
        assert all("<image>" not in r["prompt"] for r in e + j)  # the template puts the picture first
        assert all(any("\u3040" <= ch <= "\u9fff" for ch in r["prompt"]) for r in j)
    assert not words["dev"] & words["val"] and not words["dev"] & words["test"] and not words["val"] & words["test"]


def test_the_generator_writes_the_committed_files(tmp_path):
    spec = importlib.util.spec_from_file_location("_make_image_data", SUITES / "make_image_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    written = mod.build(tmp_path)
    assert written == {f"image_qa_{lang}_{split}.jsonl": n for split, n in SPLITS.items() for lang in "ej"}
    for name in written:
        assert (tmp_path / name).read_bytes() == (SUITES / "data" / name).read_bytes(), name
    made = sorted((tmp_path / "images" / "image_qa").glob("*.png"))
    assert [p.name for p in made] == sorted(p.name for p in (SUITES / "data" / "images" / "image_qa").glob("*.png"))
    for p in made:
        assert pixels(p) == pixels(SUITES / "data" / "images" / "image_qa" / p.name), p.name


@pytest.fixture(scope="module")
def image_fitness(tmp_path_factory):
    from dfs_merge.fitness.score import Fitness

    return Fitness({"image_qa_e_dev": 1.0, "image_qa_j_dev": 1.0, "arith_gen_dev": 0.5}, limit=3, batch_size=2,
                   max_length=256, cache_dir=tmp_path_factory.mktemp("lm-eval"))


def test_the_tasks_load_offline_as_multimodal_tasks(image_fitness):
    from PIL import Image

    assert image_fitness.image_tasks() == ["image_qa_e_dev", "image_qa_j_dev"]
    task = image_fitness.tasks["image_qa_j_dev"]
    doc = next(iter(task.test_docs()))
    pictures = task.doc_to_image(doc)
    assert len(pictures) == 1 and isinstance(pictures[0], Image.Image) and pictures[0].size == (96, 96)
    assert task.doc_to_text(doc).startswith("<image>\n質問: ")
    assert image_fitness.describe()["image_qa_e_dev"]["metric"] == "exact_match,strip"


def test_a_route_and_a_recipe_over_the_vlm_and_the_llm_are_scored_on_the_pictures(tiny_vlm_pool, image_fitness):
    from lm_eval.models.hf_vlms import HFMultimodalLM

    from dfs_merge.candidate import CandidateScorer
    from dfs_merge.fitness.lm_eval_glue import candidate_vlm_class
    from dfs_merge.merging.recipe import Recipe
    from dfs_merge.route import Route

    pool = tiny_vlm_pool
    pictures = []
    hook = pool.vision.model.model.vision_tower.register_forward_hook(
        lambda module, args, out: pictures.append(args[0].shape[0]))
    try:
        scorer = CandidateScorer(pool, image_fitness)
        by_route = scorer(Route.parse("0:0-1, 1:1-3, 0:3", [1.0, 1.0, 0.9, 1.0, 1.1, 1.0]))
        seen_by_route = sum(pictures)
        by_recipe = scorer.genome(Recipe(tuple(pool.paths), 4, "linear", 0, 2, ((0.7, 0.4), (0.3, 0.6))))
    finally:
        hook.remove()
    assert issubclass(candidate_vlm_class(), HFMultimodalLM)
    for ev in (by_route, by_recipe):
        assert ev.ok, ev.error
        assert set(ev.tasks) == {"image_qa_e_dev", "image_qa_j_dev", "arith_gen_dev"}
        assert all(math.isfinite(t.value) and t.docs == 3 for t in ev.tasks.values())
    assert seen_by_route == 6 and sum(pictures) == 12  # every document's picture went through the vision tower


def test_image_tasks_need_a_vision_language_base(tiny_pool, image_fitness, tiny_source_dirs, tmp_path):
    import yaml
    from builders import assert_refused, run_cli

    from dfs_merge.candidate import check_images
    from dfs_merge.errors import FitnessError

    with pytest.raises(FitnessError, match=r"^tasks image_qa_e_dev, image_qa_j_dev show images: the base source "
                                           r"\(source 0, .*\) must be a vision-language model, and it is a llama"):
        check_images(tiny_pool, image_fitness)
    config = tmp_path / "text.yaml"
    config.write_text(yaml.safe_dump({"sources": [str(tiny_source_dirs[0])], "tasks": {"image_qa_e_dev": 1.0},
                                      "limit": 2, "out": str(tmp_path / "run")}))
    assert_refused(run_cli("eval", str(config)), "tasks image_qa_e_dev show images", "must be a vision-language model")
