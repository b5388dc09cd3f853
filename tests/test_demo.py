"""The demo pipeline, shrunk: tiny random sources, 2 generations, bundled tasks, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dfs_merge.cli import main
from dfs_merge.config import load_config
from dfs_merge.fitness import Fitness


@pytest.fixture
def demo_config(tmp_path, tiny_source_dirs) -> str:
    cfg = {
        "sources": [str(tiny_source_dirs[0])],
        "repeats": 2,
        "scaling": "slot",
        "constraints": {"pin_ends": True, "min_hops": 2, "max_hops": 6},
        "tasks": {"prose_ppl_dev": 1.0, "cloze_mc_dev": 1.0},
        "report_tasks": ["prose_ppl_test", "cloze_mc_test"],
        "limit": {"prose_ppl_dev": 2, "cloze_mc_dev": 4},
        "report_limit": 3,
        "max_length": 256,
        "prefix_cache_mb": 64,
        "objectives": ["score", "hops"],
        "algorithm": "nsga2",
        "population": 4,
        "generations": 2,
        "seed": 0,
        "out": str(tmp_path / "run"),
    }
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_demo_runs_end_to_end_and_its_table_matches_lm_eval_on_the_export(demo_config, capsys):
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM

    assert main(["demo", demo_config]) == 0
    out = capsys.readouterr().out
    cfg = load_config(demo_config)
    run = Path(cfg.out)
    summary = json.loads((run / "demo.json").read_text())
    assert "| model | hops | params (M) |" in out and "exported checkpoint" in out and "--- exported:" in out
    names = [r["name"] for r in summary["rows"]]
    assert names == ["base", "exported (evolved)", "naive deepening"]
    for f in ("history.png", "route.png", "evals.jsonl", "exported/config.json", "exported/README.md"):
        assert (run / f).exists(), f

    # The exported checkpoint's held-out scores, through lm-eval's own HFLM(pretrained=DIR), equal the table's.
    fitness = Fitness.from_config(cfg, "test")
    exported_row = summary["rows"][1]
    lm = HFLM(pretrained=str(run / "exported"), backend="causal", device="cpu", max_length=256, batch_size=cfg.batch_size)
    for name, spec in fitness._specs.items():
        spec.task.set_fewshot_seed(cfg.seed)
        res = lm_eval.evaluator.evaluate(
            lm=lm, task_dict={"tasks": {name: spec.task}, "groups": {}, "group_map": {}},
            limit=fitness.limits[name], bootstrap_iters=0, log_samples=False,
        )
        assert res["results"][name][spec.key] == exported_row["test"]["tasks"][name]["value"]

    # A second demo resumes the finished run: no evaluation is computed again.
    lines = (run / "evals.jsonl").read_text().count("\n")
    assert main(["demo", demo_config]) == 0
    assert (run / "evals.jsonl").read_text().count("\n") == lines
