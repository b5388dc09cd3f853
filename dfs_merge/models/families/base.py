"""The `Family` interface that each architecture file implements."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Family:
    """Architecture facts for one family of Hugging Face causal LMs (override what differs)."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    layers_attr: str = "model.layers"
    # The model's weights outside the decoder layers, as named in its state dict.
    non_layer_weights: tuple[str, ...] = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    # The weights of one decoder layer, named within the layer: a pre-norm block of attention and a gated MLP.
    layer_weights: tuple[str, ...] = (
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    )
    # Config fields that must be equal for two sources to share a hidden space.
    compat_fields: tuple[str, ...] = (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
    )

    @property
    def vocab_weights(self) -> tuple[str, str]:
        """The weights with a row per token of the vocabulary: the embeddings and the LM head (the first and the last
        of `non_layer_weights`)."""
        return self.non_layer_weights[0], self.non_layer_weights[-1]

    def config_value(self, config: Any, name: str) -> Any:
        """A config field, with `head_dim` derived when the config leaves it implicit."""
        value = getattr(config, name, None)
        if name == "head_dim" and value is None:
            value = config.hidden_size // config.num_attention_heads
        return value

    def inner_model(self, model: nn.Module) -> nn.Module:
        """The module that owns the decoder layer list (e.g. `LlamaModel` inside `LlamaForCausalLM`)."""
        owner = model
        for part in self.layers_attr.split(".")[:-1]:
            owner = getattr(owner, part)
        return owner

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a loaded model."""
        return getattr(self.inner_model(model), self.layers_attr.split(".")[-1])

    def layer_type(self, config: Any, layer: int) -> str:
        """Attention type of a layer ('full_attention' or 'sliding_attention'), read from the config."""
        types = getattr(config, "layer_types", None)
        return types[layer] if types else "full_attention"

    def fold_scale(self, layer_state: dict[str, torch.Tensor], factor: float) -> None:
        """Make one exported layer write `1/factor` of its output into the residual stream, in place.

        `factor` is the running product of hop scales up to this hop; the exported model
        then carries the stream divided by it, which the scale-invariant norms ignore.
        """
        raise NotImplementedError
