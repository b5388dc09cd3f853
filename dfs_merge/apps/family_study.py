"""The paper's claim on a real model: J and M (SmolLM2 LoRA specialists, `specialists.py`) merged by evolution.

`python -m dfs_merge.apps.family_study [CONFIG]` (what `make study-family` runs) evolves the config
(`genomes/family.yaml`: routes over J and M) and its `scaling: none` ablation (both resume), then scores on
the held-out test split: Instruct, J, M, the majority answer, the naive frankenmerge (J's lower half, M's
upper half), task arithmetic of the two adapters (base + dJ + dM) and the two evolved routes; then the
parameter-space search (`genomes/family_ps.yaml`: task-arithmetic weights per adapter and layer group, CMA-ES)
and the hybrid (`genomes/family_hybrid.yaml`: routes over that search's best merge and J), each run after
the one it needs. It writes the table to `<out>/table.md` and `<out>/table.json` and prints it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dfs_merge import bundled
from dfs_merge.atomic import write_atomic
from dfs_merge.candidate import CandidateScorer
from dfs_merge.config import RunConfig, load_config
from dfs_merge.evaluation import Evaluation
from dfs_merge.route import Hop, Route
from dfs_merge.search.evolution import run_evolution

CONFIG = bundled.genomes_dir() / "family.yaml"
PS_CONFIGS = {  # row -> config, run in this order (the hybrid's source 0 is the first one's best recipe)
    "evolved PS (task arithmetic per layer group, CMA-ES)": bundled.genomes_dir() / "family_ps.yaml",
    "evolved hybrid: DFS over (evolved PS, J)": bundled.genomes_dir() / "family_hybrid.yaml",
}
FRANKENMERGE = "0:0-14, 1:15-29"  # J's lower half, M's upper half
COLUMNS = {  # column -> (test task, scale): accuracies in %, bits per byte as they are
    "J-arith acc.": ("family_arith_j_test", 100.0), "E-arith acc.": ("family_arith_e_test", 100.0),
    "J loss (bits/byte)": ("zoo_lm_j_test", 1.0), "prose bits/byte": ("prose_ppl_test", 1.0),
    "cloze acc.": ("cloze_mc_test", 100.0),
}


def searches(cfg: RunConfig) -> dict[str, RunConfig]:
    """The evolved rows: the config as it is, and its `scaling: none` ablation in a sibling folder."""
    return {"evolved DFS": cfg,
            "evolved DFS, scaling none": cfg.model_copy(update={"scaling": "none", "out": f"{cfg.out}-scaling-none"})}


def majority(task_file: Path) -> float:
    """The accuracy of always giving the most frequent answer of a task's data file."""
    answers = [json.loads(line)["answer"] for line in task_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return max(answers.count(a) for a in set(answers)) / len(answers)


def task_arithmetic(pool: Any) -> Any:
    """base + dJ + dM: both adapters merged into the base's weights (PEFT's merge, one after the other)."""
    from dfs_merge.models.adapters import merged_model, split_source

    model = pool.sources[2].model  # the plain base
    for source in pool.sources[:2]:
        model = merged_model(model, split_source(source.path)[1])
    return model


def run_family_study(config: str | Path = CONFIG, log: Callable[[str], Any] = print,
                     ps_configs: dict[str, Path] | None = None) -> dict[str, Any]:
    """Evolve (or resume) the searches, score every row on the test split, write and print the table."""
    from dfs_merge.fitness.score import Fitness
    from dfs_merge.models.adapters import split_source
    from dfs_merge.models.sources import SourcePool

    started = time.perf_counter()
    cfg = load_config(config)
    results = {}
    for label, run_cfg in searches(cfg).items():
        log(f"[search] {label} -> {run_cfg.out}")
        results[label] = run_evolution(run_cfg, resume=(Path(run_cfg.out) / "config.yaml").exists(), report=False,
                                       log=log)
    for label, path in (PS_CONFIGS if ps_configs is None else ps_configs).items():
        run_cfg = load_config(path)  # after the searches before it: the hybrid's recipe source exists now
        log(f"[search] {label} -> {run_cfg.out}")
        results[label] = run_evolution(run_cfg, resume=(Path(run_cfg.out) / "config.yaml").exists(), report=False,
                                       log=log)
    base = split_source(cfg.sources[0])[0]
    pool = SourcePool.load([*cfg.sources, base], cfg.device, cfg.dtype)  # J, M, then the plain base (source 2)
    fitness = Fitness.from_config(cfg, "test")
    score = CandidateScorer(pool, fitness)
    layers = pool.layers_per_source[0]

    def whole(source: int) -> Route:
        return Route(tuple(Hop(source, i) for i in range(layers)))

    # J's adapter leaves the embeddings, final norm and head alone, so routes over the base's layers (source 2)
    # under J's embeddings are exactly Instruct.
    rows: dict[str, tuple[Evaluation, int, str]] = {
        "Instruct (base)": (score(whole(2)), layers, ""), "J (J-language specialist)": (score(whole(0)), layers, ""),
        "M (arithmetic specialist)": (score(whole(1)), layers, ""),
        "naive frankenmerge: J 0-14 + M 15-29": (score(Route.parse(FRANKENMERGE)), layers, FRANKENMERGE),
        "task arithmetic of the adapters (base + dJ + dM)":
            (fitness.score(task_arithmetic(pool), pool.tokenizer, hops=layers), layers, ""),
    }
    for label, result in results.items():
        best = result.best
        if tuple(best.sources) != tuple(cfg.sources):  # a recipe, or routes over other sources: their own pool
            own = CandidateScorer(SourcePool.load(list(best.sources), cfg.device, cfg.dtype), fitness)
            rows[label] = (own.genome(best), len(best.decode()), best.text())
            continue
        route = best.decode()
        scaled = " (scaled)" if any(h.scale != 1.0 for h in route) else ""
        rows[label] = (score(route), len(route), route.text() + scaled)
    chance = 100.0 * majority(bundled.suites_dir() / "data" / "zoo_arith_j_test.jsonl")
    text = table(rows, chance)
    data = {"config": str(config), "seed": cfg.seed, "seconds": round(time.perf_counter() - started, 1),
            "evaluations": {label: r.evaluations for label, r in results.items()}, "majority_j_arith": chance,
            "rows": {k: {"eval": ev.to_dict(), "hops": hops, "route": route} for k, (ev, hops, route) in rows.items()}}
    write_atomic(Path(cfg.out) / "table.md", text + "\n")
    write_atomic(Path(cfg.out) / "table.json", json.dumps(data, indent=1))
    log(text)
    log(f"family study took {data['seconds']:.0f} s; table in {Path(cfg.out) / 'table.md'}")
    return data


def table(rows: dict[str, tuple[Evaluation, int, str]], chance: float) -> str:
    """The README table: one row per model, the test split's columns, hops and route."""
    head = ["model", *COLUMNS, "hops", "route"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             f"| majority answer | {chance:.1f} | | | | | | |"]
    for label, (ev, hops, route) in rows.items():
        cells = []
        for task, factor in COLUMNS.values():
            r = ev.tasks.get(task)
            cells.append(f"{r.value * factor:.1f}" if r is not None and factor != 1.0 else
                         f"{r.value:.4f}" if r is not None else "failed")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {hops} | {f'`{route}`' if route else ''} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dfs_merge.apps.family_study [CONFIG]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    from dfs_merge.errors import DfsMergeError

    try:
        run_family_study(args[0] if args else CONFIG)
    except DfsMergeError as err:
        print(f"family study: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
