"""The Gemma 3 family (text models): sandwich norms around each sublayer, interleaved sliding attention."""

from __future__ import annotations

import torch

from dfs_merge.models.families.base import Family


class Gemma3Family(Family):
    """Gemma 3 normalises each sublayer's output (`post_*_layernorm`) before adding it to the stream.

    Dividing a projection would be undone by that norm, so a scale folds into the
    post-norm's gain instead. Gemma's RMSNorm multiplies by `(1 + weight)`, hence
    `weight' = (1 + weight) / factor - 1`, which is exact.
    """

    name = "gemma3"
    model_types = ("gemma3_text",)
    post_norms = ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")
    layer_weights = (*Family.layer_weights, "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")

    def fold_scale(self, layer_state: dict[str, torch.Tensor], factor: float) -> None:
        """Fold the scale into the gains of the two post-sublayer norms."""
        for name in self.post_norms:
            w = layer_state[name]
            layer_state[name] = ((1.0 + w.float()) / factor - 1.0).to(w.dtype)
