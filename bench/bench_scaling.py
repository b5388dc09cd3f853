"""Evaluation throughput (candidates per minute) with 1 and 2 workers: local process pool and local Ray.

Two tiny random Llama sources (the test fixtures' shape, seeds 0 and 1) are written to a
temporary folder; the run config is a self-merge-and-cross search over them (repeats 2) scored
on `cloze_mc_dev`. The engine's own backends (`ProcessPoolEvaluator`, `RayEvaluator`, each worker
running `ModelEvaluator` with torch.set_num_threads(1)) evaluate the same fixed batch of genomes.
All four evaluators are started and warmed up first (workers load the sources and build the
tasks once; not timed), then timed in turn for a few rounds, so that a drifting machine load
treats them alike. Reports candidates per minute, the 2-worker / 1-worker ratio per backend,
and how many cores the process tree actually kept busy (its CPU seconds over wall seconds): on
a machine shared with other jobs, 2 workers that get 1.3 cores cannot give 2x, and this says so.
Writes bench/results/scaling.json.

    .venv/bin/python bench/bench_scaling.py                 # ~4 min on 2 busy cores
    .venv/bin/python bench/bench_scaling.py --backends process --rounds 1
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import RESULTS, loadavg, machine, median, write_result
from bench_fitness import tiny_model_dir

from dfs_merge.config import RunConfig
from dfs_merge.genome import Genome
from dfs_merge.search.backends import Evaluator, ModelEvaluator, ProcessPoolEvaluator, RayEvaluator
from dfs_merge.search.operators import repair


def random_genomes(cfg: RunConfig, n: int, seed: int = 0) -> list[Genome]:
    """`n` distinct random genomes that meet the config's constraints (repaired as a run repairs them)."""
    from dfs_merge.models.metadata import layer_counts

    template = Genome.empty(cfg.sources, layer_counts(cfg.sources), cfg.repeats, cfg.scaling, cfg.constraints)
    rng = random.Random(seed)
    out: dict[str, Genome] = {}
    while len(out) < n:
        bits = [rng.randint(0, 1) for _ in range(template.layout.T)]
        scales = [rng.uniform(*cfg.scale_range) for _ in template.scales]
        g = repair(template.with_bits(bits, scales), rng)
        out.setdefault(g.key(), g)
    return list(out.values())


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and all its descendants (pool workers, Ray's processes)."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def evaluate_all(ev: Evaluator, genomes: list[Genome]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process tree) to evaluate every genome; each must succeed."""
    t, cpu = time.perf_counter(), tree_cpu_seconds()
    results = list(ev.submit(genomes))
    seconds, cpu = time.perf_counter() - t, tree_cpu_seconds() - cpu
    failed = [e.error for _, e in results if not e.ok]
    if failed or len(results) != len(genomes):
        raise RuntimeError(f"{len(failed)} evaluations failed: {failed[:1]}")
    return seconds, cpu


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="process,ray", help="comma list of process, ray")
    ap.add_argument("--task", default="cloze_mc_dev")
    ap.add_argument("--limit", type=int, default=100, help="documents per candidate")
    ap.add_argument("--genomes", type=int, default=8, help="genomes per timed batch")
    ap.add_argument("--rounds", type=int, default=2, help="timed batches per evaluator (interleaved)")
    ap.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    args = ap.parse_args(argv)
    backends = args.backends.split(",")
    if "ray" in backends:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("ray is not installed (pip install -e '.[ray]'); the ray backend is skipped", file=sys.stderr)
            backends.remove("ray")

    started = machine()
    evaluators: dict[tuple[str, int], Evaluator] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sources = [str(tiny_model_dir(Path(tmp), seed)) for seed in (0, 1)]
        cfg = RunConfig(sources=sources, repeats=2, tasks={args.task: 1.0}, limit=args.limit,
                        constraints={"pin_ends": True, "min_hops": 4, "max_hops": 12}, threads=1, out=tmp)
        fn = ModelEvaluator(cfg)
        genomes = random_genomes(cfg, args.genomes)
        warmup = random_genomes(cfg, 4, seed=1)
        try:
            if "ray" in backends:
                import ray

                # one Ray session for both Ray evaluators: 3 actors of 1 CPU each (1 + 2 workers)
                ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
            for backend in backends:
                for workers in (1, 2):
                    t = time.perf_counter()
                    ev = (ProcessPoolEvaluator(fn, workers, threads=1) if backend == "process"
                          else RayEvaluator(fn, workers, "local", threads=1))
                    evaluators[backend, workers] = ev
                    evaluate_all(ev, warmup[: 2 * workers])  # starts the workers: sources loaded, tasks built
                    print(f"{backend} x{workers}: started and warm in {time.perf_counter() - t:.1f}s",
                          file=sys.stderr, flush=True)
            times: dict[tuple[str, int], list[float]] = {k: [] for k in evaluators}
            cores: dict[tuple[str, int], list[float]] = {k: [] for k in evaluators}
            loads = []
            for r in range(args.rounds):
                for key, ev in evaluators.items():
                    wall, cpu = evaluate_all(ev, genomes)
                    times[key].append(wall)
                    cores[key].append(cpu / wall)
                    loads.append(loadavg())
                    print(f"  round {r + 1}: {key[0]} x{key[1]}: {wall:.2f}s for {len(genomes)} genomes, "
                          f"{cpu / wall:.2f} cores busy  load {loads[-1]}", file=sys.stderr, flush=True)
        finally:
            for ev in evaluators.values():
                ev.close()
            if "ray" in backends:
                import ray

                ray.shutdown()

    rows = []
    for backend in backends:
        one, two = median(times[backend, 1]), median(times[backend, 2])
        busy1, busy2 = median(cores[backend, 1]), median(cores[backend, 2])
        rows.append({
            "backend": backend,
            "seconds_1_worker": [round(x, 3) for x in times[backend, 1]],
            "seconds_2_workers": [round(x, 3) for x in times[backend, 2]],
            "per_minute_1_worker": round(60 * len(genomes) / one, 2),
            "per_minute_2_workers": round(60 * len(genomes) / two, 2),
            "ratio_2_vs_1": round(one / two, 3),
            "cores_busy_1_worker": round(busy1, 3),
            "cores_busy_2_workers": round(busy2, 3),
            # throughput per busy core, 2 workers vs 1: 1.0 = the workers lose nothing to each other or the driver
            "per_core_2_vs_1": round((one / two) / (busy2 / busy1), 3),
        })
    print(f"\n{'backend':8} {'1 worker /min':>13} {'2 workers /min':>14} {'ratio':>6} {'cores busy 1 / 2':>17} "
          f"{'per core':>8}")
    for r in rows:
        print(f"{r['backend']:8} {r['per_minute_1_worker']:>13.1f} {r['per_minute_2_workers']:>14.1f} "
              f"{r['ratio_2_vs_1']:>6.2f} {r['cores_busy_1_worker']:>8.2f} / {r['cores_busy_2_workers']:<6.2f} "
              f"{r['per_core_2_vs_1']:>8.2f}")
    result = {
        "machine": started,
        "loadavg_during": loads,
        "loadavg_end": loadavg(),
        "workload": {"sources": "2 random tiny Llama (4 layers, hidden 48), repeats 2", "task": args.task,
                     "limit": args.limit, "genomes_per_batch": len(genomes), "rounds": args.rounds,
                     "threads_per_worker": 1},
        "rows": rows,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
