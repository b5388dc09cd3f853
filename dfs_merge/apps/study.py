"""A self-merge study: evolution against the published layer-pruning and deepening heuristics.

`dfs-merge study CONFIG` (what `make study-smollm2` runs) takes a one-source nsga2 config
with objectives [score, hops] and:

1. measures the heuristics' routes on the base (`baselines.baseline_routes`: ShortGPT and
   angular-distance block pruning for each n, naive deepening);
2. evolves the config with those routes among the generation-0 seeds (`seed_routes`), then
   reruns the same search with `scaling: none` (the paper's ablation of the scales);
3. picks each run's member at every hop count from its final front's fewest to its most (a hop
   count the dev front skips included: a route dominated on dev by one with fewer hops may still
   win on validation): with `select_tasks`, the one with the best validation score among the
   `select_top` best by dev at that hop count (`selection.py`), else the best by dev; scores on
   the held-out split the base, every heuristic and the members step 4 compares (`held_out="all"`:
   every picked member, for the whole points table and plot);
4. compares, for each heuristic, the front member at no more hops that the selection score
   (validation, else dev) prefers, by its held-out score, with a paired bootstrap interval of the
   difference over the held-out documents (`Fitness.difference_interval`); writes `results.md`, `results.json`
   and `pareto.png`; exports the pruned member the selection score prefers at `prune_hops` or
   fewer hops and generates from it. The held-out split never chooses anything.

The validation and held-out routes (and the heuristics the searches did not score on dev) are
scored through the config's evaluation backend, as the searches' candidates are: all of a split's
at once, so that with `workers: 2` two routes are scored at a time (`ScoreLog.fill`).

Everything resumes: each evolution resumes from its folder, validation and held-out scores
are appended to `val_scores.jsonl` / `test_scores.jsonl` (the dev scores of heuristics the
searches did not score to `dev_scores.jsonl`) the moment they are made, and reused while the
split is the same (a changed limit scores them again); a finished study starts no worker.
"""

from __future__ import annotations

import datetime
import functools
import json
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dfs_merge.apps.baselines import baseline_routes, calibration_texts, check_sizes
from dfs_merge.atomic import append_jsonl, read_jsonl, write_atomic
from dfs_merge.candidate import CandidateScorer
from dfs_merge.config import RunConfig, load_config
from dfs_merge.errors import ConfigError, DfsMergeError, GenomeError
from dfs_merge.evaluation import Evaluation
from dfs_merge.genome import Genome, Route, seed_genomes
from dfs_merge.genome_files import genome_from_dict
from dfs_merge.models.metadata import layer_counts
from dfs_merge.outputs import check_output
from dfs_merge.plots import save_png
from dfs_merge.search.backends import Evaluator, LazyEvaluator, ModelEvaluator, Window
from dfs_merge.search.evolution import run_evolution
from dfs_merge.search.rundir import RunDir
from dfs_merge.search.selection import Candidate, choose, front_span, per_hop_count, selection_score
from dfs_merge.stitch import stitch

PRINT = functools.partial(print, flush=True)  # progress lines reach a log file as they happen
PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Write two sentences about why the sky looks blue.",
    "Give me three tips for staying focused while studying.",
)


@dataclass
class Point:
    """One scored model of the study: where it comes from, its route, dev, validation and held-out evaluations."""

    name: str
    kind: str  # base | shortgpt | angular | deepening | evolved | evolved (scaling none)
    route: Route
    dev: Evaluation | None
    test: Evaluation | None  # None: not scored held out (`held_out="compared"` and no comparison needs it)
    val: Evaluation | None = None

    @property
    def hops(self) -> int:
        return len(self.route)

    @property
    def selection_score(self) -> float:
        """What chooses between front members: the validation score when there is one, else dev."""
        return selection_score(self.dev, self.val)

    def to_dict(self) -> dict[str, Any]:
        """The point as `results.json` records it (per-document results stay in the split's score log)."""
        def scores(ev: Evaluation | None) -> dict[str, Any] | None:
            return None if ev is None else {k: v for k, v in ev.to_dict().items() if k != "per_doc"}

        return {"name": self.name, "kind": self.kind, "hops": self.hops, "route": self.route.text(),
                "scales": self.route.scales, "dev": scores(self.dev), "val": scores(self.val),
                "test": scores(self.test)}


class ScoreLog:
    """One split's evaluations by route key, appended to a JSONL file as they are made and reused on resume.

    Only lines made on the split `score` scores now are reused (a full score on as many documents of the same
    tasks: `Fitness.matches`); with `per_document`, only lines holding each document's result, and new scores
    keep them (`Fitness.score(..., docs=(0, 1))`), for `Fitness.difference_interval`. `fill` scores many routes
    through `backend` (the config's workers, on the same split), one route alone here, with `score`."""

    def __init__(self, path: Path, score: CandidateScorer, per_document: bool = False,
                 backend: Evaluator | None = None):
        self.path, self.score, self.per_document, self.backend = path, score, per_document, backend
        self.docs: Window = (0.0, 1.0) if per_document else None
        self.known: dict[str, Evaluation] = {}
        for r in read_jsonl(path):
            ev = Evaluation.from_dict(r["eval"])
            if ev.ok and (not score.fitness.matches(ev) or (per_document and not ev.per_doc)):
                continue  # made under another limit or task list, or without per-document results
            self.known[r["key"]] = ev

    def remember(self, key: str, ev: Evaluation) -> None:
        """Take an evaluation made elsewhere (a search's) as this split's, without logging it again."""
        self.known.setdefault(key, ev)

    def record(self, route: Route, ev: Evaluation) -> None:
        """Log a new evaluation of `route` (so that a resumed study reuses it) and keep it."""
        key = route.key()
        with open(self.path, "a", encoding="utf-8") as f:
            append_jsonl(f, {"key": key, "route": route.text(), "eval": ev.to_dict()})
        self.known[key] = ev

    def __call__(self, route: Route) -> Evaluation:
        key = route.key()
        if key not in self.known:
            self.record(route, self.score(route, docs=self.docs))
        return self.known[key]

    def fill(self, routes: Iterable[Route]) -> None:
        """Score the routes not known yet all at once through `backend` (several at a time with several workers),
        each logged the moment it arrives; a single one, or without a backend, here. A route lost to an
        infrastructure fault (its worker kept dying) is no score: it is not logged, and the study stops, naming
        how many, once the others are."""
        todo = {r.key(): r for r in routes if r.key() not in self.known}
        if self.backend is None or len(todo) < 2:
            for route in todo.values():
                self(route)
            return
        layers = self.score.pool.layers_per_source
        genomes = [Genome.exact(route, self.score.pool.paths, layers) for route in todo.values()]
        lost = []
        for key, ev in self.backend.submit(genomes, self.docs):
            if ev.infrastructure:
                lost.append(key)
            else:
                self.record(todo[key], ev)
        if lost:
            raise DfsMergeError(f"{self.path.name}: {len(lost)} of {len(todo)} route(s) lost to infrastructure "
                                f"faults (their workers kept dying), so not scored: "
                                f"{'; '.join(todo[k].text() for k in lost)}; run the study again to score them")

    def close(self) -> None:
        """Release the backend's workers."""
        if self.backend is not None:
            self.backend.close()

    def __enter__(self) -> ScoreLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split_log(cfg: RunConfig, root: Path, fn: ModelEvaluator, per_document: bool = False) -> ScoreLog:
    """The score log of `fn`'s split (`root/SPLIT_scores.jsonl`), scoring with `fn`'s fitness, many routes through
    the config's backend, which starts only when routes need it (a finished study resumes without a worker)."""
    return ScoreLog(root / f"{fn.split}_scores.jsonl", fn.setup(), per_document, LazyEvaluator(cfg, fn))


def heuristic_kind(name: str) -> str:
    """'shortgpt', 'angular', 'deepening' or 'base' from a `baseline_routes` name."""
    return {"shortgpt": "shortgpt", "angular": "angular", "naive": "deepening"}.get(name.split()[0], "base")


def compared_member(points: Sequence[Point], front_kind: str, heuristic: Point) -> Point | None:
    """The `front_kind` member with no more hops than `heuristic` that the selection score (validation, else dev)
    prefers: the one its held-out score is compared with (the held-out split chooses nothing)."""
    fits = [p for p in points if p.kind == front_kind and p.hops <= heuristic.hops]
    return max(fits, key=lambda p: (p.selection_score, p.hops), default=None)


def held_out_routes(points: Sequence[Point], fronts: Sequence[str],
                    scope: Literal["compared", "all"] = "compared") -> list[Route]:
    """The routes to score held out: every point not of a front (the base, the heuristics) and the front members a
    comparison takes (`compared_member`), or with `scope="all"` every member."""
    compared = {id(m) for label in fronts for h in points if h.kind in ("shortgpt", "angular")
                if (m := compared_member(points, label, h)) is not None}
    return [p.route for p in points if p.kind not in fronts or scope == "all" or id(p) in compared]


def compare(points: Sequence[Point], front_kind: str,
            interval: Callable[[Evaluation, Evaluation], tuple[float, float] | None] | None = None,
            ) -> list[dict[str, Any]]:
    """For each pruning heuristic: the held-out score of its `compared_member`, and (`interval`) how far the
    difference could be the held-out documents' luck; the held-out split only reports."""
    rows = []
    for h in points:
        if h.kind not in ("shortgpt", "angular"):
            continue
        best = compared_member(points, front_kind, h)
        if best is not None and not (best.test and best.test.ok):
            best = None  # its held-out score failed: nothing to compare (points_table shows the failure)
        diff = None if best is None else best.test.score - h.test.score
        verdict = "no member" if best is None else "better" if diff > 0 else "equal" if diff == 0 else "worse"
        span = interval(best.test, h.test) if best is not None and interval is not None else None
        rows.append({"heuristic": h.name, "hops": h.hops, "heuristic_test": h.test.score,
                     "front_member": best.name if best else None, "front_hops": best.hops if best else None,
                     "front_test": best.test.score if best else None, "difference": diff, "verdict": verdict,
                     "interval": list(span) if span else None})
    return rows


def points_table(points: Sequence[Point], tasks: Sequence[str], report_tasks: Sequence[str]) -> str:
    """Markdown: one row per point, hops, dev (and validation) score, each held-out task's metric, held-out score."""
    first = next(p for p in points if p.test and p.test.ok)
    with_val = any(p.val is not None for p in points)
    head = ["model", "kind", "hops", "dev score"] + (["val score"] if with_val else [])
    head += [f"{t} {first.test.tasks[t].metric}" for t in report_tasks] + ["test score", "route"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in sorted(points, key=lambda p: (p.kind != "base", p.kind, p.hops, p.name)):
        cells = [p.name, p.kind, str(p.hops), f"{p.dev.score:.4f}" if p.dev and p.dev.ok else "-"]
        if with_val:
            cells.append(f"{p.val.score:.4f}" if p.val and p.val.ok else "-")
        cells += [f"{p.test.tasks[t].value:.4f}" if p.test and t in p.test.tasks else "-" for t in report_tasks]
        cells.append("not scored" if p.test is None else f"{p.test.score:.4f}" if p.test.ok
                     else f"failed: {p.test.error}")
        scaled = any(h.scale != 1.0 for h in p.route)
        cells.append(f"`{p.route.text()}`" + (" (scaled)" if scaled else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(rows: Sequence[dict[str, Any]], label: str) -> str:
    """Markdown: each heuristic against the best front member with no more hops, and the paired 95% bootstrap
    interval of the difference over the held-out documents where there is one."""
    lines = [f"| heuristic | hops | its test score | chosen {label} member at <= hops | hops | test score | difference "
             "| 95% interval |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["front_member"] is None:
            lines.append(f"| {r['heuristic']} | {r['hops']} | {r['heuristic_test']:.4f} | none | - | - | - | - |")
            continue
        span = f"[{r['interval'][0]:+.4f}, {r['interval'][1]:+.4f}]" if r.get("interval") else "-"
        lines.append(f"| {r['heuristic']} | {r['hops']} | {r['heuristic_test']:.4f} | {r['front_member']} | "
                     f"{r['front_hops']} | {r['front_test']:.4f} | {r['difference']:+.4f} ({r['verdict']}) | {span} |")
    return "\n".join(lines)


def pareto_png(points: Sequence[Point], report_tasks: Sequence[str], path: Path) -> Path:
    """Held-out score and each held-out metric against hops: both fronts as lines, the heuristics as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [p for p in points if p.test and p.test.ok]
    panels = [("test score", lambda ev: ev.score)] + [
        (f"{t}\n{ok[0].test.tasks[t].metric}", lambda ev, t=t: ev.tasks[t].value) for t in report_tasks]
    style = {"evolved": ("tab:blue", "o", "-"), "evolved (scaling none)": ("tab:orange", "o", "--"),
             "shortgpt": ("tab:red", "^", ""), "angular": ("tab:green", "s", ""),
             "deepening": ("tab:purple", "X", ""), "base": ("black", "*", "")}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.2), dpi=110)
    for ax, (title, value) in zip(axes, panels, strict=True):
        for kind, (color, marker, line) in style.items():
            group = sorted((p for p in ok if p.kind == kind), key=lambda p: p.hops)
            if group:
                ax.plot([p.hops for p in group], [value(p.test) for p in group], color=color, marker=marker,
                        linestyle=line or "none", label=f"{kind} front" if kind.startswith("evolved") else kind,
                        markersize=9 if marker in "*X" else 6)
        ax.set_xlabel("hops")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    try:
        return save_png(fig, path)
    finally:
        plt.close(fig)


def choose_pruned(members: Sequence[Candidate], max_hops: int) -> Genome | None:
    """The member with at most `max_hops` hops that the selection score (validation, else dev) prefers."""
    fits = [c for c in members if c.dev.hops <= max_hops]
    return max(fits, key=lambda c: (c.selection_score, c.dev.hops)).genome if fits else None


def run_study(config: str | Path, sizes: Sequence[int] = (2, 4, 6, 8), prune_hops: int = 26,
              ablation: bool = True, held_out: Literal["compared", "all"] = "compared",
              out: Callable[[str], None] = PRINT) -> dict[str, Any]:
    """Run (or resume) the whole study of a config; returns what it wrote to `results.json`.

    `held_out`: which front members are scored on the held-out split besides the heuristics: those a comparison
    takes (`compared_member`, the default: the held-out table needs no other), or every member (`all`, for the
    points table and the plot; the held-out split is the study's largest, so this costs the most time)."""
    from dfs_merge.apps.demo import sample
    from dfs_merge.export.checkpoint import export_checkpoint

    started = time.perf_counter()
    cfg = load_config(config)
    if len(cfg.sources) != 1 or cfg.algorithm != "nsga2" or not cfg.report_tasks:
        raise ConfigError(f"{config}: a study needs one source, algorithm nsga2 and report_tasks")
    check_sizes(sizes, layer_counts(cfg.sources)[0])  # before anything is loaded
    root = check_output(cfg.out, kind="folder", force=True, inputs=cfg.sources, error=ConfigError, what="out:")
    root.mkdir(parents=True, exist_ok=True)  # a study resumes in its folder: an existing one is fine
    evaluator = ModelEvaluator(cfg, "dev")
    scorer = evaluator.setup()
    pool = scorer.pool
    layers = pool.layers_per_source[0]

    out(f"[1/4] heuristics on {len(calibration_texts(_calibration()))} calibration texts (the prose dev split)")
    heuristics = baseline_routes(pool, calibration_texts(_calibration()), sizes)
    for name, route in heuristics.items():
        out(f"  {name:<26} {len(route):>3} hops  {route.text()}")
    template = Genome.empty(cfg.sources, (layers,), cfg.repeats, cfg.scaling, cfg.constraints)
    seeds = []
    for name, route in heuristics.items():
        if heuristic_kind(name) not in ("shortgpt", "angular"):
            continue
        try:
            seed_genomes(template, [route.text()])
            seeds.append(route.text())
        except GenomeError as err:
            out(f"  {name}: not a seed ({err})")
    # the study makes the final choice itself (step 3), for the heuristics and both runs alike
    runs = {"evolved": cfg.model_copy(update={"seed_routes": seeds, "select_tasks": [], "out": str(root / "evolved")})}
    if ablation:
        runs["evolved (scaling none)"] = runs["evolved"].model_copy(
            update={"scaling": "none", "out": str(root / "evolved-scaling-none")})

    fronts: dict[str, list[tuple[Genome, Evaluation]]] = {}
    evaluated: dict[str, list[tuple[Genome, Evaluation]]] = {}
    run_info: dict[str, Any] = {}
    searched: dict[str, Evaluation] = {}  # every dev evaluation of both searches, by route key
    for i, (label, run_cfg) in enumerate(runs.items()):
        out(f"[2/4] evolution {i + 1}/{len(runs)}: {label} -> {run_cfg.out}")
        t0 = time.perf_counter()
        result = run_evolution(run_cfg, resume=(Path(run_cfg.out) / "config.yaml").exists(), evaluate=evaluator,
                               report=False, log=out)
        fronts[label] = result.pareto
        rows = RunDir(run_cfg.out).read_evals()
        evaluated[label] = [(genome_from_dict(r["genome"]), Evaluation.from_dict(r["evaluation"])) for r in rows]
        searched.update({r["key"]: Evaluation.from_dict(r["evaluation"]) for r in rows})
        run_info[label] = {"out": run_cfg.out, "evaluations": result.evaluations, "generations": result.generations,
                           "seconds_this_call": round(time.perf_counter() - t0, 1), "front": len(result.pareto)}

    top = cfg.select_top if cfg.select_tasks else 1
    lists = {label: (front_span if cfg.select_tasks else per_hop_count)(
        evaluated[label], [ev.hops for _, ev in front if ev.ok], top) for label, front in fronts.items()}
    test_fn = evaluator.for_split("test")
    test_fitness = test_fn.setup().fitness
    out("[3/4] each front's member per hop count: " + (
        f"best on {', '.join(cfg.select_tasks)} of the {top} best by dev" if cfg.select_tasks else "best by dev")
        + "; held-out scores of the base, the heuristics and " + (
            "every member" if held_out == "all" else "the members the comparisons take"))
    with ExitStack() as stack:  # each split's workers, released before the export
        test_log = stack.enter_context(split_log(cfg, root, test_fn, test_fitness.per_document()))
        val = stack.enter_context(split_log(cfg, root, evaluator.for_split("val"))) if cfg.select_tasks else None
        dev = stack.enter_context(split_log(cfg, root, evaluator))
        for key, ev in searched.items():  # the seeded heuristics were scored on dev in generation 0 already
            if ev.ok:  # not a candidate a race stopped early (it has no full dev score)
                dev.remember(key, ev)
        dev.fill(heuristics.values())
        if val:  # the shortlisted routes (a heuristic's validation score chooses nothing)
            val.fill([c.genome.decode() for shortlists in lists.values() for cs in shortlists.values() for c in cs])
            val.close()  # its workers go before the held-out split's start
        points = [Point(name, heuristic_kind(name), route, dev(route), None, val.known.get(route.key()) if val else None)
                  for name, route in heuristics.items()]
        members: dict[str, list[Candidate]] = {}
        for label, shortlists in lists.items():
            chosen = choose(shortlists, (lambda g: val(g.decode())) if val else None)
            members[label] = [chosen[h] for h in sorted(chosen)]
            points += [Point(f"{label} {len(route)}", label, route, c.dev, None, c.val)
                       for c in members[label] for route in [c.genome.decode()]]
        test_log.fill(held_out_routes(points, list(members), held_out))
        test_log.close()
    for p in points:
        p.test = test_log.known.get(p.route.key())
        shortlisted = f" (of {len(lists[p.kind][p.hops])} shortlisted)" if val and p.kind in lists else ""
        out(f"  {p.name:<26} {p.hops:>3} hops  " + (f"test score {p.test.score:.4f}" if p.test else "not scored held out")
            + shortlisted)

    out("[4/4] tables, plot, export of the best pruned member")
    comparisons = {label: compare(points, label, test_fitness.difference_interval) for label in fronts}
    plot = pareto_png(points, cfg.report_tasks, root / "pareto.png")
    pruned = choose_pruned(members["evolved"], prune_hops)
    export: dict[str, Any] = {"max_hops": prune_hops, "route": None}
    if pruned is not None:
        from transformers import AutoModelForCausalLM

        folder = export_checkpoint(pool, pruned, root / "pruned", force=True, verify=True)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        base_model = stitch(pool, heuristics["base"])
        export = {"max_hops": prune_hops, "route": pruned.decode().text(), "hops": len(pruned.decode()),
                  "folder": str(folder),
                  "samples": [{"prompt": p, "exported": sample(model, pool.tokenizer, p, tokens=60),
                               "base": sample(base_model, pool.tokenizer, p, tokens=60)} for p in PROMPTS]}
    else:
        out(f"  no front member has {prune_hops} hops or fewer: nothing exported")

    stamp = datetime.date.today().isoformat()
    md = [f"# Study: {config} ({stamp}, seed {cfg.seed})", "",
          f"Layers: {layers}; heuristics for n = {', '.join(map(str, sizes))}; evolution seeded with the "
          f"heuristics' pruned routes; " + (
              f"each front member (one per hop count from the dev front's fewest to its most) chosen on "
              f"{', '.join(cfg.select_tasks)} among the {top} best by dev at its hop count" if val
              else "fronts chosen on dev")
          + f"; scored on {', '.join(cfg.report_tasks)}, which chooses nothing.", "",
          points_table(points, list(cfg.tasks), cfg.report_tasks), ""]
    for label, rows in comparisons.items():
        md += [f"## {label} front vs the pruning heuristics (held-out score, higher is better)", "",
               comparison_table(rows, label), ""]
    for s in export.get("samples", []):
        md += [f"**{s['prompt']}**", "", f"- exported ({export['hops']} hops): {s['exported']}",
               f"- base: {s['base']}", ""]
    summary = {
        "date": stamp, "config": str(config), "seed": cfg.seed, "sizes": list(sizes), "seed_routes": seeds,
        "select": {"tasks": list(cfg.select_tasks), "top": top},
        "runs": run_info,
        "points": [p.to_dict() for p in points], "comparisons": comparisons, "export": export,
        "plot": str(plot), "seconds_this_call": round(time.perf_counter() - started, 1),
    }
    write_atomic(root / "results.md", "\n".join(md) + "\n")
    write_atomic(root / "results.json", json.dumps(summary, indent=2) + "\n")
    out("\n".join(md))
    out(f"wrote {root / 'results.md'}, {root / 'results.json'}, {plot}"
        + (f", {export['folder']}" if export.get("folder") else ""))
    out("run reports (open in a browser): " + ", ".join(str(RunDir(c.out).report) for c in runs.values()))
    return summary


def _calibration() -> Path:
    from dfs_merge.fitness.score import default_suites_dir

    return default_suites_dir() / "data" / "prose_ppl_dev.jsonl"
