"""What scoring a candidate yields: an `Evaluation` (weighted score, hops, per-task results, error), shared by
fitness, search, export and the applications, and safe to write as JSON."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

WORST_SCORE: float = -1e9
"""The score of a failed candidate: finite (JSON-safe) and below any real weighted score."""
WORST_HOPS: float = 1e9
"""The hops objective of a failed candidate, so that it is dominated on every objective."""
OBJECTIVES = ("score", "hops")
INFRASTRUCTURE = "infrastructure:"
"""How the error of an evaluation lost to a fault of its worker (a dead process, actor or node) begins: such an
evaluation is no score of the candidate; the ledger neither logs it nor remembers it (see `search/ledger.py`)."""


@dataclass
class TaskResult:
    """One task's primary metric for one candidate."""

    task: str
    metric: str
    value: float
    higher_is_better: bool
    docs: int
    seconds: float

    @property
    def signed(self) -> float:
        """The value as it enters the score: negated when lower is better."""
        return self.value if self.higher_is_better else -self.value


@dataclass
class Evaluation:
    """A candidate's score, its hop count, per-task results, and an error line if it failed."""

    score: float
    hops: int
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    # Racing (`search/racing.py`): a stage's per-document results, {task: {"aggregation", "start", "total",
    # "items"}}, kept only until the ledger has stored them; and, for a candidate the race stopped early,
    # {"dropped": stage, "docs": {task: documents scored}, "partial": its score on those documents}.
    per_doc: dict[str, Any] | None = None
    race: dict[str, Any] | None = None

    @classmethod
    def failed(cls, error: str, hops: int = 0, seconds: float = 0.0,
               tasks: dict[str, TaskResult] | None = None) -> Evaluation:
        """The evaluation of a candidate that could not be scored: `WORST_SCORE` and its one-line reason."""
        return cls(WORST_SCORE, hops, dict(tasks or {}), seconds, error=error)

    @classmethod
    def lost(cls, why: str, hops: int = 0) -> Evaluation:
        """A candidate whose worker died under it too often: worst objectives for this generation, no score."""
        return cls.failed(f"{INFRASTRUCTURE} {why}", hops)

    @property
    def ok(self) -> bool:
        """True when the candidate has a full score: it neither failed nor was stopped early by a race."""
        return self.error is None and not self.dropped

    @property
    def dropped(self) -> bool:
        """A race stopped it on part of the documents: it has no full score (and the worst objectives)."""
        return bool(self.race and self.race.get("dropped") is not None)

    @property
    def infrastructure(self) -> bool:
        """The evaluation was lost to an infrastructure fault (not the candidate's own failure)."""
        return self.error is not None and self.error.startswith(INFRASTRUCTURE)

    def objectives(self, names: Sequence[str]) -> tuple[float, ...]:
        """Objective values in the order of `names` (from "score", maximised, and "hops", minimised).

        A failed candidate gets the worst value on every objective (`WORST_SCORE`, `WORST_HOPS`).
        """
        out = []
        for name in names:
            if name == "score":
                out.append(float(self.score) if self.ok else WORST_SCORE)
            elif name == "hops":
                out.append(float(self.hops) if self.ok else WORST_HOPS)
            else:
                raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
        return tuple(out)

    def summary(self) -> dict[str, Any]:
        """The scores a genome file records: score, hops, per-task metric values, the error if any."""
        out: dict[str, Any] = {
            "score": self.score,
            "hops": self.hops,
            "tasks": {name: {"metric": r.metric, "value": r.value, "docs": r.docs} for name, r in self.tasks.items()},
        }
        if self.error:
            out["error"] = self.error
        if self.race:
            out["race"] = self.race
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe mapping (finite floats only); the racing fields only where set."""
        out = {
            "score": float(self.score),
            "hops": int(self.hops),
            "seconds": round(float(self.seconds), 4),
            "error": self.error,
            "tasks": {name: asdict(r) for name, r in self.tasks.items()},
        }
        if self.per_doc is not None:
            out["per_doc"] = self.per_doc
        if self.race is not None:
            out["race"] = self.race
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Evaluation:
        """Inverse of `to_dict`."""
        return cls(
            score=float(d["score"]),
            hops=int(d["hops"]),
            tasks={name: TaskResult(**r) for name, r in (d.get("tasks") or {}).items()},
            seconds=float(d.get("seconds", 0.0)),
            error=d.get("error"),
            per_doc=d.get("per_doc"),
            race=d.get("race"),
        )
