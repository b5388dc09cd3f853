"""`make bench`: run the bench scripts one after another, each in its own process, then check the targets.

Each script writes its own bench/results/<name>.json; this one then reads them and writes
bench/results/summary.json: every target of issue 6 with the measured figure, whether it is
met, and the load average it was measured under.

    .venv/bin/python bench/run_all.py             # throughput (+ Qwen), racing_zoo, prefix_cache, scaling, memory, ps, export
    .venv/bin/python bench/run_all.py --only scaling,memory    # a subset (also: fitness)
    .venv/bin/python bench/run_all.py --summary-only           # only re-read the results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from bench_common import REPO, RESULTS, loadavg, write_result

SCRIPTS = {
    "throughput": ["bench_throughput.py"],
    "throughput_qwen": ["bench_throughput.py", "--models", "qwen", "--tasks", "cloze_mc_dev:100", "--no-b",
                        "--out", "bench/results/throughput_qwen.json"],  # 5-6 min; needs `make models`
    "racing_zoo": ["bench_racing_zoo.py", "--seeds", "3,4,5"],  # 3-6 min: racing's defaults on the zoo's GA
    "prefix_cache": ["bench_prefix_cache.py"],
    "scaling": ["bench_scaling.py"],
    "memory": ["bench_memory.py"],
    "ps": ["bench_ps.py"],
    "export": ["bench_export.py"],
    # not by default (each 5-10 min more):
    "throughput_cli": ["bench_throughput.py", "--models", "smollm2", "--tasks", "cloze_mc_dev:100", "--mergekit-cli",
                       "--out", "bench/results/throughput_cli.json"],
    "prefix_cache_noscale": ["bench_prefix_cache.py", "--scaling", "none", "--seed", "2",
                             "--out", "bench/results/prefix_cache_noscale.json"],
    "fitness": ["bench_fitness.py"],  # bench_throughput measures its A and C figures too
    "racing": ["bench_racing.py", "--budget", "wall"],  # about 25 min idle: SmolLM2 searches and held-out fronts
}
DEFAULT = "throughput,throughput_qwen,racing_zoo,prefix_cache,scaling,memory,ps,export"


def _read(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def targets() -> list[dict[str, Any]]:
    """Each target with its measured figure(s), read from the result files that exist."""
    out: list[dict[str, Any]] = []

    def add(target: str, figure: str, value: float, ok: bool, load: Any, date: str | None) -> None:
        out.append({"target": target, "figure": figure, "value": value, "met": ok, "loadavg": load, "date": date})

    for name in ("throughput", "throughput_qwen"):
        tp = _read(name)
        if not tp:
            continue
        date = tp["machine"]["date"]
        for m in tp["models"]:
            for r in m["tasks"]:
                load = r["runs"][-1]["loadavg"]
                if m["model"] in ("smollm2", "qwen"):
                    # C is the naive forward of lm-eval's own batches (every request whole, all logits); A scores the
                    # LM head only where read and each multiple-choice question once (issue 32): multiple choice must
                    # gain from it, rolling perplexity must not lose
                    mc = r["task"].startswith("cloze_mc")
                    bound = (0.85 if m["model"] == "smollm2" else 0.8) if mc else 1.05
                    label = "SmolLM2" if m["model"] == "smollm2" else "Qwen2.5-Coder-0.5B"
                    target = f"A/C <= {bound} ({label} {'multiple choice' if mc else 'perplexity'}, no prefix cache)"
                    add(target, f"{r['task']} A/C", r["A_over_C"], r["A_over_C"] <= bound, load, date)
                    if "A_over_C_best" in r:
                        add(target, f"{r['task']} A/C, best of each", r["A_over_C_best"], r["A_over_C_best"] <= bound,
                            load, date)
                if m["model"] == "smollm2":
                    add("A/C <= 1.15 (SmolLM2, no prefix cache)", f"{r['task']} A / forward inside A",
                        r["A_over_forward_in_A"], r["A_over_forward_in_A"] <= 1.15, load, date)
                    if r["task"].startswith("cloze_mc") and r["B_over_A"] is not None:  # None: B was not run (--no-b)
                        add("B/A >= 5 (SmolLM2, multiple choice)", f"{r['task']} B/A", r["B_over_A"],
                            r["B_over_A"] >= 5, load, date)
            mem = m["memory"]
            add("32 live candidates < 1.1x the memory of one", f"{m['model']} RSS 32/1", mem["ratio_32_vs_1"],
                mem["ratio_32_vs_1"] < 1.1, tp["machine"]["loadavg"], date)
    cli = _read("throughput_cli")
    if cli:
        for m in cli["models"]:
            for r in m["tasks"]:
                if m["model"] == "smollm2" and r["task"].startswith("cloze_mc"):
                    add("B/A >= 5 (SmolLM2, multiple choice)", f"{r['task']} B/A, B via mergekit-yaml", r["B_over_A"],
                        r["B_over_A"] >= 5, r["runs"][-1]["loadavg"], cli["machine"]["date"])
    for name in ("prefix_cache", "prefix_cache_noscale"):
        pc = _read(name)
        if not pc:
            continue
        w = pc["workload"]
        for g in pc["generations"]:
            add("prefix cache: one ga generation <= 0.5x uncached",
                f"scaling {w.get('scaling')}, seed {w['seed']}: gen {g['generation']} cached/uncached",
                g["ratio_cached_over_uncached"], g["ratio_cached_over_uncached"] <= 0.5 and g["all_identical"],
                g["loadavg"], pc["machine"]["date"])
    sc = _read("scaling")
    if sc:
        for r in sc["rows"]:
            add("2 workers >= 1.6x the throughput of 1", f"{r['backend']} 2/1 workers", r["ratio_2_vs_1"],
                r["ratio_2_vs_1"] >= 1.6, sc["loadavg_end"], sc["machine"]["date"])
            if "per_core_2_vs_1" in r:  # what 2 workers give where each gets a whole core (the machine's load aside)
                projected = 2 * r["per_core_2_vs_1"]
                add("2 workers >= 1.6x the throughput of 1", f"{r['backend']} 2/1, projected to 2 free cores",
                    round(projected, 3), projected >= 1.6, sc["loadavg_end"], sc["machine"]["date"])
    mem = _read("memory")
    if mem:
        add("32 live candidates < 1.1x the memory of one", "random SmolLM2-shape RSS 32/1", mem["ratio_32_vs_1"],
            mem["ratio_32_vs_1"] < 1.1, (mem.get("machine") or {}).get("loadavg"), (mem.get("machine") or {}).get("date"))
    ps = _read("ps")
    if ps:
        for r in ps["rows"]:
            for case in ("all_values", "one_group"):
                add("PS merge step >= 20x faster than mergekit-yaml + load", f"{r['method']} ({case.replace('_', ' ')})",
                    round(r[f"speedup_{case}"], 1), r[f"speedup_{case}"] >= 20, ps["machine"]["loadavg"],
                    ps["machine"]["date"])
    rz = _read("racing_zoo")
    if rz:
        for r in rz["seeds"]:
            load, date = r["raced"]["loadavg"], rz["machine"]["date"]
            add("racing at its defaults: <= 0.6x the unraced wall time (zoo GA)", f"seed {r['seed']} raced / unraced",
                r["wall_ratio"], r["wall_ratio"] <= 0.6, load, date)
            add("racing at its defaults: best within 0.02 of the unraced best (zoo GA)", f"seed {r['seed']} difference",
                r["best_difference"], abs(r["best_difference"]) <= 0.02, load, date)
    ex = _read("export")
    if ex:
        for r in ex["rows"]:
            if r["variant"].startswith("dfs-merge (default"):
                load, date = ex["machine"]["loadavg"], ex["machine"]["date"]
                add("export (default verification) no slower than mergekit-yaml", f"{r['dtype']} time / mergekit's",
                    r["time_vs_mergekit"], r["time_vs_mergekit"] <= 1.0, load, date)
                add("export (default verification) no heavier than mergekit-yaml", f"{r['dtype']} peak RSS / "
                    "mergekit's", r["memory_vs_mergekit"], r["memory_vs_mergekit"] <= 1.0, load, date)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=DEFAULT, help=f"comma list of {', '.join(SCRIPTS)}")
    ap.add_argument("--summary-only", action="store_true", help="run nothing; summarise the existing results")
    args = ap.parse_args(argv)
    failed = []
    if not args.summary_only:
        for name in args.only.split(","):
            script, *script_args = SCRIPTS[name]
            print(f"\n=== {name}: {script} {' '.join(script_args)} (load {loadavg()})", flush=True)
            t = time.perf_counter()
            rc = subprocess.call([sys.executable, str(REPO / "bench" / script), *script_args], cwd=REPO)
            print(f"=== {name}: exit {rc} after {time.perf_counter() - t:.0f}s", flush=True)
            if rc:
                failed.append(name)
    rows = targets()
    print(f"\n{'target':50} {'figure':42} {'value':>8}  met   load")
    for r in rows:
        print(f"{r['target']:50} {r['figure']:42} {r['value']:>8.3f}  {'yes' if r['met'] else 'NO ':3}  {r['loadavg']}")
    write_result(RESULTS / "summary.json", {"targets": rows, "failed_scripts": failed})
    if failed:
        sys.exit(f"bench: {', '.join(failed)} failed")
    return rows


if __name__ == "__main__":
    main()
