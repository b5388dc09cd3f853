"""Model families: the few architecture-specific facts the engine needs, one small file per family.

A family says where a causal LM keeps its decoder layers, the names of its weights
(inside a layer and outside the layers), which config fields two sources must share
to be stitched, the attention type of a layer, and how a hop's residual scale folds
into exported weights. Everything else (masks, rotary
embeddings, KV cache, `generate`) is the Hugging Face model's own code.
"""

from __future__ import annotations

from dfs_merge.models.families.base import Family
from dfs_merge.models.families.gemma3 import Gemma3Family
from dfs_merge.models.families.llama import LlamaFamily

FAMILIES: list[Family] = [LlamaFamily(), Gemma3Family()]


def family_for(model_type: str) -> Family | None:
    """The family that handles a config's `model_type`, or None when no family does."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def supported_model_types() -> list[str]:
    """Every model_type some family handles."""
    return sorted(t for f in FAMILIES for t in f.model_types)


__all__ = ["FAMILIES", "Family", "family_for", "supported_model_types"]
