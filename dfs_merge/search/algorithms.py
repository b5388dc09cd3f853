"""The search algorithms, one class each, behind `ask` / `tell`, and the registry that names them.

- `ga`: tournament selection, elitism (the best `elite` pass unchanged), uniform crossover on the
  inclusion bits and blend crossover on the scales, bit-flip and Gaussian mutation.
- `nsga2`: the same variation; NSGA-II selection on (score max, hops min); keeps the Pareto front of
  everything it evaluated.
- `cmaes`: DEAP's CMA-ES on a continuous vector: T inclusion values (a slot is included where its value
  is > 0), then the scales. The initial centroid is "model 0 unchanged" (+1 on the first repetition's
  base slots, -1 elsewhere, scales 1).
- `random`: uniform random genomes, the baseline every other algorithm must beat.

The loop (`evolution.py`) calls `ask(gen)` for the individuals that need a fitness, evaluates them,
and calls `tell(gen, evaluated)`, which returns every individual the generation saw. Both run while
the run's own random state is active. `state()` / `restore()` carry what the checkpoint needs.
A new algorithm is one class here and its row in `dfs_merge.registry.ALGORITHMS` (the name table the run config
is checked against); one defined elsewhere (a test, a plug-in) is one class with `@register`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from deap import algorithms, cma, tools

from dfs_merge.errors import ConfigError
from dfs_merge.genome_files import CandidateGenome, genome_from_dict, genome_to_dict
from dfs_merge.registry import ALGORITHMS
from dfs_merge.search.operators import (
    Individual,
    Member,
    Vector,
    as_vector,
    fitness_class,
    gene_bounds,
    member,
    repair,
    restore_members,
    same_key,
    select_dcd,
    variation_toolbox,
)

if TYPE_CHECKING:
    from dfs_merge.config import RunConfig

register = ALGORITHMS.register  # class decorator: an algorithm under its `name` (config `algorithm:`)
algorithm_class = ALGORITHMS.lookup  # the algorithm of a name; ConfigError naming the known ones otherwise


def _num(x: float) -> float | str:
    return x if np.isfinite(x) else str(x)


class Algorithm(ABC):
    """One search algorithm's state between generations."""

    name: ClassVar[str]
    objectives: ClassVar[tuple[str, ...] | None] = None  # the objectives it needs (None: any)

    def __init__(self, cfg: RunConfig, template: CandidateGenome, known: Callable[[str], bool]):
        self.cfg = cfg
        self.template = template
        self.known = known  # whether a key was evaluated earlier in the run
        self.fitness_cls = fitness_class(cfg.objectives)
        self.population: list[Member] = []
        self.front: tools.ParetoFront | None = None  # algorithms with a Pareto front set one

    @classmethod
    def check(cls, objectives: Sequence[str]) -> None:
        """Refuse objectives the algorithm cannot work with, when the run starts (a ConfigError naming them)."""
        if cls.objectives is not None and tuple(objectives) != cls.objectives:
            raise ConfigError(f"objectives: algorithm {cls.name} needs objectives [{', '.join(cls.objectives)}]")

    @abstractmethod
    def ask(self, gen: int) -> list[Member]:
        """Generation `gen`'s new individuals, each with `genome` and `key`; the loop gives them a fitness."""

    @abstractmethod
    def tell(self, gen: int, evaluated: list[Member]) -> list[Member]:
        """Take the evaluated individuals; choose the next population; return every individual the
        generation saw (for the hall of fame)."""

    def race_cut(self) -> int:
        """Racing: how many others must be confidently better than a candidate for it not to matter to this
        algorithm (`racing.py`). The base rule: only the best (or the front) matters."""
        return 1

    def race_references(self) -> list[str]:
        """Racing: the keys of the fully scored individuals a new candidate is compared with besides its own
        generation (those the algorithm's selection will weigh it against)."""
        return []

    def seeds(self) -> list[CandidateGenome]:
        """Generation 0's fixed members: each source unchanged, then `seed_routes`, repaired."""
        return [repair(s, random) for s in self.template.seeds(self.cfg.seed_routes)][: self.cfg.population]

    def revive(self, genome: CandidateGenome) -> Member:
        """An individual of this algorithm for a checkpointed genome."""
        return Individual.of(genome, self.fitness_cls())

    # ---- checkpoint ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What the checkpoint must hold to continue exactly: the population (and subclass state)."""
        def entry(ind: Member) -> dict[str, Any]:
            out: dict[str, Any] = {"key": ind.key, "genome": genome_to_dict(ind.genome)}
            cd = getattr(ind.fitness, "crowding_dist", None)
            if cd is not None:
                out["crowding_dist"] = _num(cd)
            return out

        return {"population": [entry(i) for i in self.population]}

    def restore(self, state: dict[str, Any], objectives_of: Callable[[str], tuple[float, ...]]) -> None:
        """Continue from `state()`; `objectives_of(key)` gives a logged evaluation's objective values."""
        pop = []
        for e in state["population"]:
            ind = self.revive(genome_from_dict(e["genome"], "checkpoint population"))
            ind.fitness.values = objectives_of(e["key"])
            if "crowding_dist" in e:
                ind.fitness.crowding_dist = float(e["crowding_dist"])
            pop.append(ind)
        self.population = pop


class _BitsAlgorithm(Algorithm):
    """Shared by the algorithms that vary bits and scales with DEAP's operators."""

    def __init__(self, cfg: RunConfig, template: CandidateGenome, known: Callable[[str], bool]):
        super().__init__(cfg, template, known)
        self.tb = variation_toolbox(cfg, template, self.fitness_cls)

    def initial(self) -> list[Individual]:
        """Generation 0: the seeds, then perturbed copies of them up to the population size."""
        seeds = self.seeds()
        pop = [Individual.of(s, self.fitness_cls()) for s in seeds]
        taken = {s.key() for s in seeds}
        while len(pop) < self.cfg.population:
            ind = Individual.of(seeds[len(pop) % len(seeds)], self.fitness_cls())
            for _ in range(1 + self.cfg.resample_duplicates):
                self.tb.perturb(ind)
                ind.settle(self.template)
                if ind.key not in taken:
                    break
            taken.add(ind.key)
            pop.append(ind)
        return pop

    def offspring(self, parents: list[Individual]) -> list[Individual]:
        """Crossover and mutation of `parents`, repaired; a new route already evaluated or already in this
        generation is mutated again (up to `resample_duplicates` times). Unchanged copies pass as they are."""
        cfg = self.cfg
        children = algorithms.varAnd(parents, self.tb, cfg.crossover_prob, cfg.mutation_prob)
        taken: set[str] = set()
        for ind in children:
            if ind.fitness.valid:
                continue
            ind.settle(self.template)
            for _ in range(cfg.resample_duplicates):
                if not self.known(ind.key) and ind.key not in taken:
                    break
                self.tb.mutate(ind)
                ind.settle(self.template)
            taken.add(ind.key)
        return children


class GA(_BitsAlgorithm):
    """Tournament selection with elitism."""

    name = "ga"

    def race_cut(self) -> int:
        # below the population's median: a tournament of size t picks from there with probability at most 2^-t
        return max(1, self.cfg.population // 2)

    def race_references(self) -> list[str]:
        return [ind.key for ind in self.population]

    def ask(self, gen: int) -> list[Member]:
        if gen == 0:
            self._elites, self._offspring = [], self.initial()
        else:
            self._elites = tools.selBest(self.population, self.cfg.elite)
            chosen = tools.selTournament(self.population, self.cfg.population - len(self._elites),
                                         tournsize=self.cfg.tournament)
            self._offspring = self.offspring(chosen)
        return [ind for ind in self._offspring if not ind.fitness.valid]

    def tell(self, gen: int, evaluated: list[Member]) -> list[Member]:
        self.population = self._elites + self._offspring
        return self.population


class NSGA2(_BitsAlgorithm):
    """NSGA-II on (score, hops), keeping the Pareto front of everything evaluated."""

    name = "nsga2"
    objectives = ("score", "hops")

    def race_cut(self) -> int:
        # dominated by a population's worth of individuals, it is in a front NSGA-II never reaches
        return self.cfg.population

    def race_references(self) -> list[str]:
        return [ind.key for ind in self.population]

    def __init__(self, cfg: RunConfig, template: CandidateGenome, known: Callable[[str], bool]):
        super().__init__(cfg, template, known)
        self.front = tools.ParetoFront(similar=same_key)

    def ask(self, gen: int) -> list[Member]:
        if gen == 0:
            self._offspring = self.initial()
        else:
            self._offspring = self.offspring(select_dcd(self.population, self.cfg.population))
        return [ind for ind in self._offspring if not ind.fitness.valid]

    def tell(self, gen: int, evaluated: list[Member]) -> list[Member]:
        pool = self.population + self._offspring
        unique, twins, keys = [], [], set()
        for ind in pool:  # survivors are chosen among distinct routes; twins only fill a gap
            (twins if ind.key in keys else unique).append(ind)
            keys.add(ind.key)
        self.population = tools.selNSGA2(unique + twins[: max(0, self.cfg.population - len(unique))],
                                         self.cfg.population)
        return pool

    def state(self) -> dict[str, Any]:
        assert self.front is not None
        return {**super().state(), "pareto": [{"key": m.key, "genome": genome_to_dict(m.genome)} for m in self.front]}

    def restore(self, state: dict[str, Any], objectives_of: Callable[[str], tuple[float, ...]]) -> None:
        super().restore(state, objectives_of)
        assert self.front is not None
        restore_members(self.front, [member(genome_from_dict(e["genome"], "checkpoint"), self.fitness_cls,
                                            objectives_of) for e in state.get("pareto", [])])


class RandomSearch(_BitsAlgorithm):
    """Uniform random genomes (after the seeds in generation 0)."""

    name = "random"

    def ask(self, gen: int) -> list[Member]:
        pop = [Individual.of(s, self.fitness_cls()) for s in self.seeds()] if gen == 0 else []
        taken = {ind.key for ind in pop}
        while len(pop) < self.cfg.population:
            ind = self.tb.individual().settle(self.template)
            for _ in range(self.cfg.resample_duplicates):
                if not self.known(ind.key) and ind.key not in taken:
                    break
                ind = self.tb.individual().settle(self.template)
            taken.add(ind.key)
            pop.append(ind)
        return pop

    def tell(self, gen: int, evaluated: list[Member]) -> list[Member]:
        self.population = evaluated
        return evaluated


_CMA_STATE = ("centroid", "sigma", "pc", "ps", "C", "diagD", "B", "BD", "cond", "update_count")


class CMAES(Algorithm):
    """DEAP's CMA-ES over inclusion values and scales (the paper's optimiser)."""

    name = "cmaes"

    def race_cut(self) -> int:
        return int(self.strategy.mu)  # only the best mu of a generation enter the update

    def __init__(self, cfg: RunConfig, template: CandidateGenome, known: Callable[[str], bool]):
        super().__init__(cfg, template, known)
        self.bounds = gene_bounds(cfg, template)
        T, S = len(template.bits), len(template.scales)  # noqa: N806
        # the first seed: "model 0 unchanged" (+1 on the first repetition's base slots, -1 elsewhere, scales 1);
        # a recipe: its own values
        centroid = as_vector(template.seeds()[0])
        cmatrix = np.diag([1.0] * T + [(cfg.scale_sigma / cfg.cma_sigma) ** 2] * S)
        self.strategy = cma.Strategy(centroid=centroid, sigma=cfg.cma_sigma, lambda_=cfg.population, cmatrix=cmatrix)
        self._contiguous()

    def revive(self, genome: CandidateGenome) -> Vector:
        return Vector(as_vector(genome), self.fitness_cls(), genome)

    def ask(self, gen: int) -> list[Member]:
        pop = self.strategy.generate(lambda a: Vector(a, self.fitness_cls()))
        if gen == 0:  # the seeds replace the first samples; seed 0 is the centroid itself
            for i, s in enumerate(self.seeds()):
                pop[i] = Vector(as_vector(s), self.fitness_cls())
        for v in pop:
            v.settle(self.template, self.bounds)
        return pop

    def tell(self, gen: int, evaluated: list[Member]) -> list[Member]:
        self.strategy.update(evaluated)
        self._contiguous()
        self.population = evaluated
        return evaluated

    def state(self) -> dict[str, Any]:
        out = {}
        for name in _CMA_STATE:
            v = getattr(self.strategy, name)
            out[name] = v.tolist() if isinstance(v, np.ndarray) else float(v) if name != "update_count" else int(v)
        return {**super().state(), "cma": out}

    def restore(self, state: dict[str, Any], objectives_of: Callable[[str], tuple[float, ...]]) -> None:
        super().restore(state, objectives_of)
        if state.get("cma"):
            for name in _CMA_STATE:
                v = state["cma"][name]
                setattr(self.strategy, name, np.array(v, dtype=float) if isinstance(v, list) else v)
            self._contiguous()

    def _contiguous(self) -> None:
        """Keep the strategy's matrices C-contiguous: BLAS rounds differently for another memory layout,
        and a restored strategy (built from lists) must compute exactly what the original did."""
        for name in _CMA_STATE:
            v = getattr(self.strategy, name)
            if isinstance(v, np.ndarray):
                setattr(self.strategy, name, np.ascontiguousarray(v, dtype=float))
