"""Export time and peak memory: `dfs-merge export` (default verification, `--no-verify`, `--verify full`) against
`mergekit-yaml` on the same recipe, side by side in one run.

The recipe is a SOLAR-style depth up-scaling of SmolLM2-135M-Instruct: two overlapping slices of its 30 layers,
0-23 and 6-29 (48 layers), written as a mergekit YAML (`merge_method: passthrough`, `dtype: bfloat16`, and the
same in `float32`) and imported with `dfs-merge import-mergekit` into the genome that `dfs-merge export` writes.
Each export is its own subprocess, start-up included, into a fresh folder (removed afterwards); its wall time
is measured here and its peak resident memory by /usr/bin/time (`run_child` says why not `ru_maxrss` straight
from this process's children). A round runs every
variant of every dtype once, in turn, so that a busy machine slows all alike; figures are medians over the
rounds, ratios medians of the per-round ratios. CPU seconds (user + system, from /usr/bin/time) are given
beside the wall time: on a machine that others share they vary far less. The first round also checks that our default export and
mergekit's hold the same tensors, bit for bit, and reads the verification's stage times from our stderr (where a
core is free the export loads the sources for its logit check beside the writing: then only the time it waited
for them counts).

    .venv/bin/python bench/bench_export.py                     # -> bench/results/export.json
    .venv/bin/python bench/bench_export.py --rounds 1 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import REPO, RESULTS, loadavg, machine, median, write_result

BIN = Path(sys.executable).parent
VARIANTS = {  # name -> the export command's extra arguments (None: mergekit-yaml)
    "mergekit-yaml": None,
    "dfs-merge (default: quick verify)": [],
    "dfs-merge --no-verify": ["--no-verify"],
    "dfs-merge --verify full": ["--verify", "full"],
}
SHORT = dict(zip(("mergekit", "quick", "off", "full"), VARIANTS, strict=True))
STAGES = {"tensor check": r"export: checked \d+ tensors \((\d+\.\d) s\)",
          # the stitched model's side: run after the writing (its seconds), or beside it (the seconds waited for it)
          "reference": r"export: loaded \d+ sources? and ran the stitched model (?:\((\d+\.\d) s\)|"
                       r"beside the writing \(\d+\.\d s; waited (\d+\.\d) s\))",
          "logit check": r"export: compared \((\d+\.\d) s\)"}
BESIDE = "beside the writing ..."  # the export's line when it loads the sources for its comparison beside the writing


def recipe_yaml(folder: str, slices: list[tuple[int, int]], dtype: str) -> str:
    """A mergekit passthrough of `slices` (first, last-exclusive) of the model in `folder`."""
    lines = ["slices:"]
    for a, b in slices:
        lines += ["  - sources:", f"      - model: {folder}", f"        layer_range: [{a}, {b}]"]
    return "\n".join([*lines, "merge_method: passthrough", f"dtype: {dtype}", ""])


def run_child(argv: list[str], env: dict[str, str]) -> tuple[float, float, float, str]:
    """Run one command; its wall seconds, its peak RSS in MB, its CPU seconds (user + system) and its stderr.

    The peak comes from /usr/bin/time (`%M`, which measures its own child): a child forked straight from
    this process would report at least this process's resident size, which Linux counts into a child's
    `ru_maxrss` from the fork on. Without /usr/bin/time, `os.wait4`'s figure is used (this process stays
    small for that: it never loads a model).
    """
    timer = Path("/usr/bin/time")
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as peak:
        wrapped = [str(timer), "-f", "%M %U %S", "-o", peak.name, *argv] if timer.is_file() else argv
        t = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
        if timer.is_file():
            kb, user, system = (float(x) for x in peak.read().split()[-3:])
        else:
            kb, user, system = usage.ru_maxrss, usage.ru_utime, usage.ru_stime
    if proc.returncode:
        raise SystemExit(f"bench_export: {' '.join(argv[:3])} ... exited {proc.returncode}: {text[-1500:]}")
    return seconds, kb / 1024, user + system, text


SAME_TENSORS = """
import sys, torch
from safetensors import safe_open
from pathlib import Path
def read(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out
x, y = read(sys.argv[1]), read(sys.argv[2])
same = x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)
print("same" if same else "different")
"""


def same_tensors(a: Path, b: Path, env: dict[str, str]) -> bool:
    """Whether two checkpoints hold the same tensor names with equal bytes (read in a child process, so that
    this one stays small)."""
    done = subprocess.run([sys.executable, "-c", SAME_TENSORS, str(a), str(b)], capture_output=True, text=True,
                          env=env, check=True)
    return done.stdout.strip() == "same"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a packaged model name or a model folder")
    ap.add_argument("--slices", default="0-23,6-29", help="layer ranges (inclusive) of the up-scaled model")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="mergekit,quick,off,full", help=f"a comma list of {', '.join(SHORT)}")
    ap.add_argument("--out", default=str(RESULTS / "export.json"))
    args = ap.parse_args(argv)

    model = Path(args.model).expanduser()
    if not model.is_dir():  # a packaged name: its converted folder, found by the CLI (this process loads no torch)
        done = subprocess.run([str(BIN / "dfs-merge"), "models", args.model], capture_output=True, text=True,
                              check=True)
        model = Path(done.stdout.strip().splitlines()[-1])
    folder = str(model.resolve())
    slices = [(int(a), int(b) + 1) for a, b in (s.split("-") for s in args.slices.split(","))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "PYTHONWARNINGS": "ignore"}
    dtypes = args.dtypes.split(",")
    variants = {SHORT[v]: VARIANTS[SHORT[v]] for v in args.variants.split(",")}
    if "mergekit-yaml" not in variants:
        raise SystemExit("bench_export: --variants must include mergekit (every ratio is against it)")
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {d: {v: [] for v in variants} for d in dtypes}
    checks: dict[str, Any] = {}
    try:
        for d in dtypes:
            (work / f"{d}.yaml").write_text(recipe_yaml(folder, slices, d))
            subprocess.run([str(BIN / "dfs-merge"), "import-mergekit", str(work / f"{d}.yaml"), "--out",
                            str(work / f"{d}.genome.yaml")], check=True, env=env, capture_output=True)
        for r in range(args.rounds):
            for d in dtypes:
                for name, extra in variants.items():
                    out = work / "out"
                    if extra is None:
                        argv = [str(BIN / "mergekit-yaml"), str(work / f"{d}.yaml"), str(out), "--quiet"]
                    else:
                        argv = [str(BIN / "dfs-merge"), "export", str(work / f"{d}.genome.yaml"), "--out", str(out),
                                *extra]
                    seconds, peak, cpu, err = run_child(argv, env)
                    row: dict[str, Any] = {"seconds": round(seconds, 2), "cpu_s": round(cpu, 2), "peak_mb": round(peak),
                                           "loadavg": loadavg()}
                    for stage, pattern in STAGES.items():
                        m = re.search(pattern, err)
                        if m:
                            row[f"{stage} s"] = float(next(g for g in m.groups() if g is not None))
                    if extra is not None and "reference s" in row:
                        row["reference beside"] = BESIDE in err
                    runs[d][name].append(row)
                    print(f"round {r + 1} {d:9} {name:34} {seconds:6.2f} s (cpu {cpu:6.2f} s) {peak:6.0f} MB  "
                          f"load {row['loadavg']}", flush=True)
                    if r == 0 and name == "mergekit-yaml":
                        shutil.move(str(out), str(work / "mergekit-out"))
                    elif r == 0 and (work / "mergekit-out").is_dir():
                        checks[d] = same_tensors(out, work / "mergekit-out", env)
                        shutil.rmtree(work / "mergekit-out")
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for d in dtypes:
        mk = runs[d]["mergekit-yaml"]
        for name in variants:
            rs = runs[d][name]
            row = {"dtype": d, "variant": name, "seconds": median([x["seconds"] for x in rs]),
                   "cpu_s": median([x["cpu_s"] for x in rs]), "peak_mb": median([x["peak_mb"] for x in rs]),
                   "time_vs_mergekit": round(median([x["seconds"] / m["seconds"] for x, m in zip(rs, mk, strict=True)]), 3),
                   "cpu_vs_mergekit": round(median([x["cpu_s"] / m["cpu_s"] for x, m in zip(rs, mk, strict=True)]), 3),
                   "memory_vs_mergekit": round(median([x["peak_mb"] / m["peak_mb"] for x, m in zip(rs, mk, strict=True)]), 3),
                   "runs": rs}
            for stage in STAGES:
                if all(f"{stage} s" in x for x in rs):
                    row[f"{stage} s"] = median([x[f"{stage} s"] for x in rs])
            rows.append(row)
        quick = next((r for r in rows if r["dtype"] == d and r["variant"] == SHORT["quick"]), None)
        bare = next((r for r in rows if r["dtype"] == d and r["variant"] == SHORT["off"]), None)
        if quick is None:
            continue
        # the verification's own stages, timed inside the same process as the export (the difference of two
        # runs' medians would carry the machine's drift between them)
        per_run = [sum(x.get(f"{stage} s", 0.0) for stage in STAGES) for x in quick["runs"]]
        quick["verify_s"] = round(median(per_run), 2)
        quick["verify_fraction"] = round(median([v / x["seconds"] for v, x in zip(per_run, quick["runs"],
                                                                                   strict=True)]), 3)
        if bare is not None:
            quick["quick_minus_no_verify_s"] = round(quick["seconds"] - bare["seconds"], 2)
    print(f"\n{'dtype':9} {'variant':34} {'seconds':>8} {'cpu s':>7} {'peak MB':>8} {'t/mk':>6} {'cpu/mk':>6} "
          f"{'mem/mk':>6}")
    for r in rows:
        print(f"{r['dtype']:9} {r['variant']:34} {r['seconds']:8.2f} {r['cpu_s']:7.2f} {r['peak_mb']:8.0f} "
              f"{r['time_vs_mergekit']:6.2f} {r['cpu_vs_mergekit']:6.2f} {r['memory_vs_mergekit']:6.2f}")
    for q in (r for r in rows if "verify_s" in r):
        d = q["dtype"]
        beside = sum(bool(x.get("reference beside")) for x in q["runs"])
        print(f"{d}: default verification {q['verify_s']:.2f} s = {100 * q['verify_fraction']:.0f}% of the export "
              f"(tensor check {q.get('tensor check s', '?')} s, stitched model {q.get('reference s', '?')} s "
              f"[run beside the writing in {beside} of {len(q['runs'])} runs, where only the wait counts], logit "
              f"check {q.get('logit check s', '?')} s); tensors equal to mergekit's: {checks.get(d)}")
    result = {"machine": machine(), "model": args.model, "slices": args.slices, "rounds": args.rounds,
              "hops": sum(b - a for a, b in slices), "identical_to_mergekit": checks, "rows": rows,
              "loadavg_end": loadavg()}
    write_result(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
