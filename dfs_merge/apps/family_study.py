"""The paper's claim on a real model: J and M (SmolLM2 LoRA specialists, `specialists.py`) merged by evolution.

The target is written as MGSM-JA writes its problems: J word problems with their operands in digits (the
tokens M learned arithmetic on), so that M partly solves it and J reads its language, as the paper's parents
did. `python -m dfs_merge.apps.family_study [OUT]` (what `make study-family` runs) first scores the parents and
their naive merge on the dev and validation splits (the preconditions), then runs (or resumes) each search of
`SEARCHES` in order: the parameter-space recipe (task arithmetic per layer group, CMA-ES), the data-flow routes
over J and M, and the hybrid (routes over the evolved recipe and the parents). Every row is then scored on the
held-out test split: the digit target with its additions and subtractions apart and a paired bootstrap
interval against each parent, the number-word variant and the J language-model loss, beside the majority
answer and the blind baselines (always add, always subtract the two operands). Each row is logged in
`OUT/rows.jsonl` as it is scored (an interrupted study resumes); the tables go to `OUT/table.md` and
`OUT/table.json`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfs_merge import bundled
from dfs_merge.atomic import write_atomic
from dfs_merge.candidate import CandidateScorer
from dfs_merge.config import load_config
from dfs_merge.errors import ConfigError
from dfs_merge.evaluation import Evaluation
from dfs_merge.fitness.score import Fitness
from dfs_merge.models.metadata import fingerprint
from dfs_merge.models.sources import SourcePool
from dfs_merge.route import Hop, Route
from dfs_merge.search.evolution import run_evolution

GENOMES = bundled.genomes_dir()
SEARCHES = {  # name -> (row, config), run in this order (the hybrid's first source is the PS search's best recipe)
    "ps": ("evolved PS (task arithmetic per layer group, CMA-ES)", GENOMES / "family-digits-ps.yaml"),
    "dfs": ("evolved DFS (routes over J and M, scales)", GENOMES / "family-digits-dfs.yaml"),
    "hybrid": ("evolved hybrid: DFS over (evolved PS, J, M)", GENOMES / "family-digits-hybrid.yaml"),
}
BEST = GENOMES / "family-best.yaml"
BASE = "smollm2-135m-instruct"
SPECIALISTS = {name: f"{BASE}+{bundled.models_dir() / 'family' / name.lower()}" for name in ("J", "M")}
LAYERS = 30
TARGET = {"dev": "family_arith_jd_dev", "val": "family_arith_jd_val", "test": "family_arith_jd_test"}
OTHERS = {  # split -> {task: (documents, metric)}: what each split reports beside the target
    "dev": {"zoo_lm_j_dev": (20, "bits_per_byte")},
    "val": {"zoo_lm_j_val": (20, "bits_per_byte")},
    "test": {"family_arith_j_test": (150, None), "zoo_lm_j_test": (100, "bits_per_byte")},
}
TARGET_LIMIT = {"dev": 300, "val": None, "test": None}  # the dev problems the searches score (their limit)
COLUMNS = {  # column -> (task prefix, scale): accuracies in %, bits per byte as they are
    "J words acc.": ("family_arith_j_", 100.0), "J loss (bits/byte)": ("zoo_lm_j_", 1.0),
}


@dataclass
class Candidate:
    """One row's model: a route or genome over a pool, or a model object (the adapters merged by PEFT)."""

    label: str
    pool: SourcePool
    route: Route | None = None
    genome: Any = None
    model: Any = None
    text: str = ""
    scorer: CandidateScorer | None = field(default=None, repr=False)

    @property
    def memo_key(self) -> str:
        """What a memoised row must match: the text, and for a genome its sources' content fingerprints (a hybrid's
        route reads the same over another parameter-space merge)."""
        if self.genome is None:
            return self.text
        return self.text + " | " + ", ".join(str(fingerprint(p)) for p in self.genome.sources)

    @property
    def hops(self) -> int:
        if self.route is not None:
            return len(self.route)
        return len(self.genome.decode()) if self.genome is not None else LAYERS

    def build(self) -> Any:
        """The model itself (a stitched route, a recipe merged in a resident model, or the model object)."""
        if self.route is not None:
            from dfs_merge.stitch import stitch

            return stitch(self.pool, self.route)
        if self.genome is not None:
            from dfs_merge.merging.blend import recipe_model
            from dfs_merge.merging.recipe import Recipe
            from dfs_merge.stitch import stitch

            if isinstance(self.genome, Recipe):
                return recipe_model(self.genome, self.pool)
            return stitch(self.pool, self.genome.check())
        return self.model

    def score(self, fitness: Fitness, docs: tuple[float, float] | None = None) -> Evaluation:
        """This model on `fitness`'s tasks (with per-document results on the window `docs`); a recipe is merged
        once, in a resident model its later scores share."""
        scorer = self.scorer = (CandidateScorer(self.pool, fitness) if self.scorer is None
                                else self.scorer.with_fitness(fitness))
        if self.route is not None:
            return scorer(self.route, docs)
        if self.genome is not None:
            return scorer.genome(self.genome, docs)
        return fitness.score(self.model, self.pool.tokenizer, hops=LAYERS, docs=docs)


@dataclass
class Row:
    """One row of a table: the target's evaluation (per document) and the other tasks'."""

    candidate: Candidate
    target: Evaluation
    others: Evaluation


def problems(split: str) -> list[dict[str, Any]]:
    """The digit target's problems of one split, in task order (question, answer, op, operands a and b)."""
    path = bundled.suites_dir() / "data" / f"{TARGET[split]}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def blind_baselines(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy (%) of answers that read no J: the majority answer, always a + b, always a - b."""
    answers = [int(r["answer"]) for r in rows]
    n = len(rows)
    return {"majority answer": 100.0 * max(answers.count(a) for a in set(answers)) / n,
            "always add the two operands": 100.0 * sum(r["a"] + r["b"] == int(r["answer"]) for r in rows) / n,
            "always subtract them": 100.0 * sum(r["a"] - r["b"] == int(r["answer"]) for r in rows) / n}


def by_operation(ev: Evaluation, task: str, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy (%) on the additions and on the subtractions apart, from the per-document results."""
    items = [float(x) for x in ev.per_doc[task]["items"]] if ev.ok and ev.per_doc else []
    out = {}
    for op in ("add", "sub"):
        got = [x for x, r in zip(items, rows, strict=True) if r["op"] == op]
        out[op] = 100.0 * sum(got) / len(got) if got else float("nan")
    return out


def parents(pool: SourcePool) -> list[Candidate]:
    """Instruct, J, M and the naive merges, over the pool (J, M, plain base)."""
    from dfs_merge.models.adapters import merged_model, split_source

    def whole(source: int) -> Route:
        return Route(tuple(Hop(source, i) for i in range(LAYERS)))

    # base + dJ + dM: the adapters touch disjoint layers, so this is also the layer swap (J's outer blocks
    # around M's middle block); PEFT's merge, one adapter after the other.
    swap = pool.sources[2].model
    for source in pool.sources[:2]:
        swap = merged_model(swap, split_source(source.path)[1])
    return [Candidate("J (J-language specialist)", pool, whole(0)), Candidate("M (arithmetic specialist)", pool, whole(1)),
            Candidate("task arithmetic base + dJ + dM (= the layer swap)", pool, model=swap)]


def evolved(log: Callable[[str], Any], device: str, dtype: str, names: Sequence[str] = tuple(SEARCHES)) -> list[Candidate]:
    """Run or resume the searches `names` of `SEARCHES` in order; each one's chosen genome as a row."""
    out = []
    for label, path in (SEARCHES[n] for n in SEARCHES if n in names):
        cfg = load_config(path)  # after the searches before it: the hybrid's recipe source exists now
        log(f"[search] {label} -> {cfg.out}")
        # report=True: the final choice on validation (select_tasks); the configs name no report tasks
        result = run_evolution(cfg, resume=(Path(cfg.out) / "config.yaml").exists(), report=True, log=log)
        pool = SourcePool.load(list(result.best.sources), device, dtype)
        out.append(Candidate(label, pool, genome=result.best, text=result.best.text()))
    return out


def score_rows(candidates: Sequence[Candidate], split: str, log: Callable[[str], Any],
               others: dict[str, tuple[int, str | None]] | None = None, memo: Path | None = None,
               limit: int | None = None) -> list[Row]:
    """Each candidate on one split: the target (its first `limit` problems, all by default) with per-document
    results, and the other tasks (`OTHERS[split]` unless given: task -> (documents, metric)). With `memo` (a JSONL file), each row is
    appended there as it is scored and a row already there (same label, split, tasks and text) is reused, so
    that an interrupted study resumes."""
    tasks = OTHERS[split] if others is None else others
    target = Fitness({TARGET[split]: 1.0}, limit=limit, batch_size=16, max_length=256)
    others = Fitness(dict.fromkeys(tasks, 1.0), limit={t: n for t, (n, _) in tasks.items()},
                     metrics={t: m for t, (_, m) in tasks.items() if m}, batch_size=16, max_length=256)
    done = {}
    if memo is not None and memo.is_file():
        for line in memo.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            done[(entry["label"], entry["split"], entry.get("key", entry["text"]))] = entry
    rows = []
    for c in candidates:
        t0 = time.perf_counter()
        entry = done.get((c.label, split, c.memo_key))
        if entry is not None and Evaluation.from_dict(entry["others"]).tasks.keys() == set(tasks):
            rows.append(Row(c, Evaluation.from_dict(entry["target"]), Evaluation.from_dict(entry["others"])))
            continue
        rows.append(Row(c, c.score(target, docs=(0.0, 1.0)), c.score(others)))
        if memo is not None and rows[-1].target.ok and rows[-1].others.ok:
            with memo.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"label": c.label, "split": split, "text": c.text, "key": c.memo_key,
                                     "target": rows[-1].target.to_dict(), "others": rows[-1].others.to_dict()}) + "\n")
        log(f"[{split}] {c.label}: {rows[-1].target.tasks.get(TARGET[split])} ({time.perf_counter() - t0:.0f} s)")
    return rows


def table(rows: Sequence[Row], split: str, parent_labels: Sequence[str] = (), limit: int | None = None) -> str:
    """A markdown table: the digit target (all, additions, subtractions; its first `limit` problems), its
    paired 95% intervals against each parent (in points), the other tasks, hops and the route or recipe;
    the blind baselines first."""
    task = TARGET[split]
    data = problems(split)[:limit]
    target = Fitness({task: 1.0}, limit=limit, batch_size=16, max_length=256) if parent_labels else None
    refs = [r for r in rows if r.candidate.label in parent_labels]
    columns = {name: prefix_scale for name, prefix_scale in COLUMNS.items()  # only those some row has
               if any(t.startswith(prefix_scale[0]) for row in rows for t in row.others.tasks)}
    head = ["model", "J digits acc.", "adds", "subs", *(f"vs {r.candidate.label.split(' ')[0]} (95%)" for r in refs),
            *columns, "hops", "route / recipe"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    blank = [""] * (len(head) - 2)
    for name, value in blind_baselines(data).items():
        lines.append("| " + " | ".join([name, f"{value:.1f}", *blank]) + " |")
    for row in rows:
        ev = row.target
        acc = f"{100 * ev.tasks[task].value:.1f}" if ev.ok else "failed"
        ops = by_operation(ev, task, data)
        cells = [row.candidate.label, acc, f"{ops['add']:.1f}", f"{ops['sub']:.1f}"]
        for ref in refs:
            iv = target.difference_interval(ev, ref.target) if target is not None and ref is not row else None
            cells.append(f"[{100 * iv[0]:+.1f}, {100 * iv[1]:+.1f}]" if iv else "")
        for prefix, factor in columns.values():
            r = next((r for name, r in row.others.tasks.items() if name.startswith(prefix)), None)
            cells.append("" if r is None else f"{r.value * factor:.1f}" if factor != 1.0 else f"{r.value:.4f}")
        text = row.candidate.text
        cells += [str(row.candidate.hops), f"`{text}`" if text else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(rows: Sequence[Row], split: str, limit: int | None = None) -> dict[str, Any]:
    """The rows of one split as JSON: each evaluation, its accuracy by operation, hops and text."""
    data = problems(split)[:limit]
    return {r.candidate.label: {"target": r.target.to_dict(), "others": r.others.to_dict(), "hops": r.candidate.hops,
                                "by_operation": by_operation(r.target, TARGET[split], data), "text": r.candidate.text}
            for r in rows}


def run_family_study(out: str | Path = "runs/family-digits", log: Callable[[str], Any] = print,
                     preconditions: bool = True, searches: Sequence[str] = tuple(SEARCHES), test: bool = True,
                     device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """Preconditions (dev, val), the searches `searches` (names of `SEARCHES`), and the test table: written to
    `out` and printed."""
    unknown = sorted(set(searches) - set(SEARCHES))
    if unknown:
        raise ConfigError(f"--searches: {unknown[0]!r} is not a search here; known: {', '.join(SEARCHES)}")
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    memo = out / "rows.jsonl"
    pool = SourcePool.load([SPECIALISTS["J"], SPECIALISTS["M"], BASE], device, dtype)  # source 2: the plain base
    naive = parents(pool)
    report: dict[str, Any] = {"seconds": {}}
    text = []
    for split in ("dev", "val") if preconditions else ():
        rows = score_rows(naive, split, log, memo=memo, limit=TARGET_LIMIT[split])
        text += [f"## Preconditions: {split} split", "", table(rows, split, limit=TARGET_LIMIT[split]), ""]
        report[split] = to_json(rows, split, TARGET_LIMIT[split])
    found = evolved(log, device, dtype, searches) if searches else []
    if test:
        rows = score_rows([*naive, *found], "test", log, memo=memo)
        text += ["## Held-out test split", "",
                 table(rows, "test", ("J (J-language specialist)", "M (arithmetic specialist)"))]
        report["test"] = to_json(rows, "test")
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_atomic(out / "table.md", "\n".join(text) + "\n")
    write_atomic(out / "table.json", json.dumps(report, indent=1))
    log("\n".join(text))
    log(f"family study took {report['seconds']:.0f} s; table in {out / 'table.md'}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dfs_merge.apps.family_study [OUT] [--no-preconditions] [--no-searches | --searches=ps,dfs,hybrid]
    [--no-test]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    from dfs_merge.errors import DfsMergeError

    flags = {a for a in args if a.startswith("--") and "=" not in a}
    chosen = [a.split("=", 1)[1] for a in args if a.startswith("--searches=")]
    rest = [a for a in args if not a.startswith("--")]
    names = () if "--no-searches" in flags else tuple(chosen[-1].split(",")) if chosen else tuple(SEARCHES)
    try:
        run_family_study(rest[0] if rest else "runs/family-digits", preconditions="--no-preconditions" not in flags,
                         searches=names, test="--no-test" not in flags)
    except DfsMergeError as err:
        print(f"family study: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
