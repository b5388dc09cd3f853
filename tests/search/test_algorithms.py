"""A new algorithm is one class with `@register`: a (1+lambda) evolution strategy, written here and nowhere
else, runs through the whole loop (ledger, checkpoint, resume, final files) like the built-in ones."""

from __future__ import annotations

import json

import pytest
from synthetic import QUIET, TargetRoute, evals, make_config

from dfs_merge.errors import ConfigError
from dfs_merge.search.algorithms import ALGORITHMS, Algorithm, register
from dfs_merge.search.evolution import run_evolution
from dfs_merge.search.operators import Individual, variation_toolbox

NEAR = "0:0, 0:2-3"  # one edit (drop layer 1) from the base route 0:0-3: within reach of one mutation


class OnePlusLambda(Algorithm):
    """(1+lambda)-ES: the parent's mutants each generation; the best of parent and mutants survives."""

    name = "one_plus_lambda"

    def __init__(self, cfg, template, known):
        super().__init__(cfg, template, known)
        self.tb = variation_toolbox(cfg, template, self.fitness_cls)

    def ask(self, gen):
        if gen == 0:
            return [Individual.of(s, self.fitness_cls()) for s in self.seeds()[:1]]
        parent = self.population[0]
        kids = []
        for _ in range(self.cfg.population):
            kid = self.tb.clone(parent)
            self.tb.mutate(kid)
            del kid.fitness.values
            kids.append(kid.settle(self.template))
        return kids

    def tell(self, gen, evaluated):
        seen = self.population + evaluated
        self.population = [max(seen, key=lambda ind: ind.fitness)]
        return seen


@pytest.fixture(autouse=True)
def registered():
    register(OnePlusLambda)
    yield
    ALGORITHMS.pop(OnePlusLambda.name)


def test_a_registered_algorithm_runs_improves_and_resumes_exactly(sources, tmp_path):
    kw = {"algorithm": "one_plus_lambda", "population": 6, "seed": 2}
    straight = run_evolution(make_config(sources, tmp_path / "straight", generations=6, **kw),
                             evaluate=TargetRoute(NEAR), **QUIET)
    history = straight.history
    assert history[-1]["best"] > history[0]["best"]  # the mutants found better routes than the base alone
    assert [h["best"] for h in history] == sorted(h["best"] for h in history)  # elitist: never worse

    run_evolution(make_config(sources, tmp_path / "split", generations=3, **kw), evaluate=TargetRoute(NEAR), **QUIET)
    fn = TargetRoute(NEAR)
    split = run_evolution(make_config(sources, tmp_path / "split", generations=6, **kw), resume=True,
                          evaluate=fn, **QUIET)
    assert split.best.key() == straight.best.key() and split.history[-1]["best"] == history[-1]["best"]
    assert [e["key"] for e in evals(tmp_path / "split")] == [e["key"] for e in evals(tmp_path / "straight")]
    state = json.loads((tmp_path / "split" / "checkpoint.json").read_text())
    assert state["algorithm"] == "one_plus_lambda" and len(state["population"]) == 1


def test_an_unknown_algorithm_is_refused_naming_the_registered_ones(sources, tmp_path):
    with pytest.raises(Exception, match="one_plus_lambda") as err:
        make_config(sources, tmp_path / "x", algorithm="pso")
    assert "ga, nsga2" in str(err.value)
    from dfs_merge.search.algorithms import algorithm_class

    with pytest.raises(ConfigError, match="unknown algorithm 'pso'"):
        algorithm_class("pso")
