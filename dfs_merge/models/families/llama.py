"""The Llama family: Llama, Mistral, Qwen2/3, SmolLM2 (pre-norm RMSNorm blocks)."""

from __future__ import annotations

import torch

from dfs_merge.models.families.base import Family


class LlamaFamily(Family):
    """Pre-norm blocks: each sublayer reads a normalised stream and adds `o_proj` / `down_proj` output to it."""

    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    residual_writers = ("self_attn.o_proj", "mlp.down_proj")

    def fold_scale(self, layer_state: dict[str, torch.Tensor], factor: float) -> None:
        """Divide the two residual writers (weights and any bias) by the running scale product."""
        for prefix in self.residual_writers:
            for suffix in (".weight", ".bias"):
                name = prefix + suffix
                if name in layer_state:
                    layer_state[name] = layer_state[name] / factor
