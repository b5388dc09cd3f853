"""Hostile input about models: invalid scales, NaN weights, the wrong sources, changed weights, dead ends.

Every row: exit code 2, one line naming the problem, no traceback, nothing written where the command failed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from builders import assert_refused, run_cli, tree_state
from safetensors.torch import load_file, save_file
from synthetic import assert_best_is_the_logged_best

from dfs_merge.genome import Genome, Route
from dfs_merge.genome_files import genome_to_dict, save_genome


def genome_file(folder: Path, sources: list[Path], name: str = "g.genome.yaml", **edits) -> Path:
    """A genome over two sources (route 0:0-1, 1:1, 0:2-3; repeats 2) as a file, with `edits` applied to its
    YAML mapping."""
    g = Genome.from_route(Route.parse("0:0-1, 1:1, 0:2-3"), [str(s) for s in sources], [4] * len(sources), 2)
    data = genome_to_dict(g)
    data.update(edits)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_config(folder: Path, sources: list[Path], suite: Path, out: Path, **edits) -> Path:
    """A tiny evolve/eval config over `sources` and the tiny multiple-choice task."""
    cfg = {"sources": [str(s) for s in sources], "repeats": 1, "tasks": {"tiny_mc": 1.0}, "limit": 4,
           "eval_suites": [str(suite)], "population": 2, "generations": 0, "max_length": 64, "out": str(out),
           **edits}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def sources(tiny_source_dirs, tmp_path) -> list[Path]:
    """Private copies of the two tiny sources (tests edit them)."""
    out = []
    for i, d in enumerate(tiny_source_dirs):
        out.append(Path(shutil.copytree(d, tmp_path / f"src{i}")))
    return out


# ---- scales: finite and positive wherever a genome is read ----------------------------------------
@pytest.mark.parametrize("field, value, phrase", [
    ("hop_scales", [1.0, float("nan"), 1.0, 1.0, 1.0], "hop_scales.1"),
    ("hop_scales", [1.0, 0.0, 1.0, 1.0, 1.0], "hop_scales.1"),
    ("hop_scales", [1.0, float("inf"), 1.0, 1.0, 1.0], "hop_scales.1"),
    ("hop_scales", [1.0, -0.5, 1.0, 1.0, 1.0], "hop_scales.1"),
    ("scales", [[1.0, 1.0, float("nan"), 1.0]] + [[1.0] * 4 for _ in range(3)], "scales"),
    ("scales", [[1.0, 1.0, 0.0, 1.0]] + [[1.0] * 4 for _ in range(3)], "scales"),
])
@pytest.mark.parametrize("command", ["show", "export", "export-mergekit"])
def test_a_scale_that_is_not_finite_and_positive_is_refused_by_every_command(sources, tmp_path, field, value, phrase,
                                                                              command):
    edits = {field: value}
    if field == "hop_scales":
        edits["bits"] = None  # read the route and its hop scales, not the bits
    path = genome_file(tmp_path, sources, **edits)
    before = tree_state(tmp_path)
    argv = {"show": ["show", path], "export": ["export", path, "--out", tmp_path / "out"],
            "export-mergekit": ["export", path, "--format", "mergekit", "--out", tmp_path / "out.yaml"]}[command]
    assert_refused(run_cli(*argv), phrase)
    assert tree_state(tmp_path) == before


def test_an_export_of_a_model_that_gives_nan_is_not_called_verified(sources, tmp_path):
    weights = sources[0] / "model.safetensors"
    state = load_file(weights)
    state["model.layers.2.mlp.down_proj.weight"] = torch.full_like(state["model.layers.2.mlp.down_proj.weight"],
                                                                   float("nan"))
    save_file(state, weights, metadata={"format": "pt"})
    path = genome_file(tmp_path, sources)
    result = run_cli("export", path, "--out", tmp_path / "out")
    assert_refused(result, "verify failed", "non-finite logits")
    assert not (tmp_path / "out").exists()


# ---- the wrong model, silently ---------------------------------------------------------------------
def test_eval_of_a_genome_on_other_sources_is_refused(sources, tiny_suite_dir, tmp_path, tiny_source_dirs):
    other = Path(shutil.copytree(sources[1], tmp_path / "other"))
    weights = other / "model.safetensors"
    state = load_file(weights)
    state["model.norm.weight"] = state["model.norm.weight"] * 2
    save_file(state, weights, metadata={"format": "pt"})
    g = genome_file(tmp_path, sources)
    cfg = run_config(tmp_path, [sources[0], other], tiny_suite_dir, tmp_path / "run")
    assert_refused(run_cli("eval", cfg, "--genome", g), "source 1", "other weights")
    same = Path(shutil.copytree(sources[1], tmp_path / "copy"))  # the same weights elsewhere are the same model
    cfg = run_config(tmp_path, [sources[0], same], tiny_suite_dir, tmp_path / "run")
    assert run_cli("eval", cfg, "--genome", g).code == 0


def test_a_source_whose_config_claims_more_layers_than_its_weights_hold_is_refused(sources, tmp_path):
    config = json.loads((sources[0] / "config.json").read_text())
    config["num_hidden_layers"] = 6
    (sources[0] / "config.json").write_text(json.dumps(config))
    g = Genome.from_route(Route.parse("0:0-5"), [str(sources[0])], [6], 1)
    save_genome(g, tmp_path / "six.genome.yaml")
    assert_refused(run_cli("export", tmp_path / "six.genome.yaml", "--out", tmp_path / "out"),
                   "the weights lack", "model.layers.4")
    assert not (tmp_path / "out").exists()


def test_resume_after_a_source_changed_is_refused_and_export_of_its_genome_too(sources, tiny_suite_dir, tmp_path):
    out = tmp_path / "run"
    cfg = run_config(tmp_path, sources, tiny_suite_dir, out)
    assert run_cli("evolve", cfg).code == 0
    best = yaml.safe_load((out / "best.genome.yaml").read_text())
    assert all(s["fingerprint"].startswith("blake2b:") for s in best["sources"])
    weights = sources[1] / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.mlp.up_proj.weight"] += 0.01
    save_file(state, weights, metadata={"format": "pt"})
    before = tree_state(out)
    assert_refused(run_cli("evolve", cfg, "--resume"), "source 1", "weights changed")
    assert tree_state(out) == before
    assert_refused(run_cli("export", out / "best.genome.yaml", "--out", tmp_path / "exported"), "source 1",
                   "changed since")
    assert not (tmp_path / "exported").exists()


# ---- dead ends -------------------------------------------------------------------------------------
def test_a_run_that_failed_before_its_first_evaluation_can_be_run_again(sources, tiny_suite_dir, tmp_path):
    out = tmp_path / "run"
    bad = run_config(tmp_path, sources, tiny_suite_dir, out, tasks={"no_such_task_dev": 1.0})
    assert_refused(run_cli("evolve", bad), "no_such_task_dev")
    good = run_config(tmp_path, sources[::-1], tiny_suite_dir, out)  # fixed, and with the sources swapped
    assert run_cli("evolve", good).code == 0, "the fixed config runs in the same folder without --resume"
    assert_best_is_the_logged_best(out)


@pytest.mark.parametrize("damage, phrase", [
    (lambda s: s.pop("population"), "not a checkpoint this run can continue from"),
    (lambda s: s.update(population=[{"key": 3}]), "lacks the evaluation"),
    (lambda s: s["population"][0].update(genome=[1, 2]), "not a checkpoint this run can continue from"),
    (lambda s: s.update(rng="nope"), "not a checkpoint this run can continue from"),
    (lambda s: s["population"].append({"key": "0" * 16, "genome": s["population"][0]["genome"]}), "lacks the evaluation"),
])
def test_a_damaged_checkpoint_is_one_line_that_says_how_to_go_on(sources, tiny_suite_dir, tmp_path, damage, phrase):
    out = tmp_path / "run"
    cfg = run_config(tmp_path, sources, tiny_suite_dir, out, generations=1)
    assert run_cli("evolve", cfg).code == 0
    state = json.loads((out / "checkpoint.json").read_text())
    damage(state)
    (out / "checkpoint.json").write_text(json.dumps(state))
    before = tree_state(out)
    assert_refused(run_cli("evolve", cfg, "--resume"), phrase, "move", "evals.jsonl")
    assert tree_state(out) == before
    (out / "checkpoint.json").rename(tmp_path / "checkpoint.json.damaged")  # the way out the message offers
    lines = (out / "evals.jsonl").read_text().count("\n")
    assert run_cli("evolve", cfg, "--resume").code == 0
    assert (out / "evals.jsonl").read_text().count("\n") == lines  # every evaluation reused


@pytest.mark.parametrize("sizes", ["4", "2,9"])
def test_baseline_sizes_larger_than_the_layer_count_are_refused_before_loading(sources, tiny_suite_dir, tmp_path,
                                                                                sizes):
    cfg = run_config(tmp_path, sources[:1], tiny_suite_dir, tmp_path / "run", report_tasks=["tiny_mc"])
    assert_refused(run_cli("baseline", cfg, "--sizes", sizes), "--sizes", "4 layers")
