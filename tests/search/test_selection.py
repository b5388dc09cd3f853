"""The final choice on a validation split: a shortlist by dev per group, the best on validation kept."""

from __future__ import annotations

from dfs_merge.config import ConstraintsConfig
from dfs_merge.evaluation import Evaluation
from dfs_merge.genome import Genome
from dfs_merge.search.selection import choose, front_span, shortlist


def _scored(template: Genome, bits: list[int], dev: float, error: str | None = None) -> tuple[Genome, Evaluation]:
    g = template.with_bits(bits)
    return g, Evaluation(score=dev, hops=sum(bits), error=error)


def test_shortlist_keeps_the_best_distinct_routes_by_dev_per_group():
    t = Genome.empty(["m"], (4,), 1, "none", ConstraintsConfig(pin_ends=False))
    evaluated = [_scored(t, [1, 1, 1, 1], -0.1), _scored(t, [1, 1, 1, 0], -0.5), _scored(t, [1, 1, 0, 1], -0.3),
                 _scored(t, [1, 0, 1, 1], -0.4), _scored(t, [0, 1, 1, 1], 9.0, error="boom"),
                 _scored(t, [1, 1, 0, 1], -0.2)]  # the same route again: its first evaluation stands
    lists = shortlist(evaluated, top=2, group=lambda ev: ev.hops)
    assert sorted(lists) == [3, 4]
    assert [(c.genome.decode().text(), c.dev.score) for c in lists[3]] == [("0:0-1, 0:3", -0.3), ("0:0, 0:2-3", -0.4)]
    assert [c.dev.score for c in shortlist(evaluated, top=9)[None]] == [-0.1, -0.3, -0.4, -0.5]


def test_choose_goes_by_validation_and_falls_back_to_dev():
    t = Genome.empty(["m"], (4,), 1, "none", ConstraintsConfig(pin_ends=False))
    lists = shortlist([_scored(t, [1, 1, 1, 0], -0.3), _scored(t, [1, 1, 0, 1], -0.2), _scored(t, [1, 0, 1, 1], -0.4)],
                      top=2)
    val = {"0:0-2": -0.1, "0:0-1, 0:3": -0.6}
    calls = []

    def score_val(g: Genome) -> Evaluation:
        calls.append(g.decode().text())
        return Evaluation(score=val[g.decode().text()], hops=len(g.decode()))

    picked = choose(lists, score_val)[None]
    assert picked.genome.decode().text() == "0:0-2" and picked.val.score == -0.1 and picked.dev.score == -0.3
    assert sorted(calls) == sorted(val)  # only the shortlist is scored on validation
    assert choose(shortlist([_scored(t, [1, 1, 1, 0], -0.3), _scored(t, [1, 1, 0, 1], -0.2)], top=2), None)[
        None].genome.decode().text() == "0:0-1, 0:3"


def test_the_front_span_shortlists_hop_counts_the_dev_front_skips():
    """2-hop and 4-hop routes are on the dev front; the 3-hop route is dominated there (the 2-hop one is better on
    dev with fewer hops) yet gets its shortlist, and validation can prefer it."""
    t = Genome.empty(["m"], (5,), 1, "none", ConstraintsConfig(pin_ends=False))
    evaluated = [_scored(t, [1, 1, 0, 0, 0], -0.2), _scored(t, [1, 1, 1, 0, 0], -0.3),
                 _scored(t, [1, 1, 1, 1, 0], -0.1), _scored(t, [1, 1, 1, 1, 1], -0.05)]
    lists = front_span(evaluated, [2, 4], top=2)
    assert sorted(lists) == [2, 3, 4]  # not 5: beyond the front's most hops
    val = {"0:0-1": -0.5, "0:0-2": -0.2, "0:0-3": -0.3}
    chosen = choose(lists, lambda g: Evaluation(score=val[g.decode().text()], hops=len(g.decode())))
    best_at_most_3 = max((chosen[h] for h in (2, 3)), key=lambda c: c.selection_score)
    assert best_at_most_3.genome.decode().text() == "0:0-2"
    assert front_span(evaluated, [], top=2) == {}
