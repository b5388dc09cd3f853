"""Prefix activation cache on a realistic workload: `ga` generations of a SmolLM2 self-merge.

1. The genomes: a short seeded run of the project's own evolution (`run_evolution` on the demo
   config genomes/demo.yaml, with algorithm ga and population 16) whose candidates are scored by
   a cheap stand-in (a fixed pseudo-random score per route). Seeds, perturbation, selection,
   crossover, mutation and repair are the run's own DEAP toolbox; only the scores that steered
   selection are synthetic. The new genomes of each generation are read back from the run's
   evals.jsonl (default: generation 0, then generation 1, the first offspring).
2. Each genome is scored twice, in turn: stitched without and with one shared `ActivationCache`
   (same `Fitness`, same documents). The cache starts empty and carries over from one generation
   to the next, as in one worker process of a run. Every metric must be equal (the cached path is
   bit-identical). Reports, per generation, cached/uncached time, the hit rate, and the share of
   hops skipped against the share an unbounded cache could skip (from the routes alone), plus that
   route-level share for more generations, seeds and `scaling: none`. Writes
   bench/results/prefix_cache.json.

    .venv/bin/python bench/bench_prefix_cache.py                     # ~6 min on 2 busy cores
    .venv/bin/python bench/bench_prefix_cache.py --generations 1 --limit 8
    .venv/bin/python bench/bench_prefix_cache.py --scaling none --seed 2 --out bench/results/prefix_cache_noscale.json
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import REPO, RESULTS, loadavg, machine, write_result
from bench_fitness import record_batches

from dfs_merge.config import load_config
from dfs_merge.evaluation import Evaluation
from dfs_merge.fitness.score import Fitness
from dfs_merge.genome import Genome, Route
from dfs_merge.genome_files import genome_from_dict
from dfs_merge.models.sources import SourcePool
from dfs_merge.search.evolution import run_evolution
from dfs_merge.search.rundir import RunDir
from dfs_merge.stitch import ActivationCache, prefix_keys, stitch


class StandInScore:
    """A stand-in fitness for making genomes: a fixed pseudo-random score per route, no model."""

    def __call__(self, genome: Genome) -> Evaluation:
        route = genome.check()
        score = int(hashlib.sha1(route.key().encode()).hexdigest()[:8], 16) / 2**32
        return Evaluation(score=score, hops=len(route))


def generation_genomes(cfg: Any, last: int) -> dict[int, list[Genome]]:
    """The genomes a seeded run evaluates in each generation up to `last` (its evals.jsonl, in order)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = cfg.model_copy(update={"generations": last, "out": str(Path(tmp) / "run"), "report_tasks": []})
        run_evolution(run, evaluate=StandInScore(), progress=False, log=lambda *_: None)
        records = RunDir(run.out).read_evals()
    out: dict[int, list[Genome]] = {g: [] for g in range(last + 1)}
    for r in records:
        out[r["generation"]].append(genome_from_dict(r["genome"]))
    return out


def unbounded_skip_shares(generations: list[list[Route]], warm: bool = True) -> list[float]:
    """Per generation, the share of hops an unbounded cache skips (per batch), evaluating in this order;
    `warm`: the cache keeps what earlier generations computed (one process), else it starts empty each time."""
    seen: set[str] = set()
    out = []
    for routes in generations:
        if not warm:
            seen = set()
        skipped = total = 0
        for route in routes:
            keys = prefix_keys(route)
            skipped += next((k + 1 for k in range(len(keys) - 1, -1, -1) if keys[k] in seen), 0)
            total += len(keys)
            seen.update(keys)
        out.append(round(skipped / total, 4) if total else 0.0)
    return out


def route_sharing(cfg: Any, generations: int = 4, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, Any]:
    """Unbounded-cache skip shares from the routes alone (no model), for several seeds and both scalings."""
    table: dict[str, Any] = {}
    for scaling in dict.fromkeys((cfg.scaling, "none")):
        for seed in seeds:
            c = cfg.model_copy(update={"scaling": scaling, "seed": seed})
            gens = generation_genomes(c, generations - 1)
            routes = [[g.check() for g in gens[k]] for k in range(generations)]
            table[f"scaling={scaling} seed={seed}"] = {"warm": unbounded_skip_shares(routes, True),
                                                       "cold": unbounded_skip_shares(routes, False)}
    return table


def values(ev: Evaluation) -> dict[str, float]:
    return {name: r.value for name, r in ev.tasks.items()}


def score_generation(pool: SourcePool, fit: Fitness, cache: ActivationCache, genomes: list[Genome],
                     label: str) -> list[dict[str, Any]]:
    """Score each genome without and with the cache, in turn (alternating which goes first)."""
    rows = []
    for i, g in enumerate(genomes):
        route = g.check()
        timed: dict[str, float] = {}
        evs: dict[str, Evaluation] = {}
        skipped = cache.hops_skipped
        for kind in (("plain", "cached") if i % 2 == 0 else ("cached", "plain")):
            t = time.perf_counter()
            model = stitch(pool, route, activation_cache=cache if kind == "cached" else None)
            evs[kind] = fit.score(model, pool.tokenizer, hops=len(route))
            timed[kind] = time.perf_counter() - t
        same = evs["plain"].ok and evs["cached"].ok and values(evs["plain"]) == values(evs["cached"])
        rows.append({"key": g.key(), "hops": len(route), "route": route.text(), "plain_s": round(timed["plain"], 3),
                     "cached_s": round(timed["cached"], 3), "hops_skipped": cache.hops_skipped - skipped,
                     "identical": same, "values": values(evs["plain"]),
                     "loadavg": loadavg()})
        print(f"  {label} {i + 1:2}/{len(genomes)} {len(route):2} hops  plain {timed['plain']:6.2f}s  cached "
              f"{timed['cached']:6.2f}s  identical {same}  load {loadavg()}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=REPO / "genomes" / "demo.yaml", help="run config (sources, tasks)")
    ap.add_argument("--generations", default="0,1", help="comma list, ascending: the generations scored")
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--scaling", choices=["slot", "transition", "none"], default=None, help="override the config's")
    ap.add_argument("--seed", type=int, default=None, help="override the config's run seed")
    ap.add_argument("--max-genomes", type=int, default=None, help="score only the first N of each generation")
    ap.add_argument("--limit", type=int, default=4, help="documents per task (demo: 8; halved to fit the time)")
    ap.add_argument("--cache-mb", type=float, default=4096, help="the ActivationCache's bound")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS / "prefix_cache.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [int(x) for x in args.generations.split(",")]

    cfg = load_config(args.config, algorithm="ga", population=args.population, limit=args.limit, workers=1,
                      scaling=args.scaling, seed=args.seed)
    started = machine()
    by_gen = generation_genomes(cfg, max(wanted))
    routes = {k: [g.check() for g in gs] for k, gs in by_gen.items()}

    pool = SourcePool.load(list(cfg.sources), cfg.device, cfg.dtype)
    fit = Fitness.from_config(cfg)
    warm = stitch(pool, Route.parse("0:0"))  # tokenises every request once (memoised), counts the batches
    batches, hooks = record_batches(warm)
    fit.score(warm, pool.tokenizer)
    hooks.remove()
    hidden = pool.base.config.hidden_size
    per_hop_mb = sum(b.numel() for b in batches) * hidden * torch.finfo(pool.dtype).bits / 8 / 2**20
    distinct = len({k for rs in routes.values() for r in rs for k in prefix_keys(r)})
    print(f"{len(batches)} batches per candidate; {per_hop_mb:.2f} MB of hidden states per hop; an unbounded cache "
          f"would hold {distinct} prefixes: {distinct * per_hop_mb:.0f} MB", file=sys.stderr, flush=True)

    cache = ActivationCache(args.cache_mb)
    gens = []
    for k in wanted:
        before = cache.stats()
        rows = score_generation(pool, fit, cache, by_gen[k][: args.max_genomes], f"gen {k}")
        after = cache.stats()
        hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
        plain_s, cached_s = sum(r["plain_s"] for r in rows), sum(r["cached_s"] for r in rows)
        hop_batches = sum(r["hops"] for r in rows) * len(batches)
        gens.append({
            "generation": k,
            "genomes": len(rows),
            "hops": [min(r["hops"] for r in rows), max(r["hops"] for r in rows)],
            "uncached_s": round(plain_s, 3),
            "cached_s": round(cached_s, 3),
            "ratio_cached_over_uncached": round(cached_s / plain_s, 4),
            "all_identical": all(r["identical"] for r in rows),
            "hit_rate": round(hits / max(1, hits + misses), 4),
            "hops_skipped_share": round((after["hops_skipped"] - before["hops_skipped"]) / hop_batches, 4),
            "unbounded_skip_share": unbounded_skip_shares(
                [routes[j][: args.max_genomes] for j in range(k + 1) if j in wanted])[-1],
            "loadavg": loadavg(),
            "rows": rows,
        })
    stats = cache.stats()
    result = {
        "machine": started,
        "loadavg_end": loadavg(),
        "workload": {
            "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
            "sources": list(cfg.sources), "algorithm": "ga", "population": args.population, "seed": cfg.seed,
            "scaling": cfg.scaling, "tasks": fit.describe(), "limit": args.limit,
            "batches_per_candidate": len(batches), "mb_per_hop": round(per_hop_mb, 3),
        },
        "cache_mb": args.cache_mb,
        "cache_end": {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()},
        "generations": gens,
        "route_sharing_unbounded": route_sharing(cfg),
    }
    print(f"\n{'gen':>3} {'genomes':>7} {'uncached s':>10} {'cached s':>8} {'ratio':>6} {'hit rate':>8} "
          f"{'skipped':>7} {'unbounded':>9} identical")
    for g in gens:
        print(f"{g['generation']:>3} {g['genomes']:>7} {g['uncached_s']:>10.1f} {g['cached_s']:>8.1f} "
              f"{g['ratio_cached_over_uncached']:>6.3f} {g['hit_rate']:>8.3f} {g['hops_skipped_share']:>7.3f} "
              f"{g['unbounded_skip_share']:>9.3f} {g['all_identical']}")
    print(f"cache at the end: {stats['mb']:.0f} MB in {stats['entries']} entries (bound {args.cache_mb:.0f} MB)")
    print("hop share an unbounded cache skips, per generation 0-3 (routes only):")
    for name, v in result["route_sharing_unbounded"].items():
        print(f"  {name:22} warm {v['warm']}  cold {v['cold']}")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
