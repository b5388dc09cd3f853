"""Vision-language models (VLMs) as sources: their language model in the layer pool, the rest the VLM's.

A VLM (a vision tower, a projector, a language model and an LM head) stands in the pool as its language model,
seen as the causal LM of its text family (`text_model`): a `LlamaForCausalLM` (a `Gemma3ForCausalLM` for Gemma 3)
whose decoder layers, embeddings, final norm and LM head are the VLM's own modules, so that stitching,
parameter-space merging and text scoring treat it as any LLM source, and its layers join those of LLMs of the same
hidden space. `VisionModel.with_language_model(lm)` puts a stitched or merged causal LM back inside the VLM for
image + text inputs: the vision tower, the projector and the image-token handling stay the VLM's own, nothing is
copied, and the VLM's text config becomes the candidate's (its hops' count and attention types, which the VLM's
masks and KV cache follow).

`VisionFamily` holds the few facts that differ between VLM architectures (where the language model and the head
live, the Auto class that loads the VLM); `VISION_FAMILIES` lists those that are supported: LLaVA and LLaVA-NeXT
(`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`), Idefics3 and SmolVLM (a SigLIP tower whose
pictures are split into tiles, a pixel-shuffle connector, the language model at `model.text_model`) and Gemma 3
(`Gemma3ForConditionalGeneration`: a Gemma 3 text model, whose picture tokens attend to each other both ways by the
processor's `token_type_ids`). Another VLM (a `vision_config` in its config) is refused naming it
(`folders.vision_family`). Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel

__all__ = ["VISION_FAMILIES", "VisionFamily", "VisionModel", "supported_vision_types", "vision_family_for"]


@dataclass(frozen=True)
class VisionFamily:
    """Where a VLM architecture keeps its language model and LM head (attribute paths of the loaded model) and the
    transformers Auto class that loads it."""

    name: str
    model_types: tuple[str, ...]
    language_model_attr: str = "model.language_model"  # the text decoder (e.g. a `LlamaModel`)
    head_attr: str = "lm_head"
    auto_class: str = "AutoModelForImageTextToText"

    def language_model(self, vlm: nn.Module) -> nn.Module:
        """The VLM's language model (the decoder without its head)."""
        return vlm.get_submodule(self.language_model_attr)

    def text_model(self, vlm: PreTrainedModel) -> PreTrainedModel:
        """The VLM's language model as the causal LM of its text config (e.g. `LlamaForCausalLM`), built over
        the VLM's own modules: no tensor is copied, and its weights are named as an LLM's of that family."""
        import torch
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        text_config = vlm.config.get_text_config(decoder=True)
        causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
        empty = _without_layers(text_config)
        with torch.device("meta"):
            view = causal_lm(empty)  # a shell: no layers, meta tensors only, replaced below
        setattr(view, view.base_model_prefix, self.language_model(vlm))
        view.set_output_embeddings(vlm.get_submodule(self.head_attr))
        view.config = text_config
        view.generation_config = copy.deepcopy(vlm.generation_config)
        return view.eval()

    def checkpoint_name(self, text_name: str, base_model_prefix: str = "model", head: str = "lm_head") -> str:
        """The VLM checkpoint's name of a tensor named `text_name` in the language model's causal LM, whose decoder is
        `base_model_prefix` and LM head `head` (`model.layers.3.mlp.down_proj.weight` ->
        `model.language_model.layers.3.mlp.down_proj.weight`; `lm_head.weight` -> `lm_head.weight`)."""
        for inner, outer in ((base_model_prefix, self.language_model_attr), (head, self.head_attr)):
            if text_name.startswith(inner + "."):
                return f"{outer}.{text_name[len(inner) + 1:]}"
        raise ValueError(f"{text_name}: not a tensor of the language model's causal LM "
                         f"({base_model_prefix}.*, {head}.*)")


@dataclass
class VisionModel:
    """A loaded VLM's parts besides its language model: the VLM itself (`model`, whose vision tower, projector and
    image-token handling a candidate keeps), its family and its processor (image preprocessing and tokenizer)."""

    family: VisionFamily
    model: PreTrainedModel
    processor: Any = None

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)

    def with_language_model(self, lm: PreTrainedModel) -> PreTrainedModel:
        """A model of the VLM's class whose language model and LM head are `lm`'s (a stitched route, a merge: a
        causal LM over this VLM's text space) and whose other modules are this VLM's own; nothing is copied."""
        import torch

        vlm = self.model
        config = copy.deepcopy(vlm.config)
        config.text_config = _without_layers(lm.config)
        with torch.device("meta"):
            shell = type(vlm)(config)  # no decoder layers, meta tensors only; every module is replaced below
        _adopt_around(shell, vlm, self.family.language_model_attr.split("."))
        owner, _, attr = self.family.language_model_attr.rpartition(".")
        setattr(shell.get_submodule(owner), attr, lm.get_submodule(lm.base_model_prefix))
        owner, _, attr = self.family.head_attr.rpartition(".")
        setattr(shell.get_submodule(owner) if owner else shell, attr, lm.get_output_embeddings())
        shell.config.text_config = lm.config  # one config: the cache and masks follow the candidate's hops
        shell.generation_config = copy.deepcopy(vlm.generation_config)
        if hasattr(lm, "route"):
            shell.route = lm.route
        leftover = [n for n, t in [*shell.named_parameters(), *shell.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"the {self.family.name} model kept unset tensors: {leftover[:3]}")
        return shell.eval()

    def vision_tensors(self) -> dict[str, Any]:
        """The VLM's tensors outside its language model and LM head (vision tower, projector, ...), by their names
        in its state dict."""
        skip = (self.family.language_model_attr + ".", self.family.head_attr + ".")
        return {n: t for n, t in self.model.state_dict().items() if not n.startswith(skip)}


VISION_FAMILIES: list[VisionFamily] = [
    VisionFamily("llava", ("llava",)),
    VisionFamily("llava_next", ("llava_next",)),
    VisionFamily("idefics3", ("idefics3",), language_model_attr="model.text_model"),
    VisionFamily("smolvlm", ("smolvlm",), language_model_attr="model.text_model"),
    VisionFamily("gemma3", ("gemma3",)),
]


def vision_family_for(model_type: str) -> VisionFamily | None:
    """The vision family that handles a config's `model_type`, or None when none does."""
    return next((f for f in VISION_FAMILIES if model_type in f.model_types), None)


def supported_vision_types() -> list[str]:
    """Every VLM model_type some vision family handles."""
    return sorted(t for f in VISION_FAMILIES for t in f.model_types)


def _without_layers(text_config: Any) -> Any:
    """A copy of a text config with no decoder layers: what an empty shell of its model is built from."""
    empty = copy.deepcopy(text_config)
    empty.num_hidden_layers = 0
    if hasattr(empty, "layer_types"):
        empty.layer_types = []
    return empty


def _adopt_around(shell: nn.Module, donor: nn.Module, path: list[str]) -> None:
    """Point the shell's modules, parameters and buffers at the donor's own, except along `path` (the attribute
    names down to the language model): those modules stay the shell's and adopt their children in turn, and the
    language model itself is left for the caller to set."""
    for name, child in donor.named_children():
        if name != path[0]:
            setattr(shell, name, child)
        elif len(path) > 1:
            _adopt_around(getattr(shell, name), child, path[1:])
    for name, tensor in [*donor.named_parameters(recurse=False), *donor.named_buffers(recurse=False)]:
        setattr(shell, name, tensor)  # e.g. LLaVA-NeXT's `image_newline`
