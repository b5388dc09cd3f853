"""Candidate throughput: this project (A) against the write-then-load baseline (B) and the forward floor (C).

For each model (a tiny random Llama; SmolLM2-135M-Instruct) and each task (multiple choice:
`cloze_mc_dev`, 100 documents; perplexity: `prose_ppl_dev`, 16 documents, about 4k tokens), on
one deepened route (SmolLM2: 40 hops, layers 0-19 then 10-29), the same documents and batches:

- A, this project: `stitch` the route, then `Fitness.score` (lm-eval) on the stitched model;
- B, what a user does without it: `write_mergekit_config`, mergekit builds the passthrough merge
  in a temporary folder (**write**), `from_pretrained` of that model and its tokenizer (**load**),
  then the same `Fitness.score` (**score**);
- C, the naive floor: `model(input_ids)` alone, all logits, over exactly the token batches lm-eval's own HFLM
  feeds a model (each request whole: recorded by a forward hook on a warm-up run with `shared_contexts=False`
  and `scored_logits_only=False`, as bench_fitness.py does), so that A/C counts what A's scoring saves (the LM
  head only where scored, a multiple-choice item's question run once).

Each repeat runs A, C, B in turn, so that a drifting machine load treats them alike. The forward
passes inside A are timed too (hooks): A / forward-in-A is the engine's overhead measured within
one call, which no load drift can bend. Before the tasks: the process RSS with 1 and with 32
stitched candidates alive (bench_memory.live_candidates_rss). Prints a table and writes
bench/results/throughput.json.

    .venv/bin/python bench/bench_throughput.py                        # tiny + SmolLM2 (~7-10 min, 2 cores)
    .venv/bin/python bench/bench_throughput.py --models tiny --repeats 1
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from bench_common import RESULTS, loadavg, machine, median, write_result
from bench_fitness import model_dirs, record_batches, time_floor
from bench_memory import live_candidates_rss

from dfs_merge.export.mergekit import write_mergekit_config
from dfs_merge.fitness.score import Fitness
from dfs_merge.genome import Genome, Route
from dfs_merge.models.sources import SourcePool
from dfs_merge.stitch import stitch

# the base deepened: first 2/3, then last 2/3 (Qwen2.5-Coder-0.5B: 24 layers, 32 hops)
ROUTES = {"tiny": "0:0-2, 0:1-3", "smollm2": "0:0-19, 0:10-29", "qwen": "0:0-15, 0:8-23"}
REPEATS = {"tiny": 3, "smollm2": 2, "qwen": 2}  # a SmolLM2 repeat costs 2.5-4 minutes on 2 cores
TASKS = "cloze_mc_dev:100,prose_ppl_dev:16"
B_KEYS = ("value_b", "a_equals_b", "B_s", "B_write_s", "B_load_s", "B_score_s", "B_over_A", "B_over_A_each",
          "B_minus_A_s")


def build_with_mergekit(config: Path, out: Path, cli: bool = False) -> None:
    """Run mergekit on a config: its Python API (in process, no start-up cost) or the `mergekit-yaml` CLI."""
    if cli:
        exe = Path(sys.executable).with_name("mergekit-yaml")
        subprocess.run([str(exe), str(config), str(out), "--quiet"], check=True, capture_output=True)
        return
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    logging.getLogger("mergekit").setLevel(logging.ERROR)  # it warns that repeated layers share tensors
    text = config.read_text()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out), MergeOptions(quiet=True),
              config_source=text)


def run_a(fit: Fitness, pool: SourcePool, route: Route) -> dict[str, Any]:
    """A: stitch + score. Also returns the model and the batches it was fed, for C."""
    t0 = time.perf_counter()
    model = stitch(pool, route)
    stitch_s = time.perf_counter() - t0
    forwards: list[float] = []
    batches, hooks = record_batches(model, forwards)
    ev = fit.score(model, pool.tokenizer, hops=len(route))
    total = time.perf_counter() - t0
    hooks.remove()
    if not ev.ok:
        raise RuntimeError(f"A failed: {ev.error}")
    return {"s": total, "stitch_s": stitch_s, "forward_s": sum(forwards), "metric": _metric(ev),
            "model": model, "batches": batches}


def run_b(genome: Genome, fit: Fitness, dtype: torch.dtype, tmp: Path, cli: bool) -> dict[str, Any]:
    """B: mergekit writes the merge, transformers loads it (model and tokenizer), the same fitness scores it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, folder = tmp / "merge.yaml", tmp / "merged"
    t0 = time.perf_counter()
    write_mergekit_config(genome, config, force=True)
    build_with_mergekit(config, folder, cli)
    t1 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:  # as SourcePool does for A
        tok.pad_token = tok.eos_token
    t2 = time.perf_counter()
    ev = fit.score(model, tok)
    t3 = time.perf_counter()
    if not ev.ok:
        raise RuntimeError(f"B failed: {ev.error}")
    del model
    shutil.rmtree(folder)
    gc.collect()
    return {"s": t3 - t0, "write_s": t1 - t0, "load_s": t2 - t1, "score_s": t3 - t2, "metric": _metric(ev)}


def _metric(ev: Any) -> float:
    return next(iter(ev.tasks.values())).value


def bench_task(pool: SourcePool, route: Route, genome: Genome, task: str, limit: int, args: Any,
               repeats: int, tmp: Path) -> dict[str, Any]:
    fit = Fitness({task: 1.0}, limit=limit, batch_size=args.batch_size)
    # Warm-up on a 1-hop route (cheap): every request is tokenised once (memoised for later candidates,
    # as in a run) and lazy initialisations happen. lm-eval's batches depend on the documents, not the route:
    # the naive ones (every request whole) are recorded here for C.
    fit.score(stitch(pool, Route.parse("0:0")), pool.tokenizer)
    naive = Fitness({task: 1.0}, limit=limit, batch_size=args.batch_size, scored_logits_only=False,
                    shared_contexts=False)
    warm = stitch(pool, Route.parse("0:0"))
    batches, hooks = record_batches(warm)
    naive.score(warm, pool.tokenizer)
    hooks.remove()
    runs = []
    for _ in range(repeats):
        a = run_a(fit, pool, route)
        model, fed = a.pop("model"), a.pop("batches")
        c = time_floor(model, batches, 1)[0]
        del model
        b = None if args.no_b else run_b(genome, fit, pool.dtype, tmp, args.mergekit_cli)
        runs.append({"a": a, "c_s": c, "b": b, "batches": len(batches), "tokens": sum(x.numel() for x in batches),
                     "tokens_in_a": sum(x.numel() for x in fed), "loadavg": loadavg()})
        b_line = "" if b is None else (f"  B {b['s']:.2f}s (write {b['write_s']:.2f} load {b['load_s']:.2f} "
                                       f"score {b['score_s']:.2f})")
        print(f"  {task}: A {a['s']:.2f}s (forward {a['forward_s']:.2f}s)  C {c:.2f}s{b_line}  load {loadavg()}",
              file=sys.stderr, flush=True)
    return summarise(task, fit.describe()[task], runs)


def summarise(task: str, described: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One task's figures from its repeats. The headline ratios are medians of per-repeat ratios: each
    repeat's A, C and B ran back to back, so a machine whose speed drifts between repeats cancels out."""

    def med(f: Any) -> float:
        return median([f(r) for r in runs])

    a_s, c_s = med(lambda r: r["a"]["s"]), med(lambda r: r["c_s"])
    metrics_a = {r["a"]["metric"] for r in runs}
    row = {
        "task": task,
        "docs": described["docs"],
        "metric": described["metric"],
        "value_a": runs[-1]["a"]["metric"],
        "batches": runs[-1]["batches"],
        "tokens_forwarded": runs[-1]["tokens"],  # C's: every request whole
        "tokens_in_a": runs[-1]["tokens_in_a"],
        "A_s": round(a_s, 4),
        "A_stitch_s": round(med(lambda r: r["a"]["stitch_s"]), 5),
        "A_forward_s": round(med(lambda r: r["a"]["forward_s"]), 4),
        "C_s": round(c_s, 4),
        "A_over_C": round(med(lambda r: r["a"]["s"] / r["c_s"]), 4),
        "A_over_C_each": [round(r["a"]["s"] / r["c_s"], 4) for r in runs],
        "A_over_C_best": round(min(r["a"]["s"] for r in runs) / min(r["c_s"] for r in runs), 4),
        "A_over_forward_in_A": round(med(lambda r: r["a"]["s"] / r["a"]["forward_s"]), 4),
    }
    if any(r["b"] is None for r in runs):  # B was not run (--no-b): its figures are null
        return row | dict.fromkeys(B_KEYS) | {"runs": runs}
    metric_b = runs[-1]["b"]["metric"]
    row |= {
        "value_b": metric_b,
        "a_equals_b": None if metric_b is None else len(metrics_a) == 1 and metric_b in metrics_a,
        "B_s": round(med(lambda r: r["b"]["s"]), 4),
        "B_write_s": round(med(lambda r: r["b"]["write_s"]), 4),
        "B_load_s": round(med(lambda r: r["b"]["load_s"]), 4),
        "B_score_s": round(med(lambda r: r["b"]["score_s"]), 4),
        "B_over_A": round(med(lambda r: r["b"]["s"] / r["a"]["s"]), 4),
        "B_over_A_each": [round(r["b"]["s"] / r["a"]["s"], 4) for r in runs],
        "B_minus_A_s": round(med(lambda r: r["b"]["s"] - r["a"]["s"]), 4),
    }
    return row | {"runs": runs}


def bench_model(name: str, folder: Path, tasks: list[tuple[str, int]], args: Any, tmp: Path) -> dict[str, Any]:
    pool = SourcePool.load([str(folder)])
    route = Route.parse(ROUTES[name])
    genome = Genome.from_route(route, [str(folder)], pool.layers_per_source, repeats=2)
    rss = live_candidates_rss(pool, (1, 32), hops=len(route))
    print(f"[{name}] {len(route)} hops; RSS with 1 / 32 live candidates: {rss[1]:.1f} / {rss[32]:.1f} MB",
          file=sys.stderr, flush=True)
    repeats = args.repeats or REPEATS[name]
    rows = [bench_task(pool, route, genome, task, limit, args, repeats, tmp) for task, limit in tasks]
    return {
        "model": name,
        "layers": pool.layers_per_source[0],
        "route": route.text(),
        "hops": len(route),
        "repeats": repeats,
        "memory": {"rss_1_mb": round(rss[1], 1), "rss_32_mb": round(rss[32], 1),
                   "ratio_32_vs_1": round(rss[32] / rss[1], 4),
                   "kb_per_extra_candidate": round((rss[32] - rss[1]) / 31 * 1024, 1)},
        "tasks": rows,
    }


def print_table(models: list[dict[str, Any]]) -> None:
    print(f"\n{'model':8} {'task':14} {'docs':>4} {'tokens':>6} {'A s':>8} {'C s':>8} {'A/C':>5} {'best':>5} "
          f"{'A/fwd':>5} {'B s':>8} {'write':>6} {'load':>5} {'score':>8} {'B/A':>5}")
    for m in models:
        for r in m["tasks"]:
            print(f"{m['model']:8} {r['task']:14} {r['docs']:>4} {r['tokens_forwarded']:>6} {r['A_s']:>8.2f} "
                  f"{r['C_s']:>8.2f} {r['A_over_C']:>5.2f} {r['A_over_C_best']:>5.2f} "
                  f"{r['A_over_forward_in_A']:>5.2f} " + (
                      "       -      -     -        -     -" if r["B_s"] is None else
                      f"{r['B_s']:>8.2f} {r['B_write_s']:>6.2f} {r['B_load_s']:>5.2f} {r['B_score_s']:>8.2f} "
                      f"{r['B_over_A']:>5.2f}"))
        mem = m["memory"]
        print(f"{m['model']:8} RSS 1 live candidate {mem['rss_1_mb']:.1f} MB, 32: {mem['rss_32_mb']:.1f} MB "
              f"({mem['ratio_32_vs_1']:.4f}x, {mem['kb_per_extra_candidate']:.1f} KB per extra candidate)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,smollm2", help="comma list of tiny, smollm2, qwen (Qwen2.5-Coder-0.5B)")
    ap.add_argument("--tasks", default=TASKS, help="comma list of TASK:LIMIT")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None, help="A/C/B rounds per task (default: tiny 3, smollm2 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice); 1 is steadier on a "
                    "shared machine")
    ap.add_argument("--mergekit-cli", action="store_true", help="B runs the mergekit-yaml CLI (default: its API)")
    ap.add_argument("--no-b", action="store_true", help="A and C only (B, mergekit's write and load, not run)")
    ap.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [(t.split(":")[0], int(t.split(":")[1])) for t in args.tasks.split(",")]
    import mergekit.merge  # noqa: F401 - imported once, outside B's timing (a CLI user pays it every time)

    started = machine()
    models = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in model_dirs(args.models, Path(tmp)):
            models.append(bench_model(name, folder, tasks, args, Path(tmp)))
    print_table(models)
    result = {
        "machine": started,
        "loadavg_end": loadavg(),
        "command": "bench/bench_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batch_size": args.batch_size,
        "mergekit": "mergekit-yaml CLI" if args.mergekit_cli else "mergekit Python API (run_merge), in process",
        "models": models,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
