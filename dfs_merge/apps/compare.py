"""Scoring named candidates side by side and printing the tables the CLI shows.

Used by `dfs-merge eval` (one genome, the base, or each source alone) and by the
demo's comparison table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from dfs_merge.candidate import CandidateScorer, check_images
from dfs_merge.config import RunConfig
from dfs_merge.errors import GenomeError
from dfs_merge.evaluation import Evaluation
from dfs_merge.fitness.score import Fitness
from dfs_merge.genome import Genome, Hop, Route
from dfs_merge.genome_files import load_genome
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.metadata import check_same_sources
from dfs_merge.models.sources import SourcePool


def identity_route(pool: SourcePool) -> Route:
    """All of the base's layers in order, scales 1: the base model unchanged."""
    return Route(tuple(Hop(0, i) for i in range(pool.layers_per_source[0])))


def route_of(genome: Genome, pool: SourcePool) -> Route:
    """The genome's checked route, refused when its layout does not fit the loaded sources."""
    if tuple(genome.layout.layers) != pool.layers_per_source:
        raise GenomeError(
            f"genome has sources with {list(genome.layout.layers)} layers, the config's sources have "
            f"{list(pool.layers_per_source)}"
        )
    return genome.check()


def score_routes(pool: SourcePool, fitness: Fitness, routes: Mapping[str, Route]) -> dict[str, Evaluation]:
    """Stitch and score each named route."""
    score = CandidateScorer(pool, fitness)
    return {name: score(r) for name, r in routes.items()}


def task_table(evals: Mapping[str, Evaluation]) -> str:
    """One row per (candidate, task): metric, value, documents, seconds; then each candidate's score."""
    lines = [f"{'candidate':<22} {'task':<22} {'metric':<16} {'value':>10} {'docs':>5} {'seconds':>8}"]
    for name, ev in evals.items():
        if ev.error:
            lines.append(f"{name:<22} failed: {ev.error}")
            continue
        for t in ev.tasks.values():
            lines.append(f"{name:<22} {t.task:<22} {t.metric:<16} {t.value:>10.4f} {t.docs:>5} {t.seconds:>8.2f}")
        lines.append(f"{name:<22} {'(weighted score)':<22} {'':<16} {ev.score:>10.4f} {'':>5} {ev.seconds:>8.2f}  hops {ev.hops}")
    return "\n".join(lines)


def evaluate_for_cli(
    cfg: RunConfig,
    genome: str | Path | None = None,
    split: str = "dev",
    sources_only: bool = False,
    out: Callable[[str], None] = print,
) -> dict[str, Evaluation]:
    """`dfs-merge eval`: score a genome file (a route or a parameter-space recipe), the base unchanged, or each
    source's own model; print the table."""
    g = load_genome(genome) if genome else None
    if g is not None:  # the genome's route over other weights would be another model, silently
        check_same_sources(g.sources, g.fingerprints, cfg.sources, f"genome {genome}")
    fitness = Fitness.from_config(cfg, split=split)  # a bad task fails before any model is loaded
    pool = SourcePool.load(cfg.sources, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    check_images(pool, fitness)
    if sources_only:
        evals = {
            f"source {i}": fitness.score(*pool.alone(i), hops=len(src.layers)) for i, src in enumerate(pool.sources)
        }
    elif g is not None:
        if not isinstance(g, Recipe):
            route_of(g, pool)  # a layout that does not fit the sources is refused before any scoring
        evals = {Path(genome).name: CandidateScorer(pool, fitness).genome(g)}
    else:
        evals = score_routes(pool, fitness, {"base": identity_route(pool)})
    out(task_table(evals))
    return evals


def baselines_for_cli(
    cfg: RunConfig,
    calibration: str | Path,
    split: str = "test",
    sizes: tuple[int, ...] = (2, 4, 6, 8),
    out: Callable[[str], None] = print,
) -> dict[str, Evaluation]:
    """`dfs-merge baseline`: score ShortGPT, angular-distance pruning and naive deepening of the base."""
    from dfs_merge.apps.baselines import baseline_routes, calibration_texts, check_sizes
    from dfs_merge.models.metadata import layer_counts

    check_sizes(sizes, layer_counts(cfg.sources[:1])[0])  # before anything is loaded
    fitness = Fitness.from_config(cfg, split=split)
    texts = calibration_texts(calibration)
    pool = SourcePool.load(cfg.sources[:1], device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    routes = baseline_routes(pool, texts, sizes)
    for name, route in routes.items():
        out(f"{name:<28} {len(route):>3} hops  {route.text()}")
    evals = score_routes(pool, fitness, routes)
    out(task_table(evals))
    return evals
