"""Pictures: every PNG the project writes goes through `save_png`, which a crash cannot leave half written.

`route_png` draws a route as a hop-by-layer chart, `history_png` a run's score per generation.
matplotlib is imported only when a picture is drawn, with the Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfs_merge.atomic import atomic_file
from dfs_merge.genome import Genome

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` atomically (`atomic_file`); returns `path`. The figure is not closed."""
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    return Path(path)


def route_png(genome: Genome, path: str | Path, title: str | None = None) -> Path:
    """Draw the route: x = hop, y = layer, colour = source, marker size = scale; returns the file written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    route = genome.decode()
    fig, ax = plt.subplots(figsize=(max(6.0, len(route) * 0.22), 4.0), dpi=120)
    colors = plt.get_cmap("tab10")
    for source in sorted({h.source for h in route}):
        xs = [k for k, h in enumerate(route) if h.source == source]
        ys = [route[k].layer for k in xs]
        sizes = [30 * route[k].scale ** 2 for k in xs]
        ax.scatter(xs, ys, s=sizes, color=colors(source % 10), label=f"source {source}: {Path(genome.sources[source]).name}")
    ax.plot(range(len(route)), [h.layer for h in route], color="0.7", lw=0.8, zorder=0)
    ax.set_xlabel("hop")
    ax.set_ylabel("layer of its source")
    ax.set_title(title or f"{len(route)} hops: {route.text()}"[:110], fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return save_png(fig, path)
    finally:
        plt.close(fig)


def history_png(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Draw the best and mean score per generation into `path`; returns it, or None (nothing written)
    when `history` is empty.

    Each record has `generation` and `best`, and `mean` where the population had one (a record
    without it is left out of the mean's line).
    """
    if not history:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    gens = [h["generation"] for h in history]
    fig = Figure(figsize=(6, 3.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(gens, [h["best"] for h in history], marker="o", label="best so far")
    means = [(g, h["mean"]) for g, h in zip(gens, history, strict=True) if h.get("mean") is not None]
    if means:
        ax.plot(*zip(*means, strict=True), marker=".", label="population mean")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel("score (dev)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def recipe_png(recipe: Any, path: str | Path) -> Path:
    """Draw a parameter-space recipe: each merged source's weight (and density) per layer group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = 2 if recipe.densities else 1
    fig = Figure(figsize=(6, 2.6 * rows), dpi=110)
    FigureCanvasAgg(fig)
    spans = [f"{a}-{b - 1}" for a, b in map(recipe.group_range, range(recipe.layer_groups))]
    labels = ["embed", *spans, "head"] if recipe.ends else spans
    columns = list(range(len(labels)))
    for r, (name, values) in enumerate((("weight", recipe.weights), ("density", recipe.densities))[:rows]):
        ax = fig.add_subplot(rows, 1, r + 1)
        for s, row in zip(recipe.merged, values, strict=True):
            ax.plot(columns, row, marker="o", label=f"source {s}: {Path(recipe.sources[s]).name}")
        ax.set_xticks(columns, labels, fontsize=7)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.axes[-1].set_xlabel("layer group (layers)")
    fig.suptitle(f"{recipe.method}" + (f" over source {recipe.base}" if recipe.base is not None else ""), fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)
