"""Seconds per parameter-space candidate: the in-memory merge step against mergekit-yaml writing it and loading it.

Sources: SmolLM2-135M-Instruct and its J specialist (the base with `models/family/j` merged, written once
as a plain folder so that mergekit reads two full models; not timed). For each method, side by side in one
process on one machine:

- **in memory** (`Blender.apply`): a fresh random recipe each candidate (every value changed, as a CMA-ES
  sample) and a GA-style candidate (one layer group's values changed: the first, layers 0-4, which J's
  adapter touches, so that there is work to do); before them, once, the first candidate that prunes, which
  makes the deltas and magnitude ranks the resident model keeps for TIES (timed apart, with their size);
- **mergekit** (`write_recipe_config` + `mergekit-yaml` in a subprocess + `from_pretrained`): the same
  recipe written to disk and loaded back, what a candidate costs a tool that merges on disk;
- **scoring**: one fitness evaluation of the merged model (family J problems, 50 documents), the cost
  beside the merge step.

    .venv/bin/python bench/bench_ps.py                 # -> bench/results/ps.json
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import REPO, RESULTS, loadavg, machine, median, write_result


def specialist_folder(base: str, adapter: str, out: Path) -> str:
    """The base with the adapter merged, as a plain HF folder (once)."""
    if not (out / "config.json").is_file():
        from dfs_merge.models.sources import SourcePool

        pool = SourcePool.load([f"{base}+{adapter}"])
        pool.base.model.save_pretrained(out)
        pool.tokenizer.save_pretrained(out)
    return str(out)


def random_recipe(template, rng: random.Random):
    lo_hi = template.bounds((0.0, 1.5), (0.2, 1.0))
    return template.with_bits((), [rng.uniform(lo, hi) for lo, hi in lo_hi])


def one_group_moved(recipe, rng: random.Random):
    """The recipe with layer group 0's values moved (layers the J adapter touches, so there is work to do)."""
    values = list(recipe.scales)
    g = 0
    for i in range(len(recipe.merged) * (2 if recipe.densities else 1)):
        values[i * recipe.layer_groups + g] = min(1.0, values[i * recipe.layer_groups + g] + 0.05)
    return recipe.with_bits((), values)


def time_mergekit(recipe, work: Path, dtype: str, threads: int) -> float:
    from transformers import AutoModelForCausalLM

    from dfs_merge.export.mergekit import write_recipe_config

    cfg, out = work / "mk.yaml", work / "mk-out"
    t0 = time.perf_counter()
    write_recipe_config(recipe, cfg, force=True, dtype=dtype)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(cfg), str(out), "--quiet", "--no-cuda"],
                   check=True, capture_output=True, env=env)
    AutoModelForCausalLM.from_pretrained(out)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", default=str(REPO / "models" / "family" / "j"))
    ap.add_argument("--other", help="a second full model folder instead of the base with --adapter merged")
    ap.add_argument("--task", default="family_arith_j_dev:50", help="the scoring task and its documents")
    ap.add_argument("--methods", default="task_arithmetic,ties,slerp,della,breadcrumbs_ties",
                    help="comma list; each must take the base and one model (nuslerp and model_stock need more)")
    ap.add_argument("--layer-groups", type=int, default=6)
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--mergekit-candidates", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads here and in mergekit-yaml (0: torch's "
                    "choice); 1 is steadier on a machine other jobs load")
    ap.add_argument("--out", type=Path, default=RESULTS / "ps.json")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from dfs_merge.fitness.score import Fitness
    from dfs_merge.merging.blend import Blender
    from dfs_merge.merging.recipe import initial_recipe
    from dfs_merge.models.sources import SourcePool, locate

    rng = random.Random(0)
    started = loadavg()
    print(f"load average at the start: {started}")
    work = Path(tempfile.mkdtemp(prefix="bench-ps-"))
    base = str(locate(args.base).resolve())
    other = args.other or specialist_folder(args.base, args.adapter, REPO / "build" / "bench" / "smollm2-j")
    sources = [base, other]
    pool = SourcePool.load(sources)
    task, docs = args.task.split(":")
    fitness = Fitness({task: 1.0}, limit=int(docs), batch_size=16, max_length=256)
    rows = []
    for method in args.methods.split(","):
        template = initial_recipe(sources, len(pool.base.layers), method, 0, args.layer_groups, 1.0)
        blender = Blender(pool)
        blender.apply(template)  # the buffers are allocated on the first candidate
        t0 = time.perf_counter()
        blender.apply(random_recipe(template, rng))  # TIES: the kept deltas and ranks are made here, once
        first = time.perf_counter() - t0
        full, partial, recomputed = [], [], []
        for _ in range(args.candidates):
            r = random_recipe(template, rng)
            t0 = time.perf_counter()
            blender.apply(r)
            full.append(time.perf_counter() - t0)
            moved = one_group_moved(r, rng)
            t0 = time.perf_counter()
            blender.apply(moved)
            partial.append(time.perf_counter() - t0)
            recomputed.append(blender.recomputed)
        t0 = time.perf_counter()
        ev = fitness.score(blender.model, pool.tokenizer, hops=template.layers)
        scoring = time.perf_counter() - t0
        mk = [time_mergekit(random_recipe(template, rng), work, "float32", args.threads)
              for _ in range(args.mergekit_candidates)]
        row = {"method": method, "layer_groups": args.layer_groups, "tensors": len(blender.tensors),
               "in_memory_first_candidate_s": first, "kept_mb": blender.kept_bytes / 2**20,
               "in_memory_all_values_s": median(full), "in_memory_one_group_s": median(partial),
               "one_group_tensors_recomputed": median(recomputed), "mergekit_write_and_load_s": median(mk),
               "speedup_all_values": median(mk) / median(full), "speedup_one_group": median(mk) / median(partial),
               "scoring_s": scoring, "scoring_task": f"{task} ({docs} docs)", "score": ev.score,
               "torch_threads": torch.get_num_threads(), "loadavg": loadavg()}
        rows.append(row)
        print(f"{method:<16} in memory {row['in_memory_all_values_s']:.2f} s (all values) / "
              f"{row['in_memory_one_group_s']:.2f} s (one group, {row['one_group_tensors_recomputed']:.0f} of "
              f"{row['tensors']} tensors)  mergekit-yaml + load {row['mergekit_write_and_load_s']:.1f} s  "
              f"-> x{row['speedup_all_values']:.0f} / x{row['speedup_one_group']:.0f}; scoring {scoring:.1f} s; "
              f"first candidate {first:.1f} s, kept {row['kept_mb']:.0f} MB; load {row['loadavg']}")
    write_result(args.out, {"machine": machine(), "loadavg_at_start": started, "sources": sources, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
