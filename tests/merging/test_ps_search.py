"""Parameter-space merging: the resident model (merges in place, only what changed), the recipe file, the
search (every algorithm, resume after SIGKILL on the zoo), export, the hybrid, and the refusals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from builders import assert_refused, run_cli
from synthetic import QUIET, TargetRecipe, evals, make_config, outcome, write_fake_sources

from dfs_merge.errors import ConfigError, GenomeError
from dfs_merge.genome_files import genome_from_dict, genome_to_dict, load_genome, save_genome
from dfs_merge.merging.blend import Blender, recipe_model
from dfs_merge.merging.methods import METHODS, merge_tensor
from dfs_merge.merging.recipe import Recipe, initial_recipe
from dfs_merge.models.sources import SourcePool
from dfs_merge.search.evolution import run_evolution

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
ZOO = ROOT / "models" / "zoo"
MERGE = {"method": "ties", "base": 0, "layer_groups": 2, "weight_range": [0.0, 1.0], "density_range": [0.2, 1.0]}


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> list[str]:
    return write_fake_sources(tmp_path_factory.mktemp("fake_ps"), n=3)


@pytest.fixture(scope="module")
def three(tiny_source_dirs, tiny_trained_dir) -> list[str]:
    return [str(tiny_source_dirs[0]), str(tiny_source_dirs[1]), str(tiny_trained_dir)]


def logits(model, n: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 3 + n).reshape(1, n)).logits


# ---- the resident model -----------------------------------------------------------------------
def test_blender_equals_merging_each_tensor_and_recomputes_only_changed_groups(three):
    pool = SourcePool.load(three)
    before = [logits(s.model) for s in pool.sources]
    recipe = Recipe(tuple(three), 4, "task_arithmetic", 0, 2, ((0.5, 0.9), (0.3, 1.2)))
    blender = Blender(pool)
    model = blender.apply(recipe)
    states = [dict(s.model.named_parameters()) for s in pool.sources]
    for name, p in model.named_parameters():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        g = recipe.group(layer) if layer is not None else (0 if "embed" in name else 1)
        want = merge_tensor(METHODS["task_arithmetic"], [states[1][name], states[2][name]], recipe.params(g)[0],
                            base=states[0][name])
        assert torch.equal(p, want), name
    assert blender.recomputed == len(blender.tensors)
    # one group changed: only the tensors of layers 2-3 and the final norm (the last group) are merged again
    moved = recipe.with_bits((), (0.5, 0.9, 0.3, 0.7))
    blender.apply(moved)
    changed = [t for t in blender.tensors if blender.group_of(t, moved) == 1]
    assert blender.recomputed == len(changed) < len(blender.tensors)
    assert torch.equal(logits(blender.model), logits(recipe_model(moved, pool)))  # as a fresh merge
    for s, was in zip(pool.sources, before, strict=True):  # the sources are left as they were
        assert torch.equal(logits(s.model), was)


def test_tensors_shared_by_all_sources_are_never_merged_nor_copied(tiny_source_dirs):
    pool = SourcePool.load([str(tiny_source_dirs[0])] * 3)  # one model, loaded once: every tensor shared
    blender = Blender(pool)
    model = blender.apply(Recipe(("a", "b", "c"), 4, "ties", 0, 1, ((0.7,), (0.4,)), ((0.5,), (0.5,))))
    assert blender.recomputed == 0
    base_ptrs = {p.data_ptr() for p in pool.base.model.parameters()}
    assert all(p.data_ptr() in base_ptrs for p in model.parameters())
    assert torch.equal(logits(model), logits(pool.base.model))


def test_linear_merge_of_one_model_with_itself_is_that_model(tiny_source_dirs):
    pool = SourcePool.load([str(tiny_source_dirs[0])] * 2)
    model = recipe_model(Recipe(("a", "a"), 4, "linear", None, 2, ((0.3, 2.0), (0.7, 1.0))), pool)
    torch.testing.assert_close(logits(model), logits(pool.base.model), rtol=1e-5, atol=1e-5)


def test_dare_masks_depend_on_the_seed_only():
    base, other = torch.zeros(200, 300), torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    from dfs_merge.merging.methods import tensor_generator

    def merged(seed: int) -> torch.Tensor:
        return merge_tensor(METHODS["dare_linear"], [other], [1.0], base=base, densities=[0.3], rescale=False,
                            generator=tensor_generator(seed, "w"))

    a, b, c = merged(1), merged(1), merged(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs((a != 0).float().mean().item() - 0.3) < 0.01


# ---- the recipe file --------------------------------------------------------------------------
def test_recipe_file_round_trip_and_key(tmp_path, fake):
    r = initial_recipe(fake, 4, "dare_ties", 0, 2, 0.5, 0.7, seed=3)
    path = tmp_path / "r.yaml"
    save_genome(r, path)
    back = load_genome(path)
    assert back == r and back.key() == r.key()
    assert yaml.safe_load(path.read_text())["densities"] == {1: [0.7, 0.7], 2: [0.7, 0.7]}
    assert replace(r, seed=4).key() != r.key()
    assert replace(r, method="dare_linear").key() != r.key()


def test_new_method_recipes_round_trip_through_their_file_and_keep_distinct_keys(tmp_path, fake):
    a, b, c = fake
    slerp = Recipe((a, b), 4, "slerp", 0, 2, ((0.5, 0.4),), filters=("self_attn", "mlp"),
                   filtered=(((0.1, 0.9),), ((1.0, 0.25),)))
    recipes = [slerp,
               Recipe((a, b, c), 4, "della", 0, 2, ((0.5, 0.4), (0.2, 0.3)), ((0.5, 0.5), (0.6, 0.6)), seed=2,
                      options=(("epsilon", 0.1),)),
               Recipe((a, b, c), 4, "breadcrumbs", 0, 1, ((0.5,), (0.2,)), ((0.5,), (0.6,))),
               Recipe((b, c), 4, "nuslerp", None, 1, ((0.5,), (0.2,)), options=(("nuslerp_row_wise", True),)),
               Recipe((a, b, c), 4, "model_stock", 0, 1, ())]
    for r in recipes:
        save_genome(r, tmp_path / "r.yaml")
        assert load_genome(tmp_path / "r.yaml") == r and load_genome(tmp_path / "r.yaml").key() == r.key()
    data = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert "weights" not in data and data["options"] == {"filter_wise": False} and "normalize" not in data
    assert dict(recipes[2].options) == {"gamma": 0.01}  # the method's default made explicit
    assert replace(slerp, filters=("mlp", "self_attn")).key() != slerp.key()
    assert replace(recipes[1], options=(("epsilon", 0.2),)).key() != recipes[1].key()
    assert replace(recipes[1], seed=3).key() != recipes[1].key()
    seeds = slerp.seeds()
    assert [s.weights for s in seeds] == [((0.5, 0.4),), ((1.0, 1.0),)] and seeds[1].filtered == (((1.0, 1.0),),) * 2
    assert len(slerp.scales) == 6 and slerp.with_bits((), [x / 10 for x in range(6)]).filtered == (((0.2, 0.3),), ((0.4, 0.5),))
    for bad, phrase in (({"options": (("gamma", 0.1),)}, "options: 'gamma' is not a parameter of method slerp"),
                        ({"filters": ("mlp",)}, "filters: 1 filters but 2 blocks"),
                        ({"weights": ((1.5, 0.4),)}, "weights[1][0]: t 1.5 is outside [0, 1]")):
        with pytest.raises(GenomeError, match=re.escape(phrase)):
            replace(slerp, **bad)


@pytest.mark.parametrize("change, phrase", [
    ({"method": "sce"}, "method: unknown merge method 'sce'"),
    ({"base": None}, "base: method dare_ties needs a base"),
    ({"weights": {1: [0.5], 2: [0.5, 0.5]}}, "weights[1]: expected 2 values"),
    ({"weights": {1: [0.5, 0.5]}}, "weights: no row for source 2"),
    ({"densities": {1: [0.5, 1.5], 2: [1, 1]}}, "densities[1][1]: 1.5 is outside (0, 1]"),
    ({"densities": {1: [0.0, 1.0], 2: [1, 1]}}, "densities[1][0]: 0.0 is outside (0, 1]"),
    ({"weights": {1: [".nan", 0.5], 2: [1, 1]}}, "weights[1][0]: nan is not a finite number"),
    ({"layer_groups": 9}, "layer_groups: 9 is not between 1 and the 4 layers"),
    ({"ends": "yes"}, "ends"),  # a real boolean only
    ({"ends": True}, "weights[1]: expected 4 values"),  # rows of 2 where ends needs layer groups + 2
])
def test_bad_recipe_files_are_one_line_exit_2(tmp_path, fake, change, phrase):
    data = genome_to_dict(initial_recipe(fake, 4, "dare_ties", 0, 2))
    data.update(change)
    if data.get("weights", {}).get(1, [None])[0] == ".nan":
        data["weights"][1][0] = float("nan")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(GenomeError) as err:
        load_genome(path)
    assert phrase in str(err.value)
    assert_refused(run_cli("show", str(path)), phrase.split(":")[0])


def test_run_config_refusals(tmp_path, fake):
    with pytest.raises(ValueError, match="needs a base model"):
        make_config(fake, tmp_path / "x", merge={**MERGE, "base": None})
    with pytest.raises(ValueError, match="density_range"):
        make_config(fake, tmp_path / "x", merge={**MERGE, "density_range": [0.0, 1.0]})
    with pytest.raises(ValueError, match="merge.base: 5"):
        make_config(fake, tmp_path / "x", merge={**MERGE, "base": 5})
    deeper = write_fake_sources(tmp_path / "deep", n=1, layers=6)
    with pytest.raises(ConfigError, match="sources of one depth"):
        run_evolution(make_config([fake[0], deeper[0]], tmp_path / "x", merge=MERGE), evaluate=TargetRecipe(), **QUIET)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"sources": fake, "tasks": {"t": 1.0}, "merge": {**MERGE, "method": "sce"}}))
    assert_refused(run_cli("evolve", str(cfg)), "merge.method")


# ---- the search -----------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["ga", "nsga2", "cmaes", "random"])
def test_every_algorithm_searches_recipes(fake, tmp_path, algorithm):
    fn = TargetRecipe()
    objectives = ["score", "hops"] if algorithm == "nsga2" else ["score"]
    r = run_evolution(make_config(fake, tmp_path / algorithm, merge=MERGE, algorithm=algorithm, generations=4,
                                  objectives=objectives), evaluate=fn, **QUIET)
    assert isinstance(r.best, Recipe) and r.best.method == "ties"
    lines = evals(tmp_path / algorithm)
    first = max(e["score"] for e in lines if e["generation"] == 0)
    assert r.best_eval.score >= first and len({e["key"] for e in lines}) == len(lines)
    assert all(0.0 <= x <= 1.0 for x in r.best.scales[:4]) and all(0.2 <= x <= 1.0 for x in r.best.scales[4:])
    assert load_genome(tmp_path / algorithm / "best.genome.yaml").key() == r.best.key()
    if algorithm == "cmaes":  # the centroid is the initial recipe, seeded with each source alone
        gen0 = [genome_from_dict(e["genome"]) for e in lines if e["generation"] == 0]
        assert gen0[0].weights == ((0.5, 0.5), (0.5, 0.5)) and gen0[1].weights == ((1, 1), (0, 0))


@pytest.mark.parametrize("merge, genes", [
    ({"method": "slerp", "filters": ["self_attn", "mlp"], "weight_range": [-1.0, 2.0]}, 6),  # t per group, per filter
    ({"method": "nuslerp", "base": None, "options": {"nuslerp_row_wise": True}}, 4),
    ({"method": "della", "options": {"epsilon": 0.1}, "density_range": [0.05, 1.0]}, 8),
    ({"method": "breadcrumbs_ties", "options": {"gamma": 0.05}}, 8),
])
def test_new_methods_are_searched_with_their_values_as_genes(fake, tmp_path, merge, genes):
    """Each method's numeric values are genes within their ranges (slerp's t within [0, 1] whatever
    weight_range says; DELLA's densities within density +- epsilon in (0, 1)); its options are kept."""
    sources = fake[:2] if merge["method"] == "slerp" else fake[1:] if merge.get("base", 0) is None else fake
    cfg = make_config(sources, tmp_path / "run", merge={**MERGE, **merge}, generations=3)
    r = run_evolution(cfg, evaluate=TargetRecipe(0.3), **QUIET)
    assert isinstance(r.best, Recipe) and r.best.method == merge["method"] and len(r.best.scales) == genes
    assert r.best.filters == tuple(merge.get("filters", ())) and all(v in dict(r.best.options).values()
                                                                      for v in merge.get("options", {}).values())
    lines = evals(tmp_path / "run")
    for e in lines:
        g = genome_from_dict(e["genome"])
        assert all(0.0 <= x <= 1.0 for x in g.scales[:len(g.scales) - len(g.densities) * 2])
        assert all(0.1 < x < 0.9 or x == 1.0 for row in g.densities for x in row) if g.method == "della" else True
    assert r.best_eval.score > max(e["score"] for e in lines if e["generation"] == 0) - 1e-12


def test_ends_give_the_embeddings_and_the_head_genes_of_their_own(three, fake, tmp_path):
    """`merge: {ends: true}`: each row is [embeddings, groups..., norm and head]; the embeddings take the first
    value, the final norm and LM head the last, the layers their group's; the file round-trips; the search has
    two more genes per row; a row of the wrong length is one line naming what it should hold."""
    pool = SourcePool.load(three)
    recipe = Recipe(tuple(three), 4, "task_arithmetic", 0, 2, ((0.1, 0.5, 0.9, 1.3), (0.2, 0.3, 1.2, 0.7)), ends=True)
    model = Blender(pool).apply(recipe)
    states = [dict(s.model.named_parameters()) for s in pool.sources]
    columns = set()
    for name, p in model.named_parameters():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        column = 1 + recipe.group(layer) if layer is not None else (0 if "embed" in name else 3)
        columns.add(column)
        want = merge_tensor(METHODS["task_arithmetic"], [states[1][name], states[2][name]],
                            tuple(row[column] for row in recipe.weights), base=states[0][name])
        assert torch.equal(p, want), name
    assert columns == {0, 1, 2, 3}
    path = tmp_path / "ends.recipe.yaml"
    save_genome(recipe, path)
    back = load_genome(path)
    assert back.key() == recipe.key() != replace(recipe, ends=False, weights=((0.1, 0.5), (0.2, 0.3))).key()
    assert back.table()[0].split()[-4:] == ["embed", "0-1", "2-3", "head"]
    data = genome_to_dict(recipe)
    data["weights"][1] = [0.1, 0.5, 0.9]
    with pytest.raises(GenomeError, match=r"weights\[1\]: expected 4 values \(one per layer group, plus the "
                                          r"embeddings' first and the norm and head's last \(ends\)\), got 3"):
        genome_from_dict(data)
    cfg = make_config(fake, tmp_path / "run", merge={**MERGE, "ends": True}, generations=2)
    r = run_evolution(cfg, evaluate=TargetRecipe(0.3), **QUIET)
    assert r.best.ends and len(r.best.scales) == 2 * 2 * (2 + 2)  # (weights + densities) x 2 sources x 4 columns


def test_a_recipe_source_is_fingerprinted_by_what_it_merges_not_by_its_file(three, tmp_path):
    """Scores or comments written into a recipe file (the validation step does) leave the hybrid's source the same;
    another weight makes it another source."""
    from dfs_merge.models.metadata import fingerprint

    recipe = Recipe(tuple(three), 4, "task_arithmetic", 0, 2, ((0.5, 0.9), (0.3, 1.2)))
    path = tmp_path / "r.recipe.yaml"
    save_genome(recipe, path)
    before = fingerprint(str(path))
    save_genome(replace(recipe, scores={"val": {"score": 0.5}}), path)
    path.write_text("# a comment\n" + path.read_text())
    assert fingerprint(str(path)) == before and before.startswith("blake2b:")
    save_genome(recipe.with_bits((), (0.5, 0.9, 0.3, 1.1)), path)
    assert fingerprint(str(path)) != before


def test_a_merge_config_without_filters_or_options_records_what_it_did_before(fake, tmp_path):
    """`merge.filters` and `merge.options` are left out of the recorded config while empty, so that a run made
    before they existed resumes (its search config, and so its digest, is unchanged)."""
    from dfs_merge.search.rundir import search_settings

    assert set(search_settings(make_config(fake, tmp_path / "x", merge=MERGE))["merge"]) == {
        "method", "base", "layer_groups", "weight_range", "density_range", "init_weight", "init_density",
        "normalize", "lam", "rescale", "seed"}
    given = search_settings(make_config(fake, tmp_path / "x", merge={**MERGE, "options": {"gamma": 0.1}}))["merge"]
    assert given["options"] == {"gamma": 0.1} and "filters" not in given


@pytest.mark.parametrize("backend", [pytest.param({"workers": 2}, id="process pool"),
                                     pytest.param({"workers": 2, "ray": "local"}, id="ray", marks=pytest.mark.slow)])
def test_backends_give_the_in_process_result(fake, tmp_path, backend):
    if "ray" in backend:
        pytest.importorskip("ray")
    one = run_evolution(make_config(fake, tmp_path / "one", merge=MERGE, generations=2), evaluate=TargetRecipe(),
                        **QUIET)
    two = run_evolution(make_config(fake, tmp_path / "two", merge=MERGE, generations=2, **backend),
                        evaluate=TargetRecipe(), **QUIET)
    assert one.best == two.best and outcome(tmp_path / "one") == outcome(tmp_path / "two")


def test_final_choice_on_validation_and_report_work_for_recipes(fake, tmp_path):
    """The shortlist by dev is scored on validation (another target here) and the best there is chosen."""
    out = tmp_path / "run"
    cfg = make_config(fake, out, merge=MERGE, generations=3, select_tasks=["synthetic_val"], select_top=4,
                      report_tasks=["synthetic_test"])
    r = run_evolution(cfg, evaluate=TargetRecipe(0.3), select_evaluate=TargetRecipe(0.9),
                      report_evaluate=TargetRecipe(0.5), **QUIET)
    by_dev = sorted(evals(out), key=lambda e: -e["score"])
    shortlist = [genome_from_dict(e["genome"]) for e in by_dev[:4]]
    assert r.best.key() == max(shortlist, key=lambda g: TargetRecipe(0.9)(g).score).key()
    best = yaml.safe_load((out / "best.genome.yaml").read_text())
    assert set(best["scores"]) == {"dev", "val", "test"} and r.test_eval is not None


ZOO_SCRIPT = """\
import os, signal, sys
from dfs_merge.config import RunConfig
from dfs_merge.fitness.score import Fitness
from dfs_merge.search.evolution import run_evolution
score, calls = Fitness.score, []
def dying(self, *args, **kwargs):  # the fault injected from inside the work: SIGKILL as candidate {die} begins
    calls.append(1)
    if len(calls) == {die}:
        os.kill(os.getpid(), signal.SIGKILL)
    return score(self, *args, **kwargs)
Fitness.score = dying
cfg = RunConfig(sources={sources!r}, merge={merge!r}, tasks={{"zoo_arith_j_dev": 1.0}}, limit=40, batch_size=64,
                max_length=256, algorithm="cmaes", population=6, generations=3, seed=1, threads=1, out={out!r})
run_evolution(cfg, resume={resume}, progress=False)
"""


@pytest.mark.slow
def test_zoo_ps_search_resumes_after_sigkill_with_nothing_evaluated_twice(tmp_path):
    sources = [str(ZOO / n) for n in ("base", "j", "m")]
    merge = {"method": "task_arithmetic", "base": 0, "layer_groups": 4, "init_weight": 1.0}

    def script(out: Path, resume: bool, die: int | None = None) -> Path:
        p = tmp_path / f"{out.name}_{resume}.py"
        p.write_text(ZOO_SCRIPT.format(sources=sources, merge=merge, out=str(out), resume=resume, die=die))
        return p

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    res = subprocess.run([sys.executable, str(script(straight, False))], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run([sys.executable, str(script(killed, False, die=10))], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert len(evals(killed)) == 9  # killed as the 10th candidate began: in generation 1
    logged = {e["key"] for e in evals(killed)}
    assert json.loads((killed / "checkpoint.json").read_text())["generation"] < 3
    res = subprocess.run([sys.executable, str(script(killed, True))], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    keys = [e["key"] for e in evals(killed)]
    assert len(keys) == len(set(keys)) and logged <= set(keys)  # nothing evaluated twice across the kill
    assert outcome(killed) == outcome(straight)
    assert all(e["error"] is None and 0 <= e["score"] <= 1 for e in evals(killed))


# ---- export and the hybrid ----------------------------------------------------------------------
def test_recipe_exports_as_a_verified_checkpoint_and_serves_as_a_hybrid_source(three, tmp_path):
    recipe = Recipe(tuple(three), 4, "ties", 0, 2, ((0.6, 1.0), (0.9, 0.4)), ((0.5, 0.8), (1.0, 0.3)))
    path = tmp_path / "ps.recipe.yaml"
    save_genome(recipe, path)
    res = run_cli("export", str(path), "--out", str(tmp_path / "out"), "--verify", "full")
    assert res.code == 0, res.err
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    want = logits(recipe_model(recipe, SourcePool.load(three)))
    torch.testing.assert_close(logits(exported), want, rtol=1e-5, atol=1e-5)
    assert load_genome(tmp_path / "out" / "dfs-merge-genome.yaml") == recipe
    card = (tmp_path / "out" / "README.md").read_text()
    assert "parameter-space merge (ties)" in card and "greedy generations (16 new tokens) identical" in card
    # the hybrid: DFS over (the recipe's merge, source 2)
    hybrid = SourcePool.load([str(path), three[2]])
    torch.testing.assert_close(logits(hybrid.sources[0].model), want, rtol=0, atol=0)
    from dfs_merge.genome import Genome, Route

    g = Genome.from_route(Route.parse("0:0-1, 1:2, 0:3"), [str(path), three[2]], [4, 4], 2, "slot")
    save_genome(g, tmp_path / "hybrid.yaml")
    res = run_cli("export", str(tmp_path / "hybrid.yaml"), "--out", str(tmp_path / "hybrid"))
    assert res.code == 0, res.err
    res = run_cli("show", str(tmp_path / "hybrid.yaml"), "--png", str(tmp_path / "h.png"))
    assert res.code == 0 and (tmp_path / "h.png").stat().st_size > 1000


def test_sources_of_other_shapes_are_refused_in_one_line(tiny_source_dirs, tmp_path, tiny_tokenizer):
    from builders import save_source, tiny_llama_config
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(len(tiny_tokenizer))
    cfg.intermediate_size *= 2
    other = save_source(LlamaForCausalLM(cfg), tiny_tokenizer, tmp_path / "wide")
    recipe = Recipe((str(tiny_source_dirs[0]), str(other)), 4, "task_arithmetic", 0, 1, ((1.0,),))
    save_genome(recipe, tmp_path / "r.yaml")
    res = run_cli("export", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o"))
    assert_refused(res, "differ in")


def test_scores_of_the_resident_model_are_never_stale(three, tiny_suite_dir, tmp_path):
    """The same resident model scored for one recipe then another equals a fresh one scored for the second."""
    from dfs_merge.candidate import CandidateScorer
    from dfs_merge.fitness.score import Fitness

    pool = SourcePool.load(three)
    fit = Fitness({"tiny_ppl": 1.0, "tiny_mc": 1.0}, suites=[tiny_suite_dir], max_length=512,
                  cache_dir=tmp_path / "cache")
    first = Recipe(tuple(three), 4, "task_arithmetic", 0, 2, ((0.2, 0.9), (1.0, 0.1)))
    second = first.with_bits((), (1.1, 0.3, 0.2, 0.8))
    reused = CandidateScorer(pool, fit)
    a, b = reused.genome(first), reused.genome(second)
    fresh = CandidateScorer(pool, fit).genome(second)
    assert a.score != b.score and b.score == fresh.score
    assert {k: t.value for k, t in b.tasks.items()} == {k: t.value for k, t in fresh.tasks.items()}


def test_magnitude_pruning_keeps_exactly_k_values_even_with_ties():
    from dfs_merge.merging.methods import magnitude_prune

    x = torch.randn(50, 40, generator=torch.Generator().manual_seed(3))
    kept = magnitude_prune(x, 0.25)
    k = int(0.25 * x.numel())
    top = torch.zeros(x.numel())
    top[torch.argsort(x.abs().reshape(-1), descending=True)[:k]] = 1  # mergekit's rule
    assert torch.equal(kept, x * top.reshape_as(x))
    ties = magnitude_prune(torch.tensor([3.0, -1.0, 1.0, 1.0, 0.5]), 0.4)  # k = 2, three values tie at |1|
    assert int((ties != 0).sum()) == 2 and ties[0] == 3.0
    assert magnitude_prune(torch.tensor([0.0, 0.0, 2.0]), 0.01).tolist() == [0.0, 0.0, 2.0]  # at least one kept
