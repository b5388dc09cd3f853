"""The evaluation ledger: every evaluation of a run by genome key, appended to `evals.jsonl` as it arrives.

A key already in the ledger is never evaluated again. On resume the ledger is rebuilt from the log;
evaluations logged after the last checkpoint are "unclaimed" until the generation being redone asks
for them again, so they are counted once, in that generation.

An evaluation lost to an infrastructure fault (`Evaluation.infrastructure`: its worker, actor or node kept dying,
see `backends.py`) is no score: it is not written to evals.jsonl, not counted, and not known, so the algorithm
may ask for the genome again and a resumed run evaluates it again. For the generation that lost it, the genome
has the worst objectives (as a failed one); it is held in `lost` (and in the checkpoint, for the members of the
population that refer to it) until an evaluation of it succeeds.

Every number the log holds is finite (`finite`): an evaluation with a NaN or infinite metric (a broken model, a
merge that overflowed) is logged as a failed evaluation that says which, and the run goes on.

With racing (`race`, see `racing.py`) the new keys of a generation are raced instead of evaluated one by one; what
the race yields (full scores, and candidates stopped early with the worst objectives) is logged the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from dfs_merge.evaluation import Evaluation
from dfs_merge.genome_files import CandidateGenome, genome_to_dict
from dfs_merge.search.backends import Evaluator
from dfs_merge.search.rundir import RunDir
from dfs_merge.search.tracking import Tracking

if TYPE_CHECKING:
    from dfs_merge.search.racing import Race


def non_finite(value: Any, where: str = "") -> tuple[str, float] | None:
    """The first NaN or infinite number in a JSON-like value and where it is (`tasks.x.value`); None if none."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where or "the value", value)
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        found = non_finite(v, f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


def finite(ev: Evaluation) -> Evaluation:
    """`ev`, or where a number in it is NaN or infinite, a failed evaluation saying which (its finite task
    results kept): what the log and the checkpoint write is always valid JSON."""
    found = non_finite(ev.to_dict())
    if found is None:
        return ev
    tasks = {n: r for n, r in ev.tasks.items() if non_finite(asdict(r)) is None}
    seconds = ev.seconds if math.isfinite(ev.seconds) else 0.0
    return Evaluation.failed(ev.error or f"{found[0]} is {found[1]}, not a finite number", ev.hops, seconds, tasks)


class Ledger:
    """Memo of evaluations, their log records and the run's counters."""

    def __init__(self, rundir: RunDir, evaluator: Evaluator, objectives: Sequence[str], progress: bool = True,
                 tracking: Tracking | None = None):
        self.rundir = rundir
        self.tracking = tracking or Tracking()  # told of each new evaluation (not cache hits, not recovered ones)
        self.evaluator = evaluator
        self.objectives = list(objectives)
        self.progress = progress
        self.memo: dict[str, Evaluation] = {}
        self.unclaimed: set[str] = set()  # in evals.jsonl from a generation the checkpoint does not cover
        self.lost: dict[str, Evaluation] = {}  # lost to infrastructure faults: worst objectives, not known
        self.lost_now: list[str] = []  # the keys the last `evaluate` lost
        self.counters = {"evaluations": 0, "cache_hits": 0, "errors": 0}
        self.race: Race | None = None  # racing (`racing.py`); None: every candidate on every document

    def __getitem__(self, key: str) -> Evaluation:
        return self.memo[key] if key in self.memo else self.lost[key]

    def __contains__(self, key: str) -> bool:
        return key in self.memo or key in self.lost

    def known(self, key: str) -> bool:
        """Evaluated earlier in this run (entries recovered for the generation being redone do not count)."""
        return key in self.memo and key not in self.unclaimed

    def objectives_of(self, key: str) -> tuple[float, ...]:
        """The objective values of a logged evaluation."""
        return self[key].objectives(self.objectives)

    def recover(self, records: list[dict[str, Any]], done_generation: int) -> int:
        """Take the logged evaluations; those of generations after `done_generation` stay unclaimed.
        Returns how many are unclaimed."""
        for rec in records:
            key = rec.get("key")
            if not key or key in self.memo or "evaluation" not in rec:
                continue
            self.memo[key] = Evaluation.from_dict(rec["evaluation"])
            if rec.get("generation", 0) > done_generation:
                self.unclaimed.add(key)
        return len(self.unclaimed)

    def evaluate(self, individuals: Sequence[Any], gen: int, total: int, references: Sequence[str] = (),
                 incumbents: Sequence[str] = ()) -> None:
        """Give each individual (with `genome` and `key`) its fitness; only keys never seen are evaluated (raced
        against `references`, fully scored earlier candidates, when racing; `incumbents` run the whole race)."""
        todo: dict[str, CandidateGenome] = {}
        claimed: list[str] = []
        self.lost_now = []
        for ind in individuals:
            k = ind.key
            if k in self.unclaimed:  # evaluated before the run was killed: counts as this generation's
                self.unclaimed.discard(k)
                claimed.append(k)
                self._count(self.memo[k])
            elif k in self.memo or k in todo:
                self.counters["cache_hits"] += 1
            else:
                todo[k] = ind.genome
        bar = tqdm(total=len(todo), desc=f"gen {gen}/{total}", unit="eval", leave=False,
                   disable=not self.progress or not todo, dynamic_ncols=True)
        try:
            results = (self.evaluator.submit(list(todo.values())) if self.race is None else
                       self.race.run(todo, gen, self.evaluator, finished=claimed, references=references,
                                     incumbents=incumbents))
            for k, ev in results:
                if ev.infrastructure:  # not a score: neither logged nor known (see the module's docstring)
                    self.lost[k] = ev
                    self.lost_now.append(k)
                    bar.update()
                    continue
                self.lost.pop(k, None)
                ev = finite(ev)  # a NaN metric is the candidate's failure, never the log writer's
                self.memo[k] = ev
                self._count(ev)
                record = self._record(gen, k, todo[k], ev)
                self.rundir.append_eval(record)
                self.tracking.evaluation(gen, k, record["genome"], ev, self.counters["evaluations"])
                bar.update()
        finally:
            bar.close()
        for ind in individuals:
            ind.fitness.values = self.objectives_of(ind.key)

    def _count(self, ev: Evaluation) -> None:
        self.counters["evaluations"] += 1
        self.counters["errors"] += ev.error is not None
        if self.race is not None:  # the documents each candidate got, and how many a race stopped early
            self.counters["documents"] = self.counters.get("documents", 0) + sum(
                r.docs for r in ev.tasks.values())
            self.counters["stopped"] = self.counters.get("stopped", 0) + ev.dropped

    def _record(self, gen: int, key: str, g: CandidateGenome, ev: Evaluation) -> dict[str, Any]:
        return {
            "generation": gen,
            "key": key,
            "objectives": list(ev.objectives(self.objectives)),
            "score": ev.score,
            "hops": ev.hops,
            "tasks": {name: r.value for name, r in ev.tasks.items()},
            "seconds": round(ev.seconds, 4),
            "error": ev.error,
            "genome": genome_to_dict(g),
            "evaluation": ev.to_dict(),
        }
