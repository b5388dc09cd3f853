"""Evolution: DEAP algorithms over genomes, the generation loop, checkpoint and exact resume.

Algorithms (config `algorithm:`):

- `ga`: tournament selection, elitism (the best `elite` pass unchanged), uniform
  crossover on the inclusion bits and blend crossover on the scales, bit-flip and
  Gaussian mutation.
- `nsga2`: the same variation; NSGA-II selection on (score max, hops min); the run
  keeps the Pareto front of everything it evaluated.
- `cmaes`: DEAP's CMA-ES on a continuous vector: T inclusion values (a slot is
  included where its value is > 0), then the scales. The initial centroid is "model
  0 unchanged" (+1 on the first repetition's base slots, -1 elsewhere, scales 1).
- `random`: uniform random genomes, the baseline every other algorithm must beat.

Every candidate is repaired to meet the hop constraints before it is evaluated,
generation 0 always holds the seeds (`seed_genomes`), and a genome whose canonical
key was already evaluated is not evaluated again.

Determinism: all the algorithm's randomness comes from the run's own Python and
numpy random states, which are swapped in only while the algorithm draws (never
while a candidate is evaluated) and saved in every checkpoint. Results are matched
to candidates by key, so the order in which parallel workers finish changes
nothing. A run killed at any moment and resumed reaches the same result as one
that was never interrupted, and re-uses every evaluation already in evals.jsonl.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from deap import algorithms, base, cma, tools
from tqdm import tqdm

from dfs_merge import selection
from dfs_merge.config import RunConfig
from dfs_merge.errors import ConfigError, DfsMergeError, GenomeError
from dfs_merge.evaluators import Evaluator, GenomeEvaluator, ModelEvaluator, make_evaluator
from dfs_merge.fitness import Evaluation
from dfs_merge.genome import Genome, genome_from_dict, genome_to_dict, seed_genomes
from dfs_merge.rundir import RunDir

Rng = random.Random | ModuleType  # `random.Random` or the `random` module itself
PLOT_EVERY_S = 60.0  # history.png is redrawn after a generation when this long has passed (and at the end)


# ---- constraints ------------------------------------------------------------------------
def repair(genome: Genome, rng: Rng) -> Genome:
    """Make a genome meet its hop constraints: switch random included bits off while the route is too
    long, random excluded bits on while it is too short (never empty). Raises GenomeError if impossible."""
    c = genome.constraints
    bits = list(genome.bits)

    def hops() -> int:
        return len(genome.with_bits(bits).decode())

    n = hops()
    while c.max_hops is not None and n > c.max_hops:
        on = [i for i, b in enumerate(bits) if b]
        if not on:
            break
        bits[rng.choice(on)] = 0
        n = hops()
    while n < max(1, c.min_hops):
        off = [i for i, b in enumerate(bits) if not b]
        if not off:
            break
        bits[rng.choice(off)] = 1
        n = hops()
    out = genome if tuple(bits) == genome.bits else genome.with_bits(bits)
    out.check()
    return out


def scale_genes(genome: Genome) -> list[int]:
    """Indices of the scales that the genome's route actually uses."""
    if genome.scaling == "slot":
        return [i for i, b in enumerate(genome.bits) if b]
    if genome.scaling == "transition":
        lay = genome.layout
        cells, prev = [], None
        for h in genome.decode():
            this = lay.offset(h.source) + h.layer
            if prev is not None:
                cells.append(prev * lay.M + this)
            prev = this
        return list(dict.fromkeys(cells))
    return []


# ---- individuals ------------------------------------------------------------------------
class ScoreFitness(base.Fitness):
    """One objective: the task score, maximised."""

    weights = (1.0,)


class ScoreHopsFitness(base.Fitness):
    """Score (max) and hops (min); for single-objective algorithms this orders by score, then fewer hops."""

    weights = (1.0, -1.0)


class Candidate:
    """A ga / nsga2 / random individual: inclusion bits and scales, as lists DEAP's operators edit in place."""

    def __init__(self, bits: Sequence[int], scales: Sequence[float], fitness: base.Fitness):
        self.bits = list(bits)
        self.scales = list(scales)
        self.fitness = fitness


class Vector(list):
    """A cmaes individual: T inclusion values (included where > 0), then the scales."""

    def __init__(self, values: Sequence[float], fitness: base.Fitness):
        super().__init__(float(x) for x in values)
        self.fitness = fitness


class Member:
    """An evaluated genome in the hall of fame or on the Pareto front."""

    def __init__(self, genome: Genome, key: str, fitness: base.Fitness):
        self.genome = genome
        self.key = key
        self.fitness = fitness


def same_key(a: Member, b: Member) -> bool:
    return a.key == b.key


# ---- variation operators ----------------------------------------------------------------
def clip(x: float, low: float, high: float) -> float:
    return min(high, max(low, float(x)))


def uniform_candidate(template: Genome, fitness: type[base.Fitness], low: float, high: float) -> Candidate:
    """A uniform random genome: each bit on with probability 1/2, each scale uniform in [low, high]."""
    bits = [random.randint(0, 1) for _ in range(template.layout.T)]
    scales = [random.uniform(low, high) for _ in template.scales]
    return Candidate(bits, scales, fitness())


def mate(a: Candidate, b: Candidate, low: float, high: float, alpha: float = 0.5) -> tuple[Candidate, Candidate]:
    """Uniform crossover of the bits, blend crossover of the scales (clipped to [low, high])."""
    tools.cxUniform(a.bits, b.bits, indpb=0.5)
    if a.scales:
        tools.cxBlend(a.scales, b.scales, alpha)
        a.scales[:] = [clip(x, low, high) for x in a.scales]
        b.scales[:] = [clip(x, low, high) for x in b.scales]
    return a, b


def mutate(
    ind: Candidate, template: Genome, bit_pb: float, sigma: float, low: float, high: float,
    scale_pb: float | None = None,
) -> tuple[Candidate]:
    """Flip each bit with probability `bit_pb`; add N(0, sigma) to each scale in use with probability
    `scale_pb` (default: one per route on average), clipped to [low, high]."""
    tools.mutFlipBit(ind.bits, bit_pb)
    genes = scale_genes(template.with_bits(ind.bits, ind.scales))
    if genes:
        values = [ind.scales[i] for i in genes]
        tools.mutGaussian(values, 0.0, sigma, scale_pb if scale_pb is not None else 1.0 / len(genes))
        for i, x in zip(genes, values, strict=True):
            ind.scales[i] = clip(x, low, high)
    return (ind,)


def select_dcd(pop: list[Any], k: int) -> list[Any]:
    """NSGA-II's binary tournament on dominance then crowding distance, for any k (DEAP wants multiples of 4)."""
    if len(pop) < 4:
        return [random.choice(pop) for _ in range(k)]
    chosen: list[Any] = []
    while len(chosen) < k:
        n = min(len(pop) - len(pop) % 4, 4 * math.ceil((k - len(chosen)) / 4))
        chosen += tools.selTournamentDCD(pop, n)
    return chosen[:k]


def build_toolbox(cfg: RunConfig, template: Genome, fitness: type[base.Fitness]) -> base.Toolbox:
    """The DEAP toolbox of a run: how to make, vary, repair and select individuals."""
    low, high = cfg.scale_range
    T = template.layout.T  # noqa: N806 - the paper's name
    bit_pb = cfg.bit_flip_prob or 1.0 / T
    tb = base.Toolbox()
    tb.register("individual", uniform_candidate, template, fitness, low, high)
    tb.register("mate", mate, low=low, high=high)
    tb.register("mutate", mutate, template=template, bit_pb=bit_pb, sigma=cfg.scale_sigma, low=low, high=high,
                scale_pb=cfg.bit_flip_prob)
    # Generation 0 beyond the seeds: seeds with about three bits flipped and three scales moved.
    tb.register("perturb", mutate, template=template, bit_pb=min(0.5, max(bit_pb, 3.0 / T)), sigma=cfg.scale_sigma,
                low=low, high=high, scale_pb=min(1.0, 3.0 / max(1, T)))
    if cfg.algorithm == "nsga2":
        tb.register("select", tools.selNSGA2)
        tb.register("parents", select_dcd)
    else:
        tb.register("select", tools.selTournament, tournsize=cfg.tournament)
    return tb


# ---- the run's random state -------------------------------------------------------------
class RunRandom:
    """The run's own Python and numpy random states, swapped into the global generators only while
    the algorithm draws (DEAP's operators and CMA-ES use the module-level generators)."""

    def __init__(self, seed: int):
        self.py: Any = random.Random(seed).getstate()
        self.np: Any = np.random.RandomState(seed).get_state()

    @contextmanager
    def active(self) -> Iterator[None]:
        outer_py, outer_np = random.getstate(), np.random.get_state()
        random.setstate(self.py)
        np.random.set_state(self.np)
        try:
            yield
        finally:
            self.py, self.np = random.getstate(), np.random.get_state()
            random.setstate(outer_py)
            np.random.set_state(outer_np)

    def to_json(self) -> dict[str, Any]:
        version, internal, gauss = self.py
        name, keys, pos, has_gauss, cached = self.np
        return {
            "python": [version, list(internal), gauss],
            "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRandom:
        rng = cls(0)
        version, internal, gauss = data["python"]
        rng.py = (version, tuple(internal), gauss)
        name, keys, pos, has_gauss, cached = data["numpy"]
        rng.np = (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)
        return rng


_CMA_STATE = ("centroid", "sigma", "pc", "ps", "C", "diagD", "B", "BD", "cond", "update_count")


def cma_state(s: cma.Strategy) -> dict[str, Any]:
    """The evolving state of a CMA-ES strategy as JSON-safe lists."""
    out = {}
    for name in _CMA_STATE:
        v = getattr(s, name)
        out[name] = v.tolist() if isinstance(v, np.ndarray) else float(v) if name != "update_count" else int(v)
    return out


def restore_cma(s: cma.Strategy, state: dict[str, Any]) -> None:
    """Put a saved state back into a strategy built with the same parameters."""
    for name in _CMA_STATE:
        v = state[name]
        setattr(s, name, np.array(v, dtype=float) if isinstance(v, list) else v)
    contiguous_cma(s)


def contiguous_cma(s: cma.Strategy) -> None:
    """Keep the strategy's matrices C-contiguous: BLAS rounds differently for another memory layout,
    and a restored strategy (built from lists) must compute exactly what the original did."""
    for name in _CMA_STATE:
        v = getattr(s, name)
        if isinstance(v, np.ndarray):
            setattr(s, name, np.ascontiguousarray(v, dtype=float))


# ---- the result -------------------------------------------------------------------------
@dataclass
class RunResult:
    """What a run produced (also on disk under `out`)."""

    best: Genome
    best_eval: Evaluation
    test_eval: Evaluation | None
    pareto: list[tuple[Genome, Evaluation]]
    out: Path
    paths: dict[str, Path]
    generations: int
    evaluations: int
    cache_hits: int
    errors: int
    recovered: int
    history: list[dict[str, Any]] = field(default_factory=list)


def scores_of(ev: Evaluation) -> dict[str, Any]:
    """The scores recorded in a genome file: score, hops, per-task metric values, error if any."""
    out: dict[str, Any] = {
        "score": ev.score,
        "hops": ev.hops,
        "tasks": {name: {"metric": r.metric, "value": r.value, "docs": r.docs} for name, r in ev.tasks.items()},
    }
    if ev.error:
        out["error"] = ev.error
    return out


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


# ---- the search -------------------------------------------------------------------------
class Evolution:
    """One run's search state and its generation loop."""

    def __init__(self, cfg: RunConfig, template: Genome, rundir: RunDir, evaluator: Evaluator,
                 log: Callable[[str], Any] = print, progress: bool = True):
        self.cfg = cfg
        self.template = template
        self.rundir = rundir
        self.evaluator = evaluator
        self.log = log
        self.progress = progress
        self.fitness_cls: type[base.Fitness] = ScoreHopsFitness if "hops" in cfg.objectives else ScoreFitness
        self.tb = build_toolbox(cfg, template, self.fitness_cls)
        self.rng = RunRandom(cfg.seed)
        self.low, self.high = cfg.scale_range
        self.memo: dict[str, Evaluation] = {}
        self.unclaimed: set[str] = set()  # in evals.jsonl from a generation the checkpoint does not cover
        self.counters = {"evaluations": 0, "cache_hits": 0, "errors": 0}
        self.recovered = 0
        self.generation = -1
        self.population: list[Any] = []
        self.hof = tools.HallOfFame(1, similar=same_key)
        self.pareto = tools.ParetoFront(similar=same_key)
        self.history: list[dict[str, Any]] = []
        self.report: dict[str, Evaluation] = {}
        self.val: dict[str, Evaluation] = {}  # validation scores of the final shortlist (select_tasks)
        self.chosen: dict[Any, Member] = {}  # the final choice on validation: "best", and each front hop count
        self.finished = False
        self._plotted = time.monotonic()
        self.strategy: cma.Strategy | None = self._new_strategy() if cfg.algorithm == "cmaes" else None

    # ---- genomes <-> individuals ---------------------------------------------------------
    def genome_of(self, ind: Any) -> Genome:
        if isinstance(ind, Vector):
            return ind.genome
        return self.template.with_bits(ind.bits, ind.scales)

    def candidate(self, g: Genome) -> Candidate:
        return Candidate(g.bits, g.scales, self.fitness_cls())

    def repaired(self, ind: Candidate) -> Candidate:
        g = repair(self.genome_of(ind), random)
        ind.bits = list(g.bits)
        return ind

    def known(self, key: str) -> bool:
        """Evaluated earlier in this run (entries recovered for the generation being redone do not count)."""
        return key in self.memo and key not in self.unclaimed

    def renewed(self, offspring: list[Candidate]) -> list[Candidate]:
        """Repair new candidates; mutate again (up to `resample_duplicates` times) those whose route was
        already evaluated or already appears in this generation. Unchanged copies of parents pass as they are."""
        taken: set[str] = set()
        for ind in offspring:
            if ind.fitness.valid:
                continue
            self.repaired(ind)
            for _ in range(self.cfg.resample_duplicates):
                key = self.genome_of(ind).key()
                if not self.known(key) and key not in taken:
                    break
                self.tb.mutate(ind)
                self.repaired(ind)
            taken.add(self.genome_of(ind).key())
        return offspring

    def seeds(self) -> list[Genome]:
        return [repair(s, random) for s in seed_genomes(self.template, self.cfg.seed_routes)][: self.cfg.population]

    # ---- evaluation ----------------------------------------------------------------------
    def evaluate(self, inds: Sequence[Any], gen: int) -> None:
        """Give each individual its fitness; only keys never seen before are evaluated."""
        evs = self.evaluate_genomes([self.genome_of(i) for i in inds], gen)
        for ind, ev in zip(inds, evs, strict=True):
            ind.fitness.values = ev.objectives(self.cfg.objectives)

    def evaluate_genomes(self, genomes: Sequence[Genome], gen: int) -> list[Evaluation]:
        keys = [g.key() for g in genomes]
        todo: dict[str, Genome] = {}
        for k, g in zip(keys, genomes, strict=True):
            if k in self.unclaimed:  # evaluated before the run was killed: counts as this generation's
                self.unclaimed.discard(k)
                self._count(self.memo[k])
            elif k in self.memo or k in todo:
                self.counters["cache_hits"] += 1
            else:
                todo[k] = g
        bar = tqdm(total=len(todo), desc=f"gen {gen}/{self.cfg.generations}", unit="eval", leave=False,
                   disable=not self.progress or not todo, dynamic_ncols=True)
        try:
            for k, ev in self.evaluator.submit(list(todo.values())):
                self.memo[k] = ev
                self._count(ev)
                self.rundir.append_eval(self._record(gen, k, todo[k], ev))
                bar.update()
        finally:
            bar.close()
        return [self.memo[k] for k in keys]

    def _count(self, ev: Evaluation) -> None:
        self.counters["evaluations"] += 1
        self.counters["errors"] += ev.error is not None

    def _record(self, gen: int, key: str, g: Genome, ev: Evaluation) -> dict[str, Any]:
        return {
            "generation": gen,
            "key": key,
            "objectives": list(ev.objectives(self.cfg.objectives)),
            "score": ev.score,
            "hops": ev.hops,
            "tasks": {name: r.value for name, r in ev.tasks.items()},
            "seconds": round(ev.seconds, 4),
            "error": ev.error,
            "genome": genome_to_dict(g),
            "evaluation": ev.to_dict(),
        }

    def member(self, g: Genome) -> Member:
        key = g.key()
        fit = self.fitness_cls()
        fit.values = self.memo[key].objectives(self.cfg.objectives)
        return Member(g, key, fit)

    # ---- generations ---------------------------------------------------------------------
    def step(self, gen: int) -> list[Any]:
        """Run generation `gen`; returns the individuals it evaluated (or re-used)."""
        return getattr(self, f"_step_{self.cfg.algorithm}")(gen)

    def _initial(self) -> list[Candidate]:
        """Generation 0 of ga and nsga2: the seeds, then perturbed copies of them up to the population size."""
        seeds = self.seeds()
        pop = [self.candidate(s) for s in seeds]
        taken = {s.key() for s in seeds}
        while len(pop) < self.cfg.population:
            ind = self.candidate(seeds[len(pop) % len(seeds)])
            for _ in range(1 + self.cfg.resample_duplicates):
                self.tb.perturb(ind)
                self.repaired(ind)
                if self.genome_of(ind).key() not in taken:
                    break
            taken.add(self.genome_of(ind).key())
            pop.append(ind)
        return pop

    def _step_ga(self, gen: int) -> list[Any]:
        cfg = self.cfg
        with self.rng.active():
            if gen == 0:
                elites, offspring = [], self._initial()
            else:
                elites = tools.selBest(self.population, cfg.elite)
                offspring = self.tb.select(self.population, cfg.population - len(elites))
                offspring = self.renewed(algorithms.varAnd(offspring, self.tb, cfg.crossover_prob, cfg.mutation_prob))
        fresh = [ind for ind in offspring if not ind.fitness.valid]
        self.evaluate(fresh, gen)
        self.population = elites + offspring
        return self.population

    def _step_nsga2(self, gen: int) -> list[Any]:
        cfg = self.cfg
        with self.rng.active():
            if gen == 0:
                offspring = self._initial()
            else:
                parents = self.tb.parents(self.population, cfg.population)
                offspring = self.renewed(algorithms.varAnd(parents, self.tb, cfg.crossover_prob, cfg.mutation_prob))
        self.evaluate([ind for ind in offspring if not ind.fitness.valid], gen)
        pool = self.population + offspring
        unique, twins, keys = [], [], set()
        for ind in pool:  # survivors are chosen among distinct routes; twins only fill a gap
            key = self.genome_of(ind).key()
            (twins if key in keys else unique).append(ind)
            keys.add(key)
        self.population = self.tb.select(unique + twins[: max(0, cfg.population - len(unique))], cfg.population)
        return pool

    def _step_random(self, gen: int) -> list[Any]:
        with self.rng.active():
            pop = [self.candidate(s) for s in self.seeds()] if gen == 0 else []
            taken = {self.genome_of(i).key() for i in pop}
            while len(pop) < self.cfg.population:
                ind = self.repaired(self.tb.individual())
                for _ in range(self.cfg.resample_duplicates):
                    key = self.genome_of(ind).key()
                    if not self.known(key) and key not in taken:
                        break
                    ind = self.repaired(self.tb.individual())
                taken.add(self.genome_of(ind).key())
                pop.append(ind)
        self.evaluate(pop, gen)
        self.population = pop
        return pop

    def _new_strategy(self) -> cma.Strategy:
        lay = self.template.layout
        T, S = lay.T, len(self.template.scales)  # noqa: N806
        centroid = [1.0 if lay.slot(i)[:2] == (0, 0) else -1.0 for i in range(T)] + [1.0] * S
        cmatrix = np.diag([1.0] * T + [(self.cfg.scale_sigma / self.cfg.cma_sigma) ** 2] * S)
        strategy = cma.Strategy(centroid=centroid, sigma=self.cfg.cma_sigma, lambda_=self.cfg.population,
                                cmatrix=cmatrix)
        contiguous_cma(strategy)
        return strategy

    def vector_of(self, g: Genome) -> list[float]:
        return [1.0 if b else -1.0 for b in g.bits] + list(g.scales)

    def _vector_genome(self, v: Vector) -> Genome:
        T = self.template.layout.T  # noqa: N806
        bits = [1 if x > 0 else 0 for x in v[:T]]
        scales = [clip(x, self.low, self.high) for x in v[T:]]
        return repair(self.template.with_bits(bits, scales), random)

    def _step_cmaes(self, gen: int) -> list[Any]:
        assert self.strategy is not None
        with self.rng.active():
            pop = self.strategy.generate(lambda a: Vector(a, self.fitness_cls()))
            if gen == 0:  # the seeds replace the first samples; seed 0 is the centroid itself
                for i, s in enumerate(self.seeds()):
                    pop[i] = Vector(self.vector_of(s), self.fitness_cls())
            for v in pop:
                v.genome = self._vector_genome(v)
        self.evaluate(pop, gen)
        with self.rng.active():
            self.strategy.update(pop)
        contiguous_cma(self.strategy)
        self.population = pop
        return pop

    # ---- bookkeeping ---------------------------------------------------------------------
    def after_generation(self, gen: int, seen: list[Any], seconds: float) -> None:
        """Update hall of fame / front, history, best genome, checkpoint; print the summary line."""
        members = [self.member(self.genome_of(i)) for i in seen]
        self.hof.update(members)
        if self.cfg.algorithm == "nsga2":
            self.pareto.update([m for m in members if self.memo[m.key].ok])
        best = self.hof[0]
        best_ev = self.memo[best.key]
        evs = [self.memo[self.genome_of(i).key()] for i in self.population]
        ok = [e.score for e in evs if e.ok]
        gen_best = max(ok) if ok else None
        mean = sum(ok) / len(ok) if ok else None
        self.history.append({
            "generation": gen, "best": best_ev.score, "best_hops": best_ev.hops, "gen_best": gen_best,
            "mean": mean, **self.counters, "seconds": round(seconds, 3),
        })
        self.generation = gen
        self.rundir.write_best(self.best_genome())
        if time.monotonic() - self._plotted > PLOT_EVERY_S:  # a long run's picture stays fresh
            self.rundir.plot_history(self.history)
            self._plotted = time.monotonic()
        if self.cfg.algorithm == "nsga2":
            self.write_pareto()
        self.checkpoint()
        mean_text = f"{mean:.4f}" if mean is not None else "n/a"
        self.log(
            f"gen {gen}/{self.cfg.generations}  best {best_ev.score:.4f} ({best_ev.hops} hops)  mean {mean_text}  "
            f"evals {self.counters['evaluations']}  cache hits {self.counters['cache_hits']}  "
            f"errors {self.counters['errors']}  {seconds:.1f}s"
        )

    def best(self) -> Member:
        """The best member: the final choice on validation once made, else the best dev score."""
        return self.chosen.get("best", self.hof[0])

    def scored(self, m: Member) -> Genome:
        """The member's genome with its dev (and validation, held-out) scores attached."""
        scores = {"dev": scores_of(self.memo[m.key])}
        for split, known in (("val", self.val), ("test", self.report)):
            if m.key in known:
                scores[split] = scores_of(known[m.key])
        return replace(m.genome, scores=scores)

    def best_genome(self) -> Genome:
        return self.scored(self.best())

    def front(self) -> list[Member]:
        """The Pareto front, fewest hops first; after the final choice, its member at each hop count."""
        if self.chosen:
            return [self.chosen[h] for h in sorted(k for k in self.chosen if k != "best")]
        return sorted(self.pareto, key=lambda m: (self.memo[m.key].hops, -self.memo[m.key].score, m.key))

    def write_pareto(self) -> None:
        rows = []
        for m in self.front():
            ev = self.memo[m.key]
            row: dict[str, Any] = {"key": m.key, "hops": ev.hops, "score": ev.score, "route": m.genome.decode().text()}
            if m.key in self.val:
                row["val_score"] = self.val[m.key].score
            if m.key in self.report:
                row["test_score"] = self.report[m.key].score
            rows.append((self.scored(m), row))
        self.rundir.write_pareto(rows)

    # ---- checkpoint ----------------------------------------------------------------------
    def checkpoint(self) -> None:
        def entry(ind: Any) -> dict[str, Any]:
            g = self.genome_of(ind)
            out: dict[str, Any] = {"key": g.key(), "genome": genome_to_dict(g)}
            cd = getattr(ind.fitness, "crowding_dist", None)
            if cd is not None:
                out["crowding_dist"] = _num(cd)
            return out

        self.rundir.write_checkpoint({
            "generation": self.generation,
            "finished": self.finished,
            "algorithm": self.cfg.algorithm,
            "seed": self.cfg.seed,
            "population": [entry(i) for i in self.population],
            "hall_of_fame": [{"key": m.key, "genome": genome_to_dict(m.genome)} for m in self.hof],
            "pareto": [{"key": m.key, "genome": genome_to_dict(m.genome)} for m in self.pareto],
            "rng": self.rng.to_json(),
            "cma": cma_state(self.strategy) if self.strategy is not None else None,
            "counters": dict(self.counters),
            "history": self.history,
            "report": {k: ev.to_dict() for k, ev in self.report.items()},
            "report_tasks": list(self.cfg.report_tasks),
            "val": {k: ev.to_dict() for k, ev in self.val.items()},
            "select_tasks": list(self.cfg.select_tasks),
        })

    def restore(self, records: list[dict[str, Any]], state: dict[str, Any] | None) -> None:
        """Re-use logged evaluations and continue from the checkpoint (if any)."""
        done_gen = state["generation"] if state else -1
        for rec in records:
            key = rec.get("key")
            if not key or key in self.memo or "evaluation" not in rec:
                continue
            self.memo[key] = Evaluation.from_dict(rec["evaluation"])
            if rec.get("generation", 0) > done_gen:
                self.unclaimed.add(key)
        self.recovered = len(self.unclaimed)
        if state is None:
            return
        if state.get("algorithm") != self.cfg.algorithm:
            raise ConfigError(f"resume: the checkpoint is of algorithm {state.get('algorithm')}, not {self.cfg.algorithm}")
        missing = [e["key"] for e in state["population"] + state["hall_of_fame"] if e["key"] not in self.memo]
        if missing:
            raise ConfigError(f"resume: {self.rundir.evals} lacks the evaluation of {len(missing)} checkpointed genomes")
        self.generation = done_gen
        self.finished = bool(state.get("finished")) and done_gen >= self.cfg.generations
        self.rng = RunRandom.from_json(state["rng"])
        self.counters = dict(state["counters"])
        self.history = list(state["history"])
        if state.get("report_tasks") == list(self.cfg.report_tasks):  # else: scored again on the new tasks
            self.report = {k: Evaluation.from_dict(v) for k, v in state.get("report", {}).items()}
        if state.get("select_tasks") == list(self.cfg.select_tasks):
            self.val = {k: Evaluation.from_dict(v) for k, v in state.get("val", {}).items()}
        if self.strategy is not None and state.get("cma"):
            restore_cma(self.strategy, state["cma"])
        pop = []
        for e in state["population"]:
            g = genome_from_dict(e["genome"], "checkpoint population")
            ind: Any
            if self.cfg.algorithm == "cmaes":
                ind = Vector(self.vector_of(g), self.fitness_cls())
                ind.genome = g
            else:
                ind = self.candidate(g)
            ind.fitness.values = self.memo[e["key"]].objectives(self.cfg.objectives)
            if "crowding_dist" in e:
                ind.fitness.crowding_dist = float(e["crowding_dist"])
            pop.append(ind)
        self.population = pop
        _restore_hof(self.hof, [self.member(genome_from_dict(e["genome"], "checkpoint")) for e in state["hall_of_fame"]])
        _restore_hof(self.pareto, [self.member(genome_from_dict(e["genome"], "checkpoint")) for e in state["pareto"]])

    # ---- the whole run -------------------------------------------------------------------
    def run(self) -> None:
        """Generations from the one after the checkpoint up to `cfg.generations`."""
        if self.generation >= 0:
            self.log(f"resuming after generation {self.generation} ({self.counters['evaluations']} evaluations; "
                     f"{self.recovered} more recovered from {self.rundir.evals.name})")
        for gen in range(self.generation + 1, self.cfg.generations + 1):
            t0 = time.perf_counter()
            seen = self.step(gen)
            self.after_generation(gen, seen, time.perf_counter() - t0)

    def score_split(self, fn: GenomeEvaluator, genomes: Sequence[Genome], known: dict[str, Evaluation], what: str,
                    tasks: Sequence[str], fallback: str = "") -> bool:
        """Score the genomes not yet in `known` with `fn` (validation or report tasks) into `known`; a failure is
        a warning line, not the end of the run. False when the tasks could not be scored."""
        todo = list({g.key(): g for g in genomes if g.key() not in known}.values())
        if not todo:
            return True
        self.log(f"scoring {len(todo)} genome(s) on the {what} tasks {', '.join(tasks)}")
        try:
            with make_evaluator(self.cfg, fn) as ev:
                for key, e in ev.submit(todo):
                    known[key] = e
        except DfsMergeError as err:
            self.log(f"warning: the {what} tasks could not be scored{', ' + fallback if fallback else ''}: {err}")
            return False
        return True

    def select(self, select_fn: GenomeEvaluator) -> None:
        """The final choice on validation (`selection.py`): the `select_top` best by dev overall, and at each
        hop count of an nsga2 front, are scored on `select_tasks`; the best there replace dev's choice."""
        cfg = self.cfg
        genomes = {r["key"]: genome_from_dict(r["genome"], "evals.jsonl") for r in self.rundir.read_evals()}
        evaluated = [(genomes[k], ev) for k, ev in self.memo.items() if k in genomes]
        lists: dict[Any, list[selection.Candidate]] = {"best": selection.shortlist(evaluated, cfg.select_top)[None]}
        if cfg.algorithm == "nsga2":
            lists.update(selection.per_hop_count(evaluated, {self.memo[m.key].hops for m in self.pareto}, cfg.select_top))
        shortlisted = [c.genome for cs in lists.values() for c in cs]
        if not self.score_split(select_fn, shortlisted, self.val, "validation", cfg.select_tasks, "dev decides"):
            return
        self.chosen = {k: self.member(c.genome) for k, c in selection.choose(lists, lambda g: self.val[g.key()]).items()}

    def finish(self, report_fn: GenomeEvaluator | None, select_fn: GenomeEvaluator | None = None) -> RunResult:
        """Make the final choice on validation (if configured), score the best genome (and the front) on the
        report tasks; write the final files."""
        cfg = self.cfg
        if select_fn is not None and cfg.select_tasks:
            self.select(select_fn)
        best = self.best()
        targets = [best] + (self.front() if cfg.algorithm == "nsga2" else [])
        if report_fn is not None and cfg.report_tasks:
            self.score_split(report_fn, [m.genome for m in targets], self.report, "report", cfg.report_tasks)
        self.finished = True
        self.rundir.write_best(self.best_genome())
        if cfg.algorithm == "nsga2":
            self.write_pareto()
        self.rundir.plot_history(self.history)
        self.checkpoint()
        best_ev = self.memo[best.key]
        test, val = self.report.get(best.key), self.val.get(best.key) if self.chosen else None
        self.log(
            f"best: {best_ev.score:.4f} dev" + (f", {val.score:.4f} val" if val else "")
            + (f", {test.score:.4f} test" if test else "")
            + f", {best_ev.hops} hops: {best.genome.decode().text()} -> {self.rundir.best}"
        )
        return RunResult(
            best=self.best_genome(),
            best_eval=best_ev,
            test_eval=test,
            pareto=[(m.genome, self.memo[m.key]) for m in self.front()],
            out=self.rundir.path,
            paths=self.rundir.paths(),
            generations=self.generation,
            evaluations=self.counters["evaluations"],
            cache_hits=self.counters["cache_hits"],
            errors=self.counters["errors"],
            recovered=self.recovered,
            history=self.history,
        )


def _restore_hof(hof: tools.HallOfFame, items: list[Member]) -> None:
    """Put saved members back in their saved order (items best first, keys ascending)."""
    hof.items = list(items)
    hof.keys = [m.fitness for m in reversed(items)]


# ---- entry point ------------------------------------------------------------------------
def layer_counts(paths: Sequence[str]) -> tuple[int, ...]:
    """Decoder layers per source, read from each source's config; no weights (and, for a plain HF folder,
    not even transformers) are loaded. The workers check the sources fully when they load them."""
    counts = []
    for p in paths:
        config_file = Path(p).expanduser() / "config.json"
        n = None
        if config_file.is_file():
            try:
                data = json.loads(config_file.read_text())
                n = data.get("num_hidden_layers") or (data.get("text_config") or {}).get("num_hidden_layers")
            except (OSError, ValueError, AttributeError):
                n = None
        if not isinstance(n, int) or n < 1:
            from dfs_merge.sources import locate, read_config

            config, _ = read_config(locate(p))
            n = int(config.num_hidden_layers)
        counts.append(n)
    return tuple(counts)


def run_evolution(
    cfg: RunConfig,
    *,
    resume: bool = False,
    evaluate: GenomeEvaluator | None = None,
    report_evaluate: GenomeEvaluator | None = None,
    select_evaluate: GenomeEvaluator | None = None,
    report: bool = True,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> RunResult:
    """Run (or resume) the search a config describes, writing everything under `cfg.out`.

    `evaluate` replaces the real per-genome work (stitch + lm-eval) with any picklable
    `Genome -> Evaluation` callable; `report_evaluate` likewise for the report tasks
    (by default the real work on the test split when `report_tasks` is set and
    `evaluate` is not given); the final choice on `select_tasks` uses the real work on the
    validation split, or `select_evaluate`. `report=False` skips scoring the winners on the report
    tasks and that choice.
    """
    template = Genome.empty(cfg.sources, layer_counts(cfg.sources), cfg.repeats, cfg.scaling, cfg.constraints)
    try:
        seeds = seed_genomes(template, cfg.seed_routes)
    except GenomeError as err:
        raise ConfigError(f"seed_routes: {err}") from None
    try:
        repair(seeds[0], random.Random(0))
    except GenomeError as err:
        raise ConfigError(f"constraints: no route over these sources meets them ({err})") from None
    if len(seeds) > cfg.population:
        raise ConfigError(f"seed_routes: {len(seeds)} distinct seeds (with the sources themselves) do not fit "
                          f"population {cfg.population}")
    rundir = RunDir.open(cfg, resume)
    records = rundir.read_evals() if resume else []
    state = rundir.read_checkpoint() if resume else None
    if resume and state is None and not records:
        log(f"nothing to resume in {rundir.path}; starting a new run")
    fn: GenomeEvaluator = evaluate if evaluate is not None else ModelEvaluator(cfg, "dev")
    evaluator = _LazyEvaluator(cfg, fn)
    try:
        evo = Evolution(cfg, template, rundir, evaluator, log, progress)
        evo.restore(records, state)
        if not evo.finished:
            evo.run()
        evaluator.close()  # free the workers before the report starts its own
        if report_evaluate is None and isinstance(fn, ModelEvaluator) and cfg.report_tasks:
            report_evaluate = fn.for_split("test")  # in-process: shares the sources already loaded
        if select_evaluate is None and isinstance(fn, ModelEvaluator) and cfg.select_tasks:
            select_evaluate = fn.for_split("val")
        return evo.finish(report_evaluate if report else None, select_evaluate if report else None)
    finally:
        evaluator.close()
        rundir.close()


class _LazyEvaluator(Evaluator):
    """Starts the configured backend on first use, so a finished run resumes without loading anything."""

    def __init__(self, cfg: RunConfig, fn: GenomeEvaluator):
        self.cfg = cfg
        self.fn = fn
        self.inner: Evaluator | None = None

    @property
    def started(self) -> bool:
        return self.inner is not None

    def submit(self, genomes: Sequence[Genome]) -> Iterator[tuple[str, Evaluation]]:
        if not genomes:
            return iter(())
        if self.inner is None:
            self.inner = make_evaluator(self.cfg, self.fn)
        return self.inner.submit(genomes)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None
