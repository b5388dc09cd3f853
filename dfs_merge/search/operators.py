"""Individuals and the variation operators that the algorithms share.

An `Individual` is what DEAP's operators see: the inclusion bits and the scales as lists they edit in
place, plus the repaired `genome` and its `key`, set by `settle` after every change. Repairing makes a
genome meet its hop constraints before it is evaluated. A genome of either kind (`CandidateGenome`) goes
through the same operators: a parameter-space recipe has no bits, only continuous genes, and no constraints.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

from deap import base, tools

from dfs_merge.genome import Genome
from dfs_merge.genome_files import CandidateGenome
from dfs_merge.merging.recipe import Recipe

if TYPE_CHECKING:
    from dfs_merge.config import RunConfig

Rng = random.Random | ModuleType  # `random.Random` or the `random` module itself


# ---- constraints ------------------------------------------------------------------------
def repair(genome: CandidateGenome, rng: Rng) -> CandidateGenome:
    """Make a genome meet its hop constraints: switch random included bits off while the route is too
    long, random excluded bits on while it is too short (never empty). Raises GenomeError if impossible.
    A recipe, which has no inclusion bits and no constraints, is returned as it is."""
    if not isinstance(genome, Genome):
        genome.check()
        return genome
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


def scale_genes(genome: CandidateGenome) -> list[int]:
    """Indices of the scales that the genome's route actually uses (every value of a recipe, which has no slots)."""
    if not isinstance(genome, Genome):
        return list(range(len(genome.scales)))
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


def clip(x: float, low: float, high: float) -> float:
    """`x` limited to [low, high]."""
    return min(high, max(low, float(x)))


Bounds = list[tuple[float, float]]
"""(low, high) of each continuous gene."""


def gene_bounds(cfg: RunConfig, template: CandidateGenome) -> Bounds:
    """The range of each continuous gene: `scale_range` for a route's scales; for a parameter-space recipe
    the config's `merge.weight_range` for its weights and `merge.density_range` for its densities."""
    if isinstance(template, Recipe):
        return template.bounds(cfg.merge.weight_range, cfg.merge.density_range)
    return [tuple(cfg.scale_range)] * len(template.scales)


def clip_all(values: Sequence[float], bounds: Bounds) -> list[float]:
    """Each value limited to its gene's range."""
    return [clip(x, lo, hi) for x, (lo, hi) in zip(values, bounds, strict=True)]


# ---- fitness and individuals ------------------------------------------------------------
class ScoreFitness(base.Fitness):
    """One objective: the task score, maximised."""

    weights = (1.0,)


class ScoreHopsFitness(base.Fitness):
    """Score (max) and hops (min); for single-objective algorithms this orders by score, then fewer hops."""

    weights = (1.0, -1.0)


def fitness_class(objectives: Sequence[str]) -> type[base.Fitness]:
    """The DEAP fitness of a run's objectives."""
    return ScoreHopsFitness if "hops" in objectives else ScoreFitness


class Individual:
    """A candidate: bits and scales as lists DEAP's operators edit in place; `genome` and `key` once settled."""

    def __init__(self, bits: Sequence[int], scales: Sequence[float], fitness: base.Fitness,
                 genome: CandidateGenome | None = None):
        self.bits = list(bits)
        self.scales = list(scales)
        self.fitness = fitness
        self.genome = genome
        self.key = genome.key() if genome is not None else ""

    @classmethod
    def of(cls, genome: CandidateGenome, fitness: base.Fitness) -> Individual:
        """The individual of a genome that already meets its constraints."""
        return cls(genome.bits, genome.scales, fitness, genome)

    def settle(self, template: CandidateGenome, rng: Rng = random) -> Individual:
        """Repair the edited bits and scales into a genome that meets the constraints; set `genome` and `key`."""
        self.genome = repair(template.with_bits(self.bits, self.scales), rng)
        self.bits = list(self.genome.bits)
        self.key = self.genome.key()
        return self


class Vector(list):
    """A CMA-ES sample: T inclusion values (a slot is included where > 0), then the scales; with its genome."""

    def __init__(self, values: Sequence[float], fitness: base.Fitness, genome: CandidateGenome | None = None):
        super().__init__(float(x) for x in values)
        self.fitness = fitness
        self.genome: CandidateGenome | None = genome
        self.key = genome.key() if genome is not None else ""

    def settle(self, template: CandidateGenome, bounds: Bounds, rng: Rng = random) -> Vector:
        """Decode the values into a repaired genome (scales clipped to their bounds); set `genome` and `key`."""
        T = len(template.bits)  # noqa: N806 - the paper's name
        bits = [1 if x > 0 else 0 for x in self[:T]]
        scales = clip_all(self[T:], bounds)
        self.genome = repair(template.with_bits(bits, scales), rng)
        self.key = self.genome.key()
        return self


def as_vector(genome: CandidateGenome) -> list[float]:
    """A genome as CMA-ES values: +1 for an included slot, -1 for an excluded one, then the scales."""
    return [1.0 if b else -1.0 for b in genome.bits] + list(genome.scales)


Member = Individual | Vector
"""An algorithm's individual: bits and scales (`Individual`), or a CMA-ES sample (`Vector`)."""


def same_key(a: Member, b: Member) -> bool:
    """Hall of fame and front identity: the same canonical route."""
    return a.key == b.key


def member(genome: CandidateGenome, fitness: type[base.Fitness],
           objectives_of: Callable[[str], tuple[float, ...]]) -> Individual:
    """An evaluated genome as a hall-of-fame or front member; `objectives_of(key)` gives its fitness values."""
    ind = Individual.of(genome, fitness())
    ind.fitness.values = objectives_of(ind.key)
    return ind


def restore_members(container: tools.HallOfFame, items: Sequence[Member]) -> None:
    """Put saved members back into a hall of fame or Pareto front in their saved order (best first)."""
    container.items = list(items)
    container.keys = [m.fitness for m in reversed(items)]


# ---- variation ---------------------------------------------------------------------------
def uniform_individual(template: CandidateGenome, fitness: type[base.Fitness], bounds: Bounds) -> Individual:
    """A uniform random genome: each bit on with probability 1/2, each scale uniform in its bounds."""
    bits = [random.randint(0, 1) for _ in range(len(template.bits))]
    scales = [random.uniform(lo, hi) for lo, hi in bounds]
    return Individual(bits, scales, fitness())


def mate(a: Individual, b: Individual, bounds: Bounds, alpha: float = 0.5) -> tuple[Individual, Individual]:
    """Uniform crossover of the bits, blend crossover of the scales (clipped to their bounds)."""
    tools.cxUniform(a.bits, b.bits, indpb=0.5)
    if a.scales:
        tools.cxBlend(a.scales, b.scales, alpha)
        a.scales[:] = clip_all(a.scales, bounds)
        b.scales[:] = clip_all(b.scales, bounds)
    return a, b


def mutate(
    ind: Individual, template: CandidateGenome, bit_pb: float, sigma: float, bounds: Bounds,
    scale_pb: float | None = None,
) -> tuple[Individual]:
    """Flip each bit with probability `bit_pb`; add N(0, sigma) to each scale in use with probability
    `scale_pb` (default: one per route on average), clipped to its bounds."""
    tools.mutFlipBit(ind.bits, bit_pb)
    genes = scale_genes(template.with_bits(ind.bits, ind.scales))
    if genes:
        values = [ind.scales[i] for i in genes]
        tools.mutGaussian(values, 0.0, sigma, scale_pb if scale_pb is not None else 1.0 / len(genes))
        for i, x in zip(genes, values, strict=True):
            ind.scales[i] = clip(x, *bounds[i])
    return (ind,)


def select_dcd(pop: list[Member], k: int) -> list[Member]:
    """NSGA-II's binary tournament on dominance then crowding distance, for any k (DEAP wants multiples of 4)."""
    if len(pop) < 4:
        return [random.choice(pop) for _ in range(k)]
    chosen: list[Member] = []
    while len(chosen) < k:
        n = min(len(pop) - len(pop) % 4, 4 * math.ceil((k - len(chosen)) / 4))
        chosen += tools.selTournamentDCD(pop, n)
    return chosen[:k]


def variation_toolbox(cfg: RunConfig, template: CandidateGenome, fitness: type[base.Fitness]) -> base.Toolbox:
    """The DEAP toolbox of the bit-and-scale algorithms: how to make, vary and perturb individuals
    (each algorithm registers its own selection)."""
    bounds = gene_bounds(cfg, template)
    T = len(template.bits)  # noqa: N806 - the paper's name
    bit_pb = cfg.bit_flip_prob or 1.0 / max(1, T)
    tb = base.Toolbox()
    tb.register("individual", uniform_individual, template, fitness, bounds)
    tb.register("mate", mate, bounds=bounds)
    tb.register("mutate", mutate, template=template, bit_pb=bit_pb, sigma=cfg.scale_sigma, bounds=bounds,
                scale_pb=cfg.bit_flip_prob)
    # Generation 0 beyond the seeds: seeds with about three bits flipped and three scales moved (a recipe:
    # about three of its values).
    genes = T or len(template.scales)
    tb.register("perturb", mutate, template=template, bit_pb=min(0.5, max(bit_pb, 3.0 / max(1, T))),
                sigma=cfg.scale_sigma, bounds=bounds, scale_pb=min(1.0, 3.0 / max(1, genes)))
    return tb
