"""Pictures: a route as a hop-by-layer chart."""

from __future__ import annotations

from pathlib import Path

from dfs_merge.genome import Genome


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
