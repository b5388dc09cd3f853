"""Racing: a generation's new candidates scored in stages on nested prefixes of the same dev documents.

Stage s scores every candidate still in the race on the documents of each task between the previous stage's
prefix and its own (`racing.stages`, fractions of each task's documents; `Fitness.window`), so a document of a
candidate is scored once, and every candidate of a stage is scored on the same documents (the comparisons are
paired). After each stage but the last, a candidate stops when it **cannot still matter**:

- *the paired bound*: another candidate r is confidently better than c when the upper confidence bound of
  score(c) - score(r) on all documents is below 0, on the statistic `bound_by` names: with `probability` (the
  default) a task scored by accuracy (or a generation by exact match) counts as the mean probability of the right
  answer (`right_probabilities`: the right choice's share of a multiple-choice item, an answer's likelihood, a
  generated answer's gold likelihood after its context), a per-document value that moves
  smoothly where 0/1 accuracy jumps, so that the few points siblings differ by show on fewer documents; other
  tasks (and guarded ones) count with their own metric, as with `metric`. The estimate is the difference of the
  two prefix scores; its uncertainty comes from the per-document differences d of each task (weighted,
  signed): the documents not yet seen are taken as a sample without replacement from the task's documents, so
  the mean of the unseen differences lies within t x sd(d) x sqrt((1 - n/N) / n) of the seen mean (Student's t
  with n - 1 degrees of freedom for the fewest documents seen; the tasks' terms added in variance). `confidence`
  holds for all of a candidate's decisions together (`Race.level`): the candidate best on all documents by the
  statistic stops only when `cut` others are wrongly called better at some stage, so each comparison's level
  is (1 - confidence) x cut / (others x deciding stages) (Markov's inequality on the count of wrong calls, a
  union over stages), and that happens with probability at most 1 - confidence. A task seen on fewer than 2
  documents proves nothing and keeps c in.
- *the cut* (per algorithm, `Algorithm.race_cut`): c stops once at least `cut` others are confidently better
  (with hops in the objectives: confidently better *and* no more hops, i.e. dominating it). `ga`: half the
  population (a candidate below the population's median seldom wins a tournament); `nsga2`: the population size
  (dominated by that many, it cannot survive NSGA-II's selection nor be on the front); `cmaes`: mu (only the
  best mu enter the update); `random`: 1 (only the best, or the front, matters). The others are this stage's
  candidates and, for `ga` and `nsga2`, the current population (scored on every document earlier).
- `keep` < 1 also stops all but the best `keep` fraction of a stage's candidates (rounded, at least 1), with no
  guarantee: the EvoPress-style truncation. Best means the highest prefix score; with hops in the objectives,
  first the largest gain over the front (`front_gain`: how far the prefix score is above the best reference
  with no more hops, on the same documents), so a candidate that would improve the front at any hop count
  goes before one that only scores high because it keeps more layers.
  With `keep_by: probability` (the default) that prefix score counts a task scored by accuracy as the mean
  probability of the right answer (`right_probabilities`): on the 5 items of a first stage accuracy moves in
  steps of 0.2, more than most siblings differ by on all documents, while the probability of the same answers
  moves smoothly.
- The bound's guarantee is about its statistic: where the probability of the right answer and accuracy rank
  two candidates differently (one confidently wrong where the other spreads its probability), the candidate
  best by accuracy may stop; `bound_by: metric` puts the guarantee on the tasks' own metrics.
- The incumbents never stop: generation 0's seeds (each source unchanged, `seed_routes`) are always scored on
  every document.

A stopped candidate has no full score: its Evaluation has `race.dropped` (the stage), the documents it got and
its prefix score, and the worst objectives, so selection never compares it with a full score; every candidate
that finishes the race has a full score, lm-eval's aggregation over all its documents. Each stage's
per-document results are appended to `docs.jsonl` as they arrive: a resumed run replays the decisions from
them (the same choices) and scores no document twice.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dfs_merge.config import RacingConfig
from dfs_merge.evaluation import WORST_SCORE, Evaluation, TaskResult
from dfs_merge.fitness.score import aggregate, prefix_size, weighted_score
from dfs_merge.genome_files import CandidateGenome
from dfs_merge.search.backends import Evaluator
from dfs_merge.search.rundir import RunDir

AUTO_FIRST_STAGE = 20
"""`racing: auto` races (at every default) when each dev task has at least this many documents in the first stage."""


def auto_racing(sizes: Mapping[str, int] | None) -> tuple[RacingConfig | None, str]:
    """What `racing: auto` (the default) means for dev tasks of these sizes (documents per task; None: unknown),
    and why, in a line for the log.

    The rule: race at the defaults when every task holds at least `AUTO_FIRST_STAGE` documents in the first stage
    (a fifth: 100 documents in all), else do not. The paired bound can call a difference only when it is larger
    than about t / sqrt(n) standard deviations of the per-document differences (Student's t at the comparison's
    level, `Race.level`, n - 1 degrees of freedom): for a GA of 10 about 0.5 at 20 documents, against 1.0-1.3 at 6,
    more than siblings of a search differ by; below that a race would score each candidate in stages and stop none."""
    cfg = RacingConfig()
    if not sizes:
        return None, "racing off (racing: auto): the dev tasks' document counts are unknown"
    first = {name: prefix_size(cfg.stages[0], n) for name, n in sizes.items()}
    small = sorted((k, name) for name, k in first.items() if k < AUTO_FIRST_STAGE)
    if small:
        k, name = small[0]
        return None, (f"racing off (racing: auto): {name} has {sizes[name]} dev documents, {k} in the first stage; "
                      f"racing needs {AUTO_FIRST_STAGE} there (set racing: {{}} to race anyway)")
    counts = ", ".join(f"{name} {n}" for name, n in sorted(sizes.items()))
    return cfg, (f"racing on (racing: auto): every dev task has at least {AUTO_FIRST_STAGE} documents in the first "
                 f"stage ({counts}; set racing: off to score every candidate on every document)")


@dataclass
class Scored:
    """What the race knows of one candidate: per task its aggregation, its document count, its items by document;
    its hops, the metric of each task, the seconds spent and the stages done."""

    hops: int = 0
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, tuple[str, bool]] = field(default_factory=dict)
    seconds: float = 0.0
    stages: set[int] = field(default_factory=set)

    def add(self, stage: int, ev: Evaluation) -> None:
        """Take one stage's per-document results."""
        self.hops = ev.hops
        self.seconds += ev.seconds
        self.stages.add(stage)
        for name, r in ev.tasks.items():
            self.metrics[name] = (r.metric, r.higher_is_better)
        for name, d in (ev.per_doc or {}).items():
            t = self.tasks.setdefault(name, {"aggregation": d["aggregation"], "total": d["total"], "items": {},
                                             "probability": {}})
            for i, item in enumerate(d["items"], start=d["start"]):
                t["items"][i] = item
            for i, p in enumerate(d.get("probability") or (), start=d["start"]):
                t["probability"][i] = p

    def prefix(self, name: str, n: int) -> list[Any] | None:
        """The items of task `name`'s first `n` documents, or None when some are missing."""
        items = self.tasks.get(name, {}).get("items", {})
        if any(i not in items for i in range(n)):
            return None
        return [items[i] for i in range(n)]


@dataclass
class Prefix:
    """A candidate on the first documents of each task: its score there, and per task the values of those documents
    (each document's own metric, signed and weighted) and the task's document count."""

    score: float
    values: dict[str, list[float]]
    totals: dict[str, int]
    rank: float  # what `keep` ranks by (`keep_by`)


@functools.cache
def student_quantile(p: float, df: int) -> float:
    """Student's t quantile `p` at `df` degrees of freedom (the same few levels and counts recur every stage)."""
    from scipy.stats import t as student

    return float(student.ppf(p, df))


def front_gain(rank: float, below: Sequence[float]) -> float:
    """What a candidate would add to a [score, hops] front, on the documents seen: how far its prefix score is above
    the best of `below` (the references with no more hops, on the same documents); infinite when none has so few."""
    return math.inf if not below else rank - max(below)


class Race:
    """One run's racing: the stages, the per-document store (`docs.jsonl`) and the stopping rule."""

    def __init__(self, cfg: RacingConfig, rundir: RunDir, weights: Mapping[str, float], guards: Mapping[str, float],
                 cut: int, dominance: bool, log: Callable[[str], object] = print):
        self.cfg = cfg
        self.rundir = rundir
        self.weights = dict(weights)
        self.guards = dict(guards)
        self.cut = max(1, int(cut))
        self.dominance = dominance
        self.log = log
        self.known: dict[str, Scored] = {}
        self.documents = 0  # documents scored by this process (the forwards racing is there to save)

    @property
    def windows(self) -> list[tuple[float, float]]:
        """Each stage's window of documents, as fractions (from, to)."""
        edges = [0.0, *self.cfg.stages]
        return list(zip(edges, edges[1:], strict=False))

    def recover(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Take the per-document results a killed run logged."""
        for rec in records:
            if "key" in rec and "stage" in rec and "evaluation" in rec:
                self.known.setdefault(rec["key"], Scored()).add(int(rec["stage"]), Evaluation.from_dict(rec["evaluation"]))

    # ---- the race of one generation --------------------------------------------------------
    def run(self, genomes: Mapping[str, CandidateGenome], gen: int, evaluator: Evaluator, finished: Sequence[str] = (),
            references: Sequence[str] = (), incumbents: Sequence[str] = ()) -> Iterator[tuple[str, Evaluation]]:
        """Race `genomes` (key -> genome, to be evaluated) beside `finished` (this generation's candidates whose
        result a killed run already logged: they race again from their stored documents, so the decisions are
        the same) against `references` (fully scored earlier candidates); yield each evaluated key's
        Evaluation: full, stopped, failed or lost. `incumbents` never stop."""
        alive = [k for k in list(finished) + list(genomes) if k in genomes or k in self.known]
        refs = [k for k in references if k not in alive and k in self.known]
        windows = self.windows
        for s, window in enumerate(windows):
            todo = [k for k in alive if k in genomes and s not in self.known.get(k, Scored()).stages]
            docs_before = self.documents
            for k, ev in evaluator.submit([genomes[k] for k in todo], docs=window):
                if not ev.ok:  # failed or lost: out of the race, reported as it is
                    alive.remove(k)
                    yield k, replace(ev, per_doc=None)
                    continue
                self._store(k, gen, s, ev)
            # a finished candidate without this stage failed in it before the kill: it left the race here
            alive = [k for k in alive if k in genomes or s in self.known[k].stages]
            entered = len(alive)
            if s < len(windows) - 1:
                stopped = self._stops(alive, refs, window[1], set(incumbents))
                for k, why in stopped.items():
                    alive.remove(k)
                    if k in genomes:
                        yield k, self._stopped(k, s, window[1], why)
            self.log(f"gen {gen} race stage {s + 1}/{len(windows)} (documents to {window[1]:.0%}): {entered} in, "
                     f"{len(alive)} on, {self.documents - docs_before} documents scored")
        for k in alive:
            if k in genomes:
                yield k, self._full(k)

    def _store(self, key: str, gen: int, stage: int, ev: Evaluation) -> None:
        self.rundir.append_docs({"generation": gen, "key": key, "stage": stage, "evaluation": ev.to_dict()})
        self.known.setdefault(key, Scored()).add(stage, ev)
        self.documents += sum(len(d["items"]) for d in (ev.per_doc or {}).values())

    # ---- the stopping rule ---------------------------------------------------------------
    def _sizes(self, key: str, upto: float) -> dict[str, int]:
        """Documents per task in the prefix up to the fraction `upto` (the same windows as `Fitness.window`)."""
        return {name: prefix_size(upto, t["total"]) for name, t in self.known[key].tasks.items()}

    def _prefix_results(self, key: str, sizes: Mapping[str, int]) -> dict[str, TaskResult] | None:
        sc = self.known[key]
        out = {}
        for name, n in sizes.items():
            items = sc.prefix(name, n)
            if items is None:
                return None
            metric, hib = sc.metrics[name]
            out[name] = TaskResult(name, metric, aggregate(sc.tasks[name]["aggregation"], items), hib, n, 0.0)
        return out

    def _probabilities(self, key: str, sizes: Mapping[str, int]) -> dict[str, list[float]]:
        """Per task scored by accuracy and not guarded, the probability of the right answer on each of its first
        documents (`right_probabilities`), where every one of them has it."""
        tasks = self.known[key].tasks
        out = {}
        for name, n in sizes.items():
            probs = tasks[name]["probability"]
            if n and name not in self.guards and all(i in probs for i in range(n)):
                out[name] = [probs[i] for i in range(n)]
        return out

    def _prefix(self, key: str, upto: float, probable: Mapping[str, list[float]]) -> Prefix | None:
        """The candidate on the first `upto` of each task's documents, the tasks of `probable` by their
        probabilities of the right answer there; None when it has not been scored on them."""
        sc = self.known[key]
        sizes = self._sizes(key, upto)
        results = self._prefix_results(key, sizes)
        if results is None:
            return None
        as_probability = {**results, **{name: replace(results[name], value=math.fsum(p) / len(p), higher_is_better=True)
                                        for name, p in probable.items()}}
        by_probability = self.cfg.bound_by == "probability"
        values = {}
        for name, n in sizes.items():
            w = self.weights.get(name, 1.0)
            if by_probability and name in probable:
                values[name] = [w * p for p in probable[name]]
            else:
                sign = 1.0 if sc.metrics[name][1] else -1.0
                values[name] = [w * sign * aggregate(sc.tasks[name]["aggregation"], [item])
                                for item in sc.prefix(name, n) or []]
        score = weighted_score(as_probability if by_probability else results, self.weights, self.guards)
        rank = weighted_score(as_probability if self.cfg.keep_by == "probability" else results, self.weights,
                              self.guards)
        return Prefix(score, values, {name: t["total"] for name, t in sc.tasks.items()}, rank)

    @staticmethod
    def better(r: Prefix | None, c: Prefix | None, alpha: float) -> bool:
        """Whether `r` is confidently better than `c` on all documents, from their prefixes: the upper bound (at
        level 1 - `alpha`) of score(c) - score(r) is below 0."""
        if r is None or c is None:
            return False
        diff = c.score - r.score
        var, fewest = 0.0, None
        for name, vc in c.values.items():
            n, total = len(vc), c.totals[name]
            if n >= total:
                continue
            if n < 2:
                return False
            d = [a - b for a, b in zip(vc, r.values[name], strict=True)]
            var += statistics.variance(d) * (1 - n / total) / n
            fewest = n if fewest is None else min(fewest, n)
        if fewest is None:
            return diff < 0
        return diff + student_quantile(1 - alpha, fewest - 1) * math.sqrt(var) < 0

    def level(self, compared: int) -> float:
        """Each paired comparison's level: the best candidate stops only when at least `cut` of the `compared` others
        are wrongly called better at some stage; the expected number of wrong calls at a stage is at most
        compared x level, so by Markov's inequality and a union over the deciding stages that happens with
        probability at most compared x level x stages / cut, which this level sets to 1 - confidence."""
        compared = max(1, compared)
        return (1 - self.cfg.confidence) * min(self.cut, compared) / (compared * max(1, len(self.cfg.stages) - 1))

    def _stops(self, alive: list[str], refs: list[str], upto: float, incumbents: set[str]) -> dict[str, str]:
        """The candidates that stop after the stage ending at `upto`, with why."""
        out: dict[str, str] = {}
        racing = [c for c in alive if c not in incumbents]
        others = alive + refs
        alpha = self.level(len(others) - 1)
        # a task counts by its probability only where every candidate compared has it (a run resumed from records
        # made before a task logged it compares by the metric), so that paired values are of one statistic
        probable = {k: self._probabilities(k, self._sizes(k, upto)) for k in others}
        common = set.intersection(*(set(p) for p in probable.values())) if others else set()
        prefix = {k: self._prefix(k, upto, {name: p for name, p in probable[k].items() if name in common})
                  for k in others}  # once per candidate, not once per pair
        for c in racing:
            beaten = sum(1 for r in others if r != c and (not self.dominance or self.known[r].hops <= self.known[c].hops)
                         and self.better(prefix[r], prefix[c], alpha))
            if beaten >= self.cut:
                out[c] = f"{beaten} confidently better"
        if self.cfg.keep < 1:
            rest = [c for c in racing if c not in out]
            room = max(1, round(self.cfg.keep * len(alive))) - (len(alive) - len(racing))
            if len(rest) > max(0, room):
                rank = {k: p.rank if (p := prefix[k]) is not None else WORST_SCORE for k in others}
                hops = {k: self.known[k].hops for k in others}
                gain = {k: front_gain(rank[k], [rank[r] for r in refs if hops[r] <= hops[k]]) if self.dominance
                        else 0.0 for k in rest}
                ranked = sorted(rest, key=lambda k: (-gain[k], -rank[k], k))
                out.update(dict.fromkeys(ranked[max(0, room):], f"below the best {self.cfg.keep:.0%}"))
        return out

    # ---- evaluations ---------------------------------------------------------------------
    def _stopped(self, key: str, stage: int, upto: float, why: str) -> Evaluation:
        sizes = self._sizes(key, upto)
        results = self._prefix_results(key, sizes) or {}
        partial = weighted_score(results, self.weights, self.guards)
        sc = self.known[key]
        return Evaluation(WORST_SCORE, sc.hops, results, sc.seconds,
                          race={"dropped": stage, "docs": sizes, "partial": partial, "why": why})

    def _full(self, key: str) -> Evaluation:
        sc = self.known[key]
        sizes = {name: t["total"] for name, t in sc.tasks.items()}
        results = self._prefix_results(key, sizes)
        if results is None:  # cannot happen: the last stage scores every remaining document
            return Evaluation.failed("racing: documents missing after the last stage", sc.hops)
        return Evaluation(weighted_score(results, self.weights, self.guards), sc.hops, results, sc.seconds,
                          race={"docs": sizes})
