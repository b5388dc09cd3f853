"""Racing at its defaults on the zoo's GA: wall time and the best genome against the same search unraced.

Side by side in one process, per seed: the zoo's search (`genomes/zoo.yaml`: routes over the zoo's J and M,
J arithmetic on 400 dev problems plus the J language-model loss, GA, population 10, 3 generations after the
first) unraced (`racing: off`), then raced as a config that says nothing of racing races (`racing: auto`, which
races this search at every default), after an untimed small raced search that pays the imports and lazy set-ups
(before, the first seed's unraced run paid them alone). Reported per seed: wall and CPU seconds,
candidates, documents scored, and each run's best genome with its score on all dev documents (every finished
raced score is lm-eval's over all documents, so the two bests compare directly). Issue 32's targets: raced wall
time at most 0.6x the unraced, the raced best within 0.02 of the unraced best. Results:
bench/results/racing_zoo.json; runs in build/bench/racing_zoo (they resume).

    .venv/bin/python bench/bench_racing_zoo.py                 # seeds 3 (about 5-10 minutes idle)
    .venv/bin/python bench/bench_racing_zoo.py --seeds 3,4,5
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from bench_common import REPO, RESULTS, loadavg, machine, write_result
from bench_racing import evaluations, run, summary


def zoo_config(racing: dict[str, Any] | None, out: Path, seed: int, generations: int, population: int,
               problems: int) -> Any:
    """The zoo's search config at this seed and size, raced or not, without validation or held-out report."""
    from dfs_merge.config import RunConfig, load_config

    data = load_config(REPO / "genomes" / "zoo.yaml").model_dump(mode="json", by_alias=True)
    data.update({"racing": racing, "out": str(out), "seed": seed, "generations": generations,
                 "population": population, "limit": {"zoo_arith_j_dev": problems}, "report_tasks": []})
    return RunConfig(**data)


def best(out: Path) -> dict[str, Any]:
    """The run's best genome scored on every dev document: its key, dev score and hops."""
    finished = [e for e in evaluations(out)
                if e["error"] is None and (e["evaluation"].get("race") or {}).get("dropped") is None]
    top = max(finished, key=lambda e: e["score"])
    return {"key": top["key"], "score": top["score"], "hops": top["hops"]}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text).strip("_") or "defaults"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="3")
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--population", type=int, default=10)
    ap.add_argument("--problems", type=int, default=400)
    ap.add_argument("--work", default=str(REPO / "build" / "bench" / "racing_zoo"))
    ap.add_argument("--racing", default="auto",
                    help="the raced run's racing: auto (the default: racing as a config without `racing:` races), "
                         "or a block as JSON ({} for every default)")
    ap.add_argument("--fresh", action="store_true", help="delete earlier runs first")
    ap.add_argument("--out", type=Path, default=RESULTS / "racing_zoo.json")
    args = ap.parse_args(argv)
    work = Path(args.work)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    # A small search first, untimed, so that the first timed run does not pay the imports and lazy set-ups alone
    warm = work / "warm-up"
    shutil.rmtree(warm, ignore_errors=True)
    run(zoo_config({}, warm, 0, 1, 4, 40), [], "warm-up")  # raced: it pays racing's imports (scipy) too
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        row: dict[str, Any] = {"seed": seed}
        raced = args.racing if args.racing == "auto" else json.loads(args.racing)
        for name, racing in (("unraced", None), ("raced", raced)):
            out = work / f"seed{seed}-{name}" if racing is None else work / f"seed{seed}-raced-{_slug(args.racing)}"
            cfg = zoo_config(racing, out, seed, args.generations, args.population, args.problems)
            wall, cpu = run(cfg, [], name)
            row[name] = {**summary(out, wall, cpu), "best": best(out), "loadavg": loadavg()}
            row[name].pop("front", None)
        u, r = row["unraced"], row["raced"]
        row["wall_ratio"] = round(r["seconds"] / u["seconds"], 3)
        row["documents_ratio"] = round(r["documents"] / u["documents"], 3)
        row["best_difference"] = round(r["best"]["score"] - u["best"]["score"], 4)
        row["met"] = row["wall_ratio"] <= 0.6 and abs(row["best_difference"]) <= 0.02
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("seed", "wall_ratio", "documents_ratio", "best_difference", "met")}),
              flush=True)
    write_result(args.out, {"machine": machine(), "config": vars(args) | {"out": str(args.out)}, "seeds": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
