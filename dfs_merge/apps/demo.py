"""The main job end to end: evolve a route, export the winner, and show what was gained.

`dfs-merge demo CONFIG` (what `make demo` runs) evolves the config (resuming a run
already in its `out:` folder, so a second demo reuses every evaluation), picks the
smallest Pareto member that keeps at least 95% of the base's dev quality (the mean
over tasks of value/base, inverted for lower-is-better metrics; or the best one), exports it as a Hugging Face checkpoint, and prints a table of the base, the
exported model and the naive deepening on the dev and held-out test tasks, the
files it wrote, and a generation sample of the base and the exported model.
"""

from __future__ import annotations

import datetime
import json
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dfs_merge.apps.baselines import naive_deepening_route
from dfs_merge.apps.compare import identity_route, score_routes
from dfs_merge.atomic import write_atomic
from dfs_merge.config import RunConfig, load_config
from dfs_merge.evaluation import Evaluation
from dfs_merge.export.checkpoint import export_checkpoint
from dfs_merge.fitness.score import Fitness
from dfs_merge.genome import Genome, Route
from dfs_merge.models.sources import SourcePool
from dfs_merge.plots import route_png
from dfs_merge.search.backends import ModelEvaluator
from dfs_merge.search.evolution import RunResult, run_evolution
from dfs_merge.stitch import stitch

KEEP = 0.95
PROMPT = "Write three short sentences about the sea."


@dataclass
class ModelRow:
    """One model of the comparison table."""

    name: str
    hops: int
    params: int
    dev: Evaluation
    test: Evaluation | None


def parameter_count(pool: SourcePool, route: Route) -> int:
    """Parameters of the route as an exported checkpoint: the base's non-layer tensors plus each hop's layer."""
    base = pool.base.model
    layer_ids = {id(p) for layer in pool.base.layers for p in layer.parameters()}
    outside = sum(p.numel() for p in base.parameters() if id(p) not in layer_ids)
    return outside + sum(sum(p.numel() for p in pool.layer(h.source, h.layer).parameters()) for h in route)


def retention(ev: Evaluation, base: Evaluation) -> float:
    """Mean share of the base's quality kept, per task: value/base where higher is better, base/value otherwise."""
    shares = []
    for name, b in base.tasks.items():
        v = ev.tasks.get(name)
        if v is None or not ev.ok:
            return 0.0
        shares.append(v.value / b.value if b.higher_is_better else b.value / v.value if v.value else 0.0)
    return sum(shares) / len(shares) if shares else 0.0


def pick_exported(pareto: Sequence[tuple[Genome, Evaluation]], base: Evaluation, keep: float = KEEP) -> Genome:
    """The member with the fewest hops that keeps at least `keep` of the base's dev quality, else the best one."""
    good = [(g, ev) for g, ev in pareto if ev.ok and retention(ev, base) >= keep]
    if good:
        return min(good, key=lambda m: (m[1].hops, -m[1].score))[0]
    return max(pareto, key=lambda m: m[1].score)[0]


def sample(model: torch.nn.Module, tokenizer, prompt: str = PROMPT, tokens: int = 40) -> str:
    """Greedy continuation of a chat prompt, wrapped to at most three lines."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return "\n".join(textwrap.wrap(" ".join(answer.split()), width=100)[:3])


def table(rows: Sequence[ModelRow], cfg: RunConfig) -> str:
    """Markdown table: hops, parameters, then each task's primary metric on dev and on test."""
    pairs = list(zip(cfg.tasks, cfg.report_tasks or [None] * len(cfg.tasks), strict=False))
    head = ["model", "hops", "params (M)", "dev score"]
    for dev, test in pairs:
        metric = rows[0].dev.tasks[dev].metric if dev in rows[0].dev.tasks else "?"
        head += [f"{dev} {metric}"] + ([f"{test} {metric}"] if test else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, str(r.hops), f"{r.params / 1e6:.1f}", f"{r.dev.score:.4f}"]
        for dev, test in pairs:
            cells.append(_metric(r.dev, dev))
            if test:
                cells.append(_metric(r.test, test))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metric(ev: Evaluation | None, task: str) -> str:
    if ev is None or task not in ev.tasks:
        return "-"
    return f"{ev.tasks[task].value:.4f}"


def run_demo(config: str | Path, out: Callable[[str], None] = print) -> dict:
    """Evolve, choose, export, compare; returns what it printed as data (also written to the run folder)."""
    start = time.perf_counter()
    cfg = load_config(config)
    run_dir = Path(cfg.out)
    evaluator = ModelEvaluator(cfg, "dev")
    # The held-out scores are computed once below, for the table; the run itself needs only dev scores.
    result: RunResult = run_evolution(
        cfg, resume=(run_dir / "checkpoint.json").exists(), evaluate=evaluator, report=False
    )
    phases: dict[str, float] = {}

    def mark(phase: str) -> None:
        """Record the seconds since the previous mark (or the start) under `phase`."""
        phases[phase] = time.perf_counter() - start - sum(phases.values())

    mark("evolution")
    pool = evaluator.setup().pool  # loaded once, shared with the table below
    dev = Fitness.from_config(cfg, "dev")
    test = Fitness.from_config(cfg, "test") if cfg.report_tasks else None
    routes = {"base": identity_route(pool), "naive deepening": naive_deepening_route(pool.layers_per_source[0])}
    dev_evals = score_routes(pool, dev, routes)
    test_evals = score_routes(pool, test, routes) if test else {}

    front = result.pareto or [(result.best, result.best_eval)]
    chosen = pick_exported(front, dev_evals["base"])
    mark("base and deepening scored")
    exported_dir = run_dir / "exported"
    out(f"exporting {len(chosen.decode())} hops ({chosen.decode().text()}) to {exported_dir}")
    export_checkpoint(pool, chosen, exported_dir, force=True, verify=True)
    mark("export")

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(exported_dir).eval()
    hops = exported.config.num_hidden_layers
    exported_dev = dev.score(exported, pool.tokenizer, hops=hops)
    exported_test = test.score(exported, pool.tokenizer, hops=hops) if test else None

    rows = [
        ModelRow("base SmolLM2" if "smollm2" in pool.paths[0].lower() else "base", len(routes["base"]),
                 parameter_count(pool, routes["base"]), dev_evals["base"], test_evals.get("base")),
        ModelRow("exported (evolved)", hops, parameter_count(pool, chosen.decode()), exported_dev, exported_test),
        ModelRow("naive deepening 0-19 + 10-29" if len(routes["base"]) == 30 else "naive deepening",
                 len(routes["naive deepening"]), parameter_count(pool, routes["naive deepening"]),
                 dev_evals["naive deepening"], test_evals.get("naive deepening")),
    ]
    picture = route_png(chosen, run_dir / "route.png")
    md = table(rows, cfg)
    samples = {"base": sample(stitch(pool, routes["base"]), pool.tokenizer), "exported": sample(exported, pool.tokenizer)}
    mark("exported scored, samples")
    seconds = sum(phases.values())
    stamp = datetime.date.today().isoformat()

    out("")
    out(f"dfs-merge demo ({config}, {stamp}): {result.evaluations} evaluations over {result.generations} generations")
    out(md)
    out("")
    out("files:")
    for label, path in [("run directory", run_dir), ("history", result.paths.get("history")),
                        ("report (browser)", result.paths.get("report")),
                        ("route picture", picture), ("exported checkpoint", exported_dir)]:
        out(f"  {label:<20} {path}")
    out("")
    out(f"prompt: {PROMPT}")
    for name, text in samples.items():
        out(f"--- {name}:")
        out(text)
    out(f"\ndemo took {seconds:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + ")")

    summary = {
        "date": stamp,
        "config": str(config),
        "chosen_route": chosen.decode().text(),
        "table_markdown": md,
        "rows": [
            {"name": r.name, "hops": r.hops, "params": r.params, "dev": r.dev.to_dict(),
             "test": r.test.to_dict() if r.test else None}
            for r in rows
        ],
        "samples": samples,
        "seconds": round(seconds, 1),
        "phases_s": {k: round(v, 1) for k, v in phases.items()},
        "evaluations": result.evaluations,
    }
    write_atomic(run_dir / "demo.json", json.dumps(summary, indent=2) + "\n")
    return summary
