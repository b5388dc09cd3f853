"""Resident memory of LoRA adapter sources: the base alone against the base with its two specialists.

Each case loads its sources as a `SourcePool` in a fresh process, reads every distinct tensor once (weights
loaded from safetensors may still be only memory-mapped) and reports the growth of the resident set over the
interpreter's (torch and transformers imported), and the parameters in distinct storages. `BASE+ADAPTER` sources share every tensor their
adapter does not touch with the base, so base + J + M should hold the base once plus the adapted layers,
not three models. Figures: bench/results/adapters.json.

    .venv/bin/python bench/bench_adapters.py       # SmolLM2 + models/family/{j,m}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench_common import REPO, RESULTS, machine, write_result

CHILD = """
import gc, json, sys, psutil, torch, transformers
from dfs_merge.models.sources import SourcePool
proc = psutil.Process()
gc.collect(); before = proc.memory_info().rss
pool = SourcePool.load(json.loads(sys.argv[1]))
# distinct storages (an adapter source's untouched tensors are the base's), each read once so that weights
# that are still only memory-mapped count as resident
storages = {p.untyped_storage().data_ptr(): p for s in pool.sources for p in s.model.parameters()}
touched = sum(float(p.detach().float().sum()) for p in storages.values())
gc.collect(); after = proc.memory_info().rss
print(json.dumps({"rss_mb": round((after - before) / 2**20, 1),
                  "distinct_parameters": sum(p.numel() for p in storages.values())}))
"""


def measure(sources: list[str]) -> dict:
    """RSS growth (MB) and distinct parameter count of loading `sources` in a fresh process."""
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sources)], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--adapters", default="models/family/j,models/family/m")
    ap.add_argument("--out", type=Path, default=RESULTS / "adapters.json")
    args = ap.parse_args(argv)
    adapters = [a for a in args.adapters.split(",") if a]
    cases = {"base": [args.base], "base + 2 adapters": [args.base, *(f"{args.base}+{a}" for a in adapters)],
             "2 adapters": [f"{args.base}+{a}" for a in adapters]}
    rows = {name: measure(sources) for name, sources in cases.items()}
    one = rows["base"]["rss_mb"]
    for name, r in rows.items():
        r["over_one_model"] = round(r["rss_mb"] / one, 3)
        print(f"{name:<20} {r['rss_mb']:>8.1f} MB  x{r['over_one_model']:.2f} of one model  "
              f"{r['distinct_parameters'] / 1e6:.1f}M distinct parameters")
    write_result(args.out, {"machine": machine(), "cases": cases, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
