"""A route: the ordered hops a hidden state takes through the sources' decoder layers, each with its scale.

Both genome kinds decode to one (a DFS genome its included slots, a parameter-space recipe the base's layers
in order), and the stitched model, the scorer and the exporters take nothing else.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dfs_merge.errors import GenomeError

MAX_SLOTS = 2**16
"""The most slots (layers x repeats) and hops a genome may have: far above any model, low enough to allocate."""


@dataclass(frozen=True)
class Hop:
    """One step of a route: the hidden state, multiplied by `scale`, goes through `layer` of `source`."""

    source: int
    layer: int
    scale: float = 1.0


@dataclass(frozen=True)
class Route:
    """The ordered hops a hidden state takes from the embeddings (of source `embed_source`) to the final norm
    and LM head (of source `head_source`)."""

    hops: tuple[Hop, ...]
    embed_source: int = 0
    head_source: int = 0

    def __len__(self) -> int:
        return len(self.hops)

    def __iter__(self) -> Iterator[Hop]:
        return iter(self.hops)

    def __getitem__(self, i: int) -> Hop:
        return self.hops[i]

    @property
    def scales(self) -> list[float]:
        return [h.scale for h in self.hops]

    def text(self) -> str:
        """Readable form: runs of consecutive layers of one source, e.g. `0:0-19, 0:10-29`."""
        parts = []
        for source, start, end in self.runs():
            parts.append(f"{source}:{start}" if start == end else f"{source}:{start}-{end}")
        return ", ".join(parts)

    def runs(self) -> list[tuple[int, int, int]]:
        """(source, first layer, last layer) for each run of consecutive layers of one source."""
        runs: list[list[int]] = []
        for h in self.hops:
            if runs and runs[-1][0] == h.source and runs[-1][2] + 1 == h.layer:
                runs[-1][2] = h.layer
            else:
                runs.append([h.source, h.layer, h.layer])
        return [(source, first, last) for source, first, last in runs]

    def key(self) -> str:
        """Canonical key: equal for any two genomes that decode to the same hops and scales (and embeddings and
        head sources; the base's, 0, leave the key as it was before they could be chosen)."""
        text = ",".join(f"{h.source}:{h.layer}@{h.scale:.6g}" for h in self.hops)
        if self.embed_source or self.head_source:
            text += f"|embed {self.embed_source}|head {self.head_source}"
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    @classmethod
    def parse(cls, text: str, scales: Sequence[float] | None = None) -> Route:
        """Parse the readable form (`0:0-19, 1:10-29`); `scales` gives one value per hop (default 1)."""
        hops: list[tuple[int, int]] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            m = re.fullmatch(r"([0-9]+)\s*:\s*([0-9]+)(?:\s*-\s*([0-9]+))?", part)
            shown = part if len(part) <= 40 else part[:37] + "..."
            if not m:
                raise GenomeError(f"route: cannot read {shown!r}; expected SOURCE:FIRST-LAST such as 0:0-19")
            if any(g is not None and len(g) > 6 for g in m.groups()):  # int() of 5,000 digits raises
                raise GenomeError(f"route: {shown!r} names a source or layer beyond 999999")
            src, first = int(m.group(1)), int(m.group(2))
            last = int(m.group(3)) if m.group(3) is not None else first
            if len(hops) + abs(last - first) + 1 > MAX_SLOTS:
                raise GenomeError(f"route: more than {MAX_SLOTS} hops")
            step = 1 if last >= first else -1
            hops.extend((src, layer) for layer in range(first, last + step, step))
        if scales is None:
            scales = [1.0] * len(hops)
        if len(scales) != len(hops):
            raise GenomeError(f"hop_scales: expected {len(hops)} values (one per hop), got {len(scales)}")
        return cls(tuple(Hop(s, layer, float(x)) for (s, layer), x in zip(hops, scales, strict=True)))
