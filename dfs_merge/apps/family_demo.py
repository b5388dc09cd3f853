"""The main job shown on two real models: the committed family winner exported, scored against its parents.

`dfs-merge demo` (what `make demo` runs) takes `genomes/family-best.yaml`, the merge of the two SmolLM2
specialists J (the invented language J) and M (English arithmetic) that `make study-family` evolved, exports
it as a plain Hugging Face checkpoint, loads that folder back with transformers, and scores it beside J, M
and the naive merge (the adapters' task arithmetic, the same as the layer swap) on the held-out test split of
the target: J word problems with digit operands. It prints the table (with the additions and subtractions
apart, the paired interval against each parent and the blind baselines) and each model's greedy answer to a
J problem, and says how to run the search itself. Nothing is trained and nothing is searched here.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfs_merge.apps.family_study import (
    BASE,
    BEST,
    SPECIALISTS,
    Candidate,
    parents,
    problems,
    score_rows,
    table,
)
from dfs_merge.atomic import write_atomic
from dfs_merge.export.checkpoint import export_checkpoint
from dfs_merge.genome_files import load_genome
from dfs_merge.models.sources import SourcePool

SAMPLE = 3  # the test problem whose answers are shown


def answer(model: Any, tokenizer: Any, question: str, tokens: int = 6) -> str:
    """The model's greedy continuation of a problem (as the suite poses it), up to its first number."""
    import torch

    ids = tokenizer(" " + question, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    m = re.search(r"-?\d+", text)
    return m.group() if m else text.strip()


def run_family_demo(genome: str | Path = BEST, out_dir: str | Path = "runs/family-demo",
                    log: Callable[[str], Any] = print, limit: int | None = None,
                    stories: int = 100) -> dict[str, Any]:
    """Export `genome`, score it and the parents on the test split (the first `limit` problems, all by
    default, and `stories` J stories), print the table and sample answers."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    out_dir = Path(out_dir)
    best = load_genome(genome)
    log(f"[demo] exporting {genome} ({best.text()}) to {out_dir / 'exported'}")
    own = SourcePool.load(list(best.sources), "cpu", "float32")
    exported_dir = export_checkpoint(own, best, out_dir / "exported", force=True, verify=True)
    del own
    pool = SourcePool.load([SPECIALISTS["J"], SPECIALISTS["M"], BASE], "cpu", "float32")
    winner = AutoModelForCausalLM.from_pretrained(exported_dir).eval()
    rows = [c for c in parents(pool) if not c.label.startswith(("Instruct", "naive frankenmerge"))]
    rows.append(Candidate(f"evolved winner ({Path(genome).name}, exported)", pool, model=winner, text=best.text()))
    n = len(problems("test")[:limit])
    log(f"[demo] scoring on the test split: {n} J problems with digit operands, {stories} J stories")
    scored = score_rows(rows, "test", log, others={"zoo_lm_j_test": (stories, "bits_per_byte")}, limit=limit)
    md = table(scored, "test", ("J (J-language specialist)", "M (arithmetic specialist)"), limit=limit)
    problem = problems("test")[SAMPLE]
    answers = {c.label: answer(c.build(), pool.tokenizer, problem["question"])
               for c in rows}
    seconds = time.perf_counter() - started
    log("")
    log(md)
    log("")
    log(f"a J problem ({problem['op']}, answer {problem['answer']}): {problem['question']}")
    for label, text in answers.items():
        log(f"  {label:<55} {text}")
    log("")
    log(f"exported checkpoint: {exported_dir} (a plain Hugging Face folder: AutoModelForCausalLM loads it)")
    log("the search that found the winner: make study-family (docs/family.md: its tables, time and seed)")
    log(f"demo took {seconds:.0f} s")
    summary = {"genome": str(genome), "table_markdown": md, "answers": answers, "problem": problem,
               "seconds": round(seconds, 1)}
    write_atomic(out_dir / "demo.json", json.dumps(summary, indent=1) + "\n")
    return summary
