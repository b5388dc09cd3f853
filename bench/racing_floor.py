"""The fewest documents per candidate that racing could have scored on a finished unraced search without
changing what the search kept.

Racing saves documents only on candidates it stops, and a stop changes nothing only for a candidate that at
least `cut` others dominate on all dev documents (a higher score and, with hops among the objectives, no more
hops): with cut 1 it is off the dev front when it is made; with NSGA-II's cut (the population, `race_cut`) it
is in a front NSGA-II's selection never reaches. This reads an unraced search's `evals.jsonl` (every candidate
scored on every document) and counts, for each candidate, the others that dominate it among every candidate
scored before it and in its own generation: a superset of the references racing has (the population and the
stage), so the counts are upper bounds. Generation 0's seeds (each source and `seed_routes`) are always scored
whole. Even a race that knew the full scores after its first stage (a fraction f of the documents) would then
score, per candidate on average,

    (seeds + candidates it must not stop + f x candidates it may stop) / candidates

of the unraced documents: the floor printed for each cut and f (f = 0 is the limit of a free first stage).

    .venv/bin/python bench/racing_floor.py runs/smollm2-self-unraced/evolved [more search folders]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dfs_merge.errors import ConfigError, DfsMergeError
from dfs_merge.inputs import read_yaml


def dominators(rows: list[dict[str, Any]], candidates: list[dict[str, Any]], with_hops: bool) -> list[int]:
    """For each of the candidates: how many of the rows of its own or an earlier generation dominate it."""
    out = []
    for r in candidates:
        refs = (x for x in rows if x is not r and x["generation"] <= r["generation"])
        out.append(sum(x["score"] > r["score"] and (not with_hops or x["hops"] <= r["hops"]) for x in refs))
    return out


def floors(search: Path, cuts: list[int], first_stages: list[float]) -> dict[str, Any]:
    """The floor of documents per candidate for each cut and first-stage fraction, on one unraced search."""
    cfg = read_yaml(search / "config.yaml", ConfigError)
    try:
        rows = [json.loads(x) for x in (search / "evals.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{search / 'evals.jsonl'}: not a search's log ({err})") from None
    if any("race" in r.get("evaluation", {}) for r in rows):
        raise ConfigError(f"{search}: a raced search (its evaluations have race records); the floor needs every "
                          "candidate's score on every document")
    # generation 0 opens with the seeds (each source unchanged, then seed_routes): racing never stops them
    n_seeds = min(len(cfg["sources"]) + len(cfg.get("seed_routes") or []), cfg["population"])
    raced = rows[n_seeds:]
    counts = dominators(rows, raced, with_hops="hops" in (cfg.get("objectives") or []))
    result: dict[str, Any] = {"search": str(search), "candidates": len(rows), "seeds": n_seeds, "floors": []}
    for cut in cuts:
        may_stop = sum(c >= cut for c in counts)
        for f in first_stages:
            floor = (n_seeds + len(raced) - may_stop + f * may_stop) / len(rows)
            result["floors"].append({"cut": cut, "may_stop": may_stop, "first_stage": f, "floor": round(floor, 3)})
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("searches", nargs="+", type=Path, help="unraced search folders (holding evals.jsonl)")
    ap.add_argument("--cuts", default=None, help="comma list (default: 1 and the config's population, NSGA-II's)")
    ap.add_argument("--first-stages", default="0.2,0.125,0", help="comma list of first-stage fractions")
    args = ap.parse_args(argv)
    stages = [float(x) for x in args.first_stages.split(",")]
    rows = []
    try:
        for search in args.searches:
            pop = read_yaml(search / "config.yaml", ConfigError)["population"]
            r = floors(search, [int(x) for x in args.cuts.split(",")] if args.cuts else [1, pop], stages)
            rows += [f"| {search} | {r['candidates']} | {r['seeds']} | {f['cut']} | {f['may_stop']} | "
                     f"{f['first_stage']} | {f['floor']:.3f} |" for f in r["floors"]]
    except (DfsMergeError, KeyError, TypeError) as err:
        print(f"racing_floor: {err}", file=sys.stderr)
        return 2
    print("| search | candidates | seeds | cut | may stop | first stage | documents per candidate >= |")
    print("|---|---|---|---|---|---|---|", *rows, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
