"""Racing on the SmolLM2 study's search: document forwards, candidates at equal time, held-out fronts.

Side by side in one process, on the search of `genomes/smollm2-self.yaml` (NSGA-II on [score, hops], population
12, the heuristics' routes as generation-0 seeds, taken from a study run's config when one exists):

1. **unraced**: the search as the study runs it (8 generations): wall time W, candidates, documents scored.
2. **raced, same generations**: `racing:` as in genomes/smollm2-self-raced.yaml: documents scored against (1);
   also the documents of its first as many candidates as (1) evaluated (from the extended run of 3).
3. **raced, equal time**: the raced run of (2) extended (a finished run resumes and extends) by as many
   generations as its own time per generation says fit into (1)'s time, again while it is short of it: how
   many candidates it evaluated against (1). "Time" is this process's CPU seconds (`--budget cpu`, the default: on a shared machine wall time swings with the other jobs'
   load, CPU time much less) or wall seconds (`--budget wall`); both are recorded.

Each run's front is scored on the held-out test split (`report_tasks`, the study's documents); per n (the hop
counts of the heuristics' pruned routes), the front member with the most hops <= n is compared, test score
against test score. No validation step (the study has one; the fronts here are chosen by dev alone). Results:
bench/results/racing.json. Runs live in build/bench/racing and resume, so an interrupted bench continues.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import REPO, RESULTS, loadavg, machine, write_result

ROUTE_SEEDS = REPO / "runs" / "smollm2-self-raced" / "evolved" / "config.yaml"


def search_config(racing: dict[str, Any] | None, out: Path, generations: int) -> Any:
    """The study's search config (its seeds when a study run recorded them), raced or not, without validation."""
    from dfs_merge.config import RunConfig, load_config
    from dfs_merge.inputs import read_yaml

    raced = load_config(REPO / "genomes" / "smollm2-self-raced.yaml")
    data = raced.model_dump(mode="json", by_alias=True)
    if ROUTE_SEEDS.is_file():
        data["seed_routes"] = read_yaml(ROUTE_SEEDS).get("seed_routes", [])
    data.update({"racing": racing, "out": str(out), "generations": generations, "select_tasks": [],
                 "select_limit": None})
    return RunConfig(**data), raced.racing.model_dump() if raced.racing else None


def run(cfg: Any, log: list[str], phase: str) -> tuple[float, float]:
    """Run (or resume) one search with its held-out report; (wall seconds, CPU seconds). The seconds of a
    phase that finished are kept in `<out>/bench-<phase>.json`, so a resumed bench keeps what it measured."""
    from dfs_merge.search.evolution import run_evolution

    t0, c0 = time.perf_counter(), time.process_time()
    run_evolution(cfg, resume=(Path(cfg.out) / "config.yaml").exists(), report=True, progress=False,
                           log=lambda line: (log.append(line), print(line, flush=True)))
    timed = Path(cfg.out) / f"bench-{phase}.json"
    if timed.is_file():
        kept = json.loads(timed.read_text())
        return kept["wall"], kept["cpu"]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    timed.write_text(json.dumps({"wall": wall, "cpu": cpu}))
    return wall, cpu


def summary(out: Path, seconds: float, cpu: float) -> dict[str, Any]:
    """Candidates, documents scored, candidates stopped early, seconds, and the held-out front."""
    state = json.loads((out / "checkpoint.json").read_text())
    lines = evaluations(out)
    docs = documents(lines)
    front = json.loads((out / "pareto.json").read_text()) if (out / "pareto.json").is_file() else []
    return {"candidates": len(lines), "documents": docs, "stopped": state["counters"].get("stopped", 0),
            "generations": state["generation"], "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "front": [{"hops": m["hops"], "dev": m["score"], "test": m.get("test_score"), "route": m["route"]}
                      for m in front]}


def evaluations(out: Path) -> list[dict[str, Any]]:
    """A run's `evals.jsonl` lines, in the order the candidates were evaluated."""
    return [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines() if x.strip()]


def documents(lines: list[dict[str, Any]]) -> int:
    """The documents scored for these evaluations (a stopped candidate's: those of its stages)."""
    return sum(sum(t["docs"] for t in e["evaluation"]["tasks"].values()) for e in lines)


def at_most(front: list[dict[str, Any]], n: int) -> dict[str, Any] | None:
    """The front member with the most hops <= n (on a front: the best dev score among them)."""
    fit = [m for m in front if m["hops"] <= n and m.get("test") is not None]
    return max(fit, key=lambda m: (m["hops"], m["dev"])) if fit else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(REPO / "build" / "bench" / "racing"))
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-generations", type=int, default=40, help="cap on the equal-time raced run")
    ap.add_argument("--n", default="2,4,6,8", help="layers removed by the heuristics (28, 26, 24, 22 hops of 30)")
    ap.add_argument("--budget", choices=["cpu", "wall"], default="cpu", help="what 'equal time' measures")
    ap.add_argument("--out", default=str(RESULTS / "racing.json"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    log: list[str] = []
    t0 = time.perf_counter()
    base_cfg, racing = search_config(None, work / "unraced", args.generations)
    if racing is None:
        print("genomes/smollm2-self-raced.yaml has no racing: section", file=sys.stderr)
        return 2
    w_unraced, c_unraced = run(base_cfg, log, "unraced")
    raced_cfg, _ = search_config(racing, work / "raced", args.generations)
    w_raced, c_raced = run(raced_cfg, log, "raced")
    rows = {"unraced": summary(work / "unraced", w_unraced, c_unraced),
            "raced": summary(work / "raced", w_raced, c_raced)}
    # the equal-time run: the raced run extended (a finished run resumes and extends) by as many generations as its
    # own cost per generation says the unraced run's time allows; again while it is short of that time
    wall, cpu, g = w_raced, c_raced, args.generations
    budget = c_unraced if args.budget == "cpu" else w_unraced
    while (spent := cpu if args.budget == "cpu" else wall) < budget and g < args.max_generations:
        per_generation = spent / g
        g = min(args.max_generations, max(g + 1, int(budget / per_generation)))
        cfg, _ = search_config(racing, work / "raced", g)
        w, c = run(cfg, log, f"extended-{g}")
        wall, cpu = wall + w, cpu + c
    rows["raced_equal_time"] = summary(work / "raced", wall, cpu)
    u, r, e = rows["unraced"], rows["raced"], rows["raced_equal_time"]
    raced_lines = evaluations(work / "raced")
    same_candidates = documents(raced_lines[: u["candidates"]]) if len(raced_lines) >= u["candidates"] else None
    comparison = []
    for k in (int(x) for x in args.n.split(",")):
        n = 30 - k
        a, b = at_most(u["front"], n), at_most(e["front"], n)
        diff = None if a is None or b is None else b["test"] - a["test"]
        comparison.append({"n": k, "hops_at_most": n, "unraced": a, "raced_equal_time": b, "difference": diff,
                           "verdict": None if diff is None else "better" if diff > 1e-9 else "worse"
                           if diff < -1e-9 else "equal"})
    data = {
        "machine": machine(), "loadavg_end": loadavg(), "racing": racing, "seconds_total": round(time.perf_counter() - t0),
        "budget": args.budget, "runs": rows,
        "documents_ratio_same_generations": r["documents"] / u["documents"],
        "documents_ratio_same_candidates": None if same_candidates is None else same_candidates / u["documents"],
        "candidates_ratio_equal_time": e["candidates"] / u["candidates"],
        "held_out_per_n": comparison,
    }
    write_result(Path(args.out), data)
    print(f"documents, same generations: raced {r['documents']} / unraced {u['documents']} = "
          f"{data['documents_ratio_same_generations']:.3f} ({r['candidates']} vs {u['candidates']} candidates)")
    if same_candidates is not None:
        print(f"documents, same candidates (the raced run's first {u['candidates']}): {same_candidates} / "
              f"{u['documents']} = {data['documents_ratio_same_candidates']:.3f}")
    print(f"candidates at equal {args.budget} time (wall {e['seconds']:.0f} s vs {u['seconds']:.0f} s, CPU "
          f"{e['cpu_seconds']:.0f} s vs {u['cpu_seconds']:.0f} s): {e['candidates']} vs "
          f"{u['candidates']} = x{data['candidates_ratio_equal_time']:.2f}")
    for c in comparison:
        print(f"  n={c['n']}: {c['verdict']} ({c['difference']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
