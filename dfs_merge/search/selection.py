"""The final choice on a validation split the search never saw.

A search that keeps the best of many candidates by their dev score keeps, among near-equals,
the one the dev documents happen to favour, so its dev score is optimistic and a held-out
split can disagree (the SmolLM2 study's first run: at 26 hops the search preferred a scaled
route by 0.037 on dev that lost to ShortGPT's by 0.041 held out). The remedy is the usual one
of model selection: shortlist the few best by dev, score them on validation documents, and
keep the best there. `select_tasks`, `select_limit` and `select_top` in the run config say
which documents and how many candidates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from dfs_merge.evaluation import Evaluation
from dfs_merge.genome_files import CandidateGenome


@dataclass
class Candidate:
    """One evaluated genome: its dev evaluation and, once shortlisted, its validation evaluation."""

    genome: CandidateGenome
    dev: Evaluation
    val: Evaluation | None = None

    @property
    def selection_score(self) -> float:
        """The score the final choice goes by: validation when scored, else dev."""
        return selection_score(self.dev, self.val)


def selection_score(dev: Evaluation | None, val: Evaluation | None) -> float:
    """Validation's score when it scored, else dev's; minus infinity when neither did."""
    ev = val if val is not None and val.ok else dev
    return ev.score if ev is not None and ev.ok else float("-inf")


def shortlist(evaluated: Iterable[tuple[CandidateGenome, Evaluation]], top: int,
              group: Callable[[Evaluation], Hashable] = lambda ev: None) -> dict[Hashable, list[Candidate]]:
    """The `top` best distinct routes by dev score in each group (one group unless `group` says), failed ones out."""
    seen: set[str] = set()
    groups: dict[Hashable, list[Candidate]] = defaultdict(list)
    for genome, ev in evaluated:
        key = genome.key()
        if ev.ok and key not in seen:
            seen.add(key)
            groups[group(ev)].append(Candidate(genome, ev))
    return {g: sorted(cs, key=lambda c: -c.dev.score)[:top] for g, cs in groups.items()}


def per_hop_count(evaluated: Iterable[tuple[CandidateGenome, Evaluation]], hop_counts: Iterable[int],
                  top: int) -> dict[Hashable, list[Candidate]]:
    """Shortlists for an [score, hops] front: the `top` best by dev at each of `hop_counts`."""
    wanted = set(hop_counts)
    return shortlist(((g, ev) for g, ev in evaluated if ev.hops in wanted), top, group=lambda ev: ev.hops)


def front_span(evaluated: Iterable[tuple[CandidateGenome, Evaluation]], front_hops: Iterable[int],
               top: int) -> dict[Hashable, list[Candidate]]:
    """Shortlists at every hop count from a dev front's fewest hops to its most, not only those on it: a route that
    a shorter one dominates on dev (so it is off the dev front) may still be the better one on validation."""
    hops = list(front_hops)
    return per_hop_count(evaluated, range(min(hops), max(hops) + 1) if hops else (), top)


def choose(shortlists: dict[Hashable, list[Candidate]],
           score_val: Callable[[CandidateGenome], Evaluation] | None) -> dict[Hashable, Candidate]:
    """Per group, the shortlisted candidate with the best validation score (dev breaks ties; dev alone
    when `score_val` is None)."""
    chosen = {}
    for g, cands in shortlists.items():
        if score_val is not None:
            for c in cands:
                c.val = score_val(c.genome)
        chosen[g] = max(cands, key=lambda c: (c.selection_score, c.dev.score))
    return chosen
