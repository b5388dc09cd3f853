"""The bench scripts still run: each main() on the tiny models with tiny sizes (a few seconds in all)."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from dfs_merge import CHECKOUT
from dfs_merge.errors import ConfigError

BENCH = CHECKOUT / "bench"
sys.path.insert(0, str(BENCH))


@pytest.mark.slow
def test_throughput_runs_a_b_c_on_the_tiny_model(tmp_path):
    import bench_throughput

    out = tmp_path / "throughput.json"
    bench_throughput.main(["--models", "tiny", "--tasks", "cloze_mc_dev:2,prose_ppl_dev:1", "--repeats", "1",
                           "--threads", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    (model,) = result["models"]
    assert model["hops"] == 6 and model["memory"]["ratio_32_vs_1"] < 1.1
    for row in model["tasks"]:
        assert row["a_equals_b"], row  # mergekit's model scores what the stitched one scores
        assert row["A_s"] > 0 and row["C_s"] > 0 and row["B_write_s"] > 0 and row["B_load_s"] > 0
        # C runs every request whole; A runs a multiple-choice item's question once for all its choices
        shared = row["task"].startswith("cloze_mc")
        assert (row["tokens_in_a"] < row["tokens_forwarded"]) if shared else row["tokens_in_a"] == row["tokens_forwarded"]


@pytest.mark.slow
def test_throughput_without_b_writes_null_for_b_in_strict_json(tmp_path):
    import bench_throughput

    out = tmp_path / "throughput.json"
    bench_throughput.main(["--models", "tiny", "--tasks", "cloze_mc_dev:2", "--repeats", "1", "--threads", "0",
                           "--no-b", "--out", str(out)])
    # NaN is not JSON: a strict parser refuses it
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the result file"))
    (row,) = result["models"][0]["tasks"]
    assert row["A_s"] > 0 and row["C_s"] > 0
    assert row["B_s"] is None and row["B_over_A"] is None and row["a_equals_b"] is None


@pytest.mark.slow
def test_racing_zoo_bench_compares_a_raced_search_with_the_same_unraced(tmp_path):
    import bench_racing_zoo

    out = tmp_path / "racing_zoo.json"
    # 24 problems are too few for racing: auto (the bench's default) to race: {} races at every default anyway
    bench_racing_zoo.main(["--seeds", "3", "--generations", "1", "--population", "4", "--problems", "24",
                           "--racing", "{}", "--work", str(tmp_path / "runs"), "--out", str(out)])
    (row,) = json.loads(out.read_text())["seeds"]
    assert row["unraced"]["documents"] > row["raced"]["documents"] > 0
    assert row["documents_ratio"] == round(row["raced"]["documents"] / row["unraced"]["documents"], 3)
    assert row["unraced"]["best"]["score"] > -1e8 and row["raced"]["best"]["score"] > -1e8


@pytest.mark.slow
def test_prefix_cache_bench_is_identical_with_and_without_the_cache(tmp_path, tiny_source_dirs):
    import bench_prefix_cache

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "sources": [str(p) for p in tiny_source_dirs], "repeats": 2,
        "constraints": {"pin_ends": True, "min_hops": 3, "max_hops": 12},
        "tasks": {"cloze_mc_dev": 1.0}, "limit": 1, "population": 4, "out": str(tmp_path / "run"),
    }))
    out = tmp_path / "prefix_cache.json"
    bench_prefix_cache.main(["--config", str(config), "--population", "4", "--max-genomes", "2", "--limit", "1",
                             "--cache-mb", "64", "--threads", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [g["generation"] for g in result["generations"]] == [0, 1]
    assert all(g["all_identical"] for g in result["generations"])


def test_scaling_genomes_are_distinct_and_valid(tiny_source_dirs):
    from bench_scaling import random_genomes

    from dfs_merge.config import RunConfig

    cfg = RunConfig(sources=[str(p) for p in tiny_source_dirs], repeats=2, tasks={"cloze_mc_dev": 1.0},
                    constraints={"min_hops": 4, "max_hops": 12})
    genomes = random_genomes(cfg, 6)
    assert len({g.key() for g in genomes}) == 6
    assert all(4 <= len(g.check()) <= 12 for g in genomes)


def test_summary_reads_whatever_results_exist():
    import run_all

    for row in run_all.targets():
        assert {"target", "figure", "value", "met"} <= set(row)


@pytest.mark.slow
def test_ps_bench_times_the_merge_step_and_mergekit(tmp_path, tiny_source_dirs):
    from pathlib import Path

    import pytest

    if not (Path(sys.executable).parent / "mergekit-yaml").is_file():
        pytest.skip("mergekit-yaml is not installed (the test extra)")
    import bench_ps

    out = tmp_path / "ps.json"
    bench_ps.main(["--base", str(tiny_source_dirs[0]), "--other", str(tiny_source_dirs[1]), "--methods", "ties",
                   "--layer-groups", "2", "--candidates", "1", "--mergekit-candidates", "1", "--task",
                   "cloze_mc_dev:2", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["in_memory_all_values_s"] > 0 and row["mergekit_write_and_load_s"] > 0
    assert row["one_group_tensors_recomputed"] < row["tensors"]


@pytest.mark.slow
def test_gpu_check_runs_scaled_down_on_the_cpu(tmp_path):
    import gpu_check

    out = tmp_path / "gpu.json"
    result = gpu_check.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text())["ok"] and result["identity_max_abs_diff"] == 0.0
    assert result["export"]["verified"] and result["abc"]["a_equals_b"]
    assert [r["workers"] for r in result["ray"]] == [1, 2] and all(r["candidates"] > 0 for r in result["ray"])


@pytest.mark.slow
def test_export_bench_times_our_export_and_mergekit_side_by_side(tmp_path, tiny_source_dirs):
    from pathlib import Path

    import pytest

    if not (Path(sys.executable).parent / "mergekit-yaml").is_file():
        pytest.skip("mergekit-yaml is not installed (the test extra)")
    import bench_export

    out = tmp_path / "export.json"
    result = bench_export.main(["--model", str(tiny_source_dirs[0]), "--slices", "0-2,1-3", "--dtypes", "float32",
                                "--rounds", "1", "--variants", "mergekit,quick", "--out", str(out)])
    assert json.loads(out.read_text())["identical_to_mergekit"] == {"float32": True}
    rows = {r["variant"]: r for r in result["rows"]}
    assert len(rows) == 2 and all(r["seconds"] > 0 and r["peak_mb"] > 0 for r in rows.values())
    assert rows["dfs-merge (default: quick verify)"]["verify_s"] > 0


def test_racing_floor_counts_dominating_candidates_of_the_same_or_earlier_generations(tmp_path):
    import racing_floor

    search = tmp_path / "evolved"
    search.mkdir()
    (search / "config.yaml").write_text(yaml.safe_dump({"sources": ["m"], "seed_routes": [], "population": 3,
                                                        "objectives": ["score", "hops"]}))
    rows = [(0, -1.0, 10),   # the seed: scored whole
            (0, -2.0, 8),    # no one has fewer hops and a better score: on the front
            (1, -3.0, 10),   # dominated by both generation-0 candidates
            (1, -0.5, 12),   # best score: on the front
            (2, -0.9, 9)]    # on the front when it is made (the -0.5 has more hops)
    (search / "evals.jsonl").write_text("".join(
        json.dumps({"generation": g, "score": s, "hops": h}) + "\n" for g, s, h in rows))
    result = racing_floor.floors(search, cuts=[1, 2], first_stages=[0.2, 0.0])
    assert result["seeds"] == 1 and result["candidates"] == 5
    by = {(f["cut"], f["first_stage"]): (f["may_stop"], f["floor"]) for f in result["floors"]}
    # one candidate of the four may stop, at either cut: (1 seed + 3 kept + f x 1) / 5
    assert by[(1, 0.2)] == (1, round(4.2 / 5, 3)) and by[(2, 0.0)] == (1, 0.8)
    with (search / "evals.jsonl").open("a") as log:
        log.write(json.dumps({"generation": 3, "score": -5.0, "hops": 9, "evaluation": {"race": {"dropped": 0}}}))
    with pytest.raises(ConfigError, match="a raced search"):
        racing_floor.floors(search, cuts=[1], first_stages=[0.2])
    assert racing_floor.main([str(search)]) == 2  # one line, no table
    assert racing_floor.main([str(tmp_path / "missing")]) == 2
