"""The demo pipeline, shrunk: tiny random sources, 2 generations, bundled tasks, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import write_self_merge_config

from dfs_merge.cli import main
from dfs_merge.config import load_config
from dfs_merge.fitness.score import Fitness


@pytest.fixture
def demo_config(tmp_path, tiny_source_dirs) -> str:
    return write_self_merge_config(tmp_path, tiny_source_dirs[0], "run")


@pytest.mark.slow
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
    assert f"report (browser)     {run / 'report.html'}" in out
    for f in ("history.png", "route.png", "evals.jsonl", "report.html", "exported/config.json", "exported/README.md"):
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
