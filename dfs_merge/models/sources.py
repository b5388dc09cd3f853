"""Loading the source models once, checking they can be stitched, and exposing the layer pool.

Source 0 is the base: it supplies the config and, unless a genome names other sources
(`embed_source`, `head_source`, `tokenizer_source`), the tokenizer, the embeddings, the
final norm and the LM head. Every source supplies its decoder layers. A source may be a
local Hugging Face folder (safetensors), a GGUF file, a packaged model name (see
`dfs_merge.models.store`) or a Hub name `org/name` found in the local Hugging Face cache
(see `hub`); the same path given twice (a self-merge) is loaded once.
A source may also be a base plus a LoRA adapter, `BASE+ADAPTER` (see `adapters`), or a path of a kind
registered in `kinds` (a parameter-space recipe file: a hybrid's source). A loaded source remembers where it
came from (its folder, adapter and licence), for the export.

A vision-language model (a LLaVA, Idefics3, SmolVLM or Gemma 3 folder) is a source too: its language model stands
in the pool as a causal LM of its text family, and its vision tower, projector and processor stay with it
(`Source.vision`, see `families.vision`). With a VLM as the base, a candidate is scored as that VLM around the
stitched or merged language model (`SourcePool.candidate`).

The sources' vocabularies are the base's, or in a prefix relation with it (LLaVA's language model holds its base
LLM's tokens and `<image>`): `vocab` checks them and says how their rows line up (`SourcePool.vocab`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from dfs_merge.errors import IncompatibleSources, SourceError, one_line
from dfs_merge.models.adapters import check_base, merged_model, read_adapter_config, split_source
from dfs_merge.models.families import Family
from dfs_merge.models.families.vision import VisionFamily, VisionModel
from dfs_merge.models.folders import locate, read_config, vision_family
from dfs_merge.models.kinds import source_kind
from dfs_merge.models.metadata import layer_counts, source_license
from dfs_merge.models.vocab import VocabMap, vocab_map

__all__ = ["DTYPES", "Source", "SourcePool", "available_devices", "check_compatible", "layer_counts",
           "load_processor", "load_tokenizer", "locate", "read_config", "resolve_device", "ties_embeddings"]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Source:
    """One loaded source model, and where it came from.

    `folder` is the resolved local Hugging Face folder it was loaded from (for a GGUF file or a
    packaged name, the converted one; for `BASE+ADAPTER`, the base's); `license` is its licence as far
    as it can be told (see `source_license`); `adapter` the LoRA adapter folder merged in. All are None
    for a model built in memory. For a vision-language model, `model` is its language model as a causal LM
    and `vision` the rest of it (vision tower, projector, processor); None for a language model.
    """

    path: str
    model: PreTrainedModel
    family: Family
    folder: Path | None = None
    license: str | None = None
    adapter: Path | None = None  # the LoRA adapter merged into the base's weights (`BASE+ADAPTER`)
    vision: VisionModel | None = None  # a vision-language model's parts besides its language model

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.family.layers(self.model)


def available_devices() -> list[str]:
    """The `--device` values this machine can run on: auto, cpu, then cuda and cuda:N per visible GPU, and mps."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present. A name torch does not know (`tpu:99`), a kind of device this project does
    not run on, or one this machine lacks (CUDA without a GPU, a GPU index past the last) is a SourceError of
    one line naming it and the devices there are."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev: torch.device | None = torch.device(device)
    except (RuntimeError, TypeError, ValueError):  # an unknown type or a malformed index
        dev = None
    valid = available_devices()
    index_ok = dev is not None and (dev.index in (None, 0) or f"{dev.type}:{dev.index}" in valid)
    if dev is not None and (dev.type == "cpu" or (dev.type in valid and index_ok)):
        return dev
    shown = repr(device) if device.isprintable() and len(device) <= 40 else repr(device[:37] + "...")
    no_cuda = dev is not None and dev.type == "cuda" and "cuda" not in valid
    raise SourceError(f"device {shown}: {'torch sees no CUDA device' if no_cuda else 'not a device here'}; "
                      f"give one of {', '.join(valid)}")


def ties_embeddings(config: Any) -> bool:
    """Whether a model's config ties its LM head to its embeddings (its own or its text config's flag)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def check_compatible(configs: list[tuple[Any, Family]], tokenizers: list[Any] | None = None) -> VocabMap:
    """Refuse sources that cannot share a hidden space, naming the first field that differs; their vocabularies
    may differ where one is a prefix of the other (with `tokenizers`: see `vocab`). Returns how their vocabulary
    rows line up."""
    base_cfg, base_fam = configs[0]
    for i, (cfg, fam) in enumerate(configs[1:], start=1):
        if fam is not base_fam:
            raise IncompatibleSources(
                f"sources 0 and {i} differ in family: {base_fam.name} ({base_cfg.model_type}) "
                f"vs {fam.name} ({cfg.model_type})"
            )
        for field in base_fam.compat_fields:
            a, b = base_fam.config_value(base_cfg, field), fam.config_value(cfg, field)
            if a != b and field != "vocab_size":  # the vocabularies: `vocab_map`
                raise IncompatibleSources(f"sources 0 and {i} differ in {field}: {a} vs {b}")
    return vocab_map(configs, tokenizers)


class SourcePool:
    """The loaded sources: the layer pool `(source, layer)`, their embeddings, norms and heads, the base's
    tokenizer (`tokenizer`) and each source's (`tokenizer_for`), and how their vocabularies line up (`vocab`)."""

    def __init__(self, sources: list[Source], tokenizer: Any, paths: list[str] | None = None,
                 tokenizers: list[Any] | None = None, vocab: VocabMap | None = None):
        self.sources = sources
        self.tokenizer = tokenizer
        self.paths = paths or [s.path for s in sources]
        self.tokenizers = tokenizers
        self._vocab = vocab

    @property
    def vocab(self) -> VocabMap:
        """How the sources' vocabulary rows line up with the base's (`vocab.VocabMap`); for a pool built without
        one, made from its sources' configs and tokenizers."""
        if self._vocab is None:
            self._vocab = vocab_map([(s.config, s.family) for s in self.sources], self.tokenizers)
        return self._vocab

    def tokenizer_for(self, source: int = 0) -> Any:
        """The tokenizer of `source` (a genome's `tokenizer_source`); the base's for a pool built without the
        others'."""
        if source and self.tokenizers:
            return self.tokenizers[source]
        return self.tokenizer

    @classmethod
    def load(
        cls,
        paths: list[str],
        device: str = "cpu",
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ) -> SourcePool:
        """Load each distinct source once, after checking configs and tokenizers are compatible."""
        if not paths:
            raise SourceError("no sources given")
        if dtype not in DTYPES:
            raise SourceError(f"dtype {dtype!r} not one of {', '.join(DTYPES)}")
        dev = resolve_device(device)
        folders = [locate(p) for p in paths]
        distinct = list(dict.fromkeys(f.resolve() for f in folders))
        configs = {f: read_config(f, trust_remote_code) for f in distinct}
        tokenizers = {f: load_tokenizer(f, trust_remote_code) for f in distinct}
        vocab = check_compatible(
            [configs[f.resolve()] for f in folders], [tokenizers[f.resolve()] for f in folders]
        )
        kinds = {p: kind for p in paths if (kind := source_kind(p)) is not None}  # each loads its own
        models: dict[Path, PreTrainedModel] = {}
        visions: dict[Path, VisionModel] = {}
        for f in dict.fromkeys(f.resolve() for p, f in zip(paths, folders, strict=True) if p not in kinds):
            log.info("loading %s", f)
            vision = vision_family(f)
            models[f] = _load_model(f, DTYPES[dtype], dev, trust_remote_code, configs[f][1], vision)
            if vision is not None:  # the pool holds its language model; the rest stays with the source
                visions[f] = VisionModel(vision, models[f], load_processor(f, trust_remote_code))
                models[f] = vision.text_model(models[f])
        merged: dict[Path, PreTrainedModel] = {}  # BASE+ADAPTER: the base's tensors shared, adapted ones new
        sources = []
        for p, f in zip(paths, folders, strict=True):
            if p in kinds:
                sources.append(kinds[p].load(p, device, dtype, trust_remote_code))
                continue
            base, adapter = split_source(p)
            model = models[f.resolve()]
            if adapter is not None and f.resolve() in visions:
                raise SourceError(f"{p}: a LoRA adapter over a vision-language model "
                                  f"({visions[f.resolve()].model_type}) is not supported; merge it into the model "
                                  "first")
            if adapter is not None:
                check_base(adapter, read_adapter_config(adapter), base, f)
                key = adapter.resolve()
                if key not in merged:
                    log.info("merging the adapter %s into %s", adapter, f)
                    merged[key] = merged_model(model, adapter)
                model = merged[key]
            sources.append(Source(str(p), model, configs[f.resolve()][1], f.resolve(), source_license(base, f.resolve()),
                                  adapter.resolve() if adapter is not None else None, visions.get(f.resolve())))
        return cls(sources, tokenizers[folders[0].resolve()], list(paths), [tokenizers[f.resolve()] for f in folders],
                   vocab)

    @property
    def base(self) -> Source:
        return self.sources[0]

    @property
    def family(self) -> Family:
        return self.base.family

    @property
    def vision(self) -> VisionModel | None:
        """The base's vision tower, projector and processor where the base is a vision-language model, else None."""
        return self.base.vision

    def candidate(self, lm: PreTrainedModel, tokenizer_source: int = 0) -> tuple[PreTrainedModel, Any]:
        """What a candidate `lm` (a route stitched over this pool, or a merge of its sources: a causal LM) is scored
        as, and what tokenises for it: `lm` and the tokenizer of `tokenizer_source`; where the base is a
        vision-language model, the base VLM around `lm` and its processor (which reads images and text). A
        `tokenizer_source` of another vocabulary than the base's is a GenomeError."""
        if tokenizer_source:
            self.vocab.check_settings({"tokenizer_source": tokenizer_source})
        if self.vision is None:
            return lm, self.tokenizer_for(tokenizer_source)
        return self.vision.with_language_model(lm), self.vision.processor

    def alone(self, source: int) -> tuple[PreTrainedModel, Any]:
        """Source `source`'s own model as it is scored on its own, and what tokenises for it (its VLM and processor
        for a vision-language model)."""
        src = self.sources[source]
        if src.vision is None:
            return src.model, self.tokenizer_for(source)
        return src.vision.with_language_model(src.model), src.vision.processor

    @property
    def layers_per_source(self) -> tuple[int, ...]:
        return tuple(len(s.layers) for s in self.sources)

    def layer(self, source: int, layer: int) -> nn.Module:
        """The decoder layer `layer` of source `source`, shared, never copied."""
        return self.sources[source].layers[layer]

    def layer_type(self, source: int, layer: int) -> str:
        """The attention type of a pool layer, from its own source's config."""
        src = self.sources[source]
        return src.family.layer_type(src.config, layer)

    @property
    def device(self) -> torch.device:
        return self.base.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.model.dtype


def load_tokenizer(folder: Path, trust_remote_code: bool) -> Any:
    """The tokenizer of a model folder, its pad token the EOS token where it names none (batched scoring pads)."""
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise SourceError(f"{folder}: cannot load its tokenizer ({one_line(err)})") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_processor(folder: Path, trust_remote_code: bool) -> Any:
    """The processor of a vision-language model folder (its image preprocessing and tokenizer), its tokenizer's pad
    token the EOS token where it names none."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise SourceError(f"{folder}: cannot load its processor ({one_line(err)})") from None
    tok = getattr(processor, "tokenizer", None)
    if tok is None or not hasattr(processor, "image_processor"):
        raise SourceError(f"{folder}: its processor ({type(processor).__name__}) has no tokenizer and image processor")
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return processor


def _drop_load_report(record: logging.LogRecord) -> bool:
    """A logging filter that drops transformers' load report (`log_state_dict_report`) and keeps the rest."""
    return "LOAD REPORT" not in str(record.msg)


def _load_model(folder: Path, dtype: torch.dtype, device: torch.device, trust_remote_code: bool,
                family: Family | None = None, vision: VisionFamily | None = None) -> PreTrainedModel:
    """The folder's model as transformers loads it, with what transformers would only report refused in one line:
    tensors its config asks for that the weights lack (they would be random), and decoder layers in the weights
    beyond the config's `num_hidden_layers` (a model of fewer layers than the folder's). transformers' own load
    report (a table of every such tensor) is not printed: the refusal says it in one line; other unused tensors
    are one warning. A vision-language model (`vision`) is loaded whole, by its family's Auto class."""
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors:
        raise SourceError(f"{folder}: no .safetensors weights (pickled weights are not loaded, for safety)")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per source for a load of seconds buries the run's own lines
    # transformers logs its load report (a table of every missing or unused tensor) as one warning; not its level:
    # a level set on that logger turns on its tensor-parallel plan check, and more warnings with it
    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(_drop_load_report)
    try:
        auto = getattr(transformers, vision.auto_class) if vision is not None else AutoModelForCausalLM
        model, info = auto.from_pretrained(
            folder, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, output_loading_info=True
        )
    except Exception as err:  # noqa: BLE001
        raise SourceError(f"{folder}: cannot load the model ({one_line(err)})") from None
    finally:
        report.removeFilter(_drop_load_report)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would fill them with random values: another model than the folder's, silently
        raise SourceError(f"{folder}: the weights lack {len(missing)} tensors its config.json asks for (e.g. "
                          f"{missing[0]}); does the config claim more layers than the weights hold?")
    unexpected = sorted(info.get("unexpected_keys") or [])
    layers_attr = family.layers_attr if family else "model.layers"
    if vision is not None:
        layers_attr = vision.checkpoint_name(layers_attr)
    layer_key = re.compile(rf"{re.escape(layers_attr)}\.(\d+)\.")
    held = [int(m.group(1)) for k in unexpected if (m := layer_key.match(k))]
    if held:  # the config's layer count is short of the weights': transformers would drop the rest silently
        built = len(model.get_submodule(layers_attr)) if family else min(held)
        raise SourceError(f"{folder}: its config.json says {built} layers (num_hidden_layers) while its weights hold "
                          f"{max(held) + 1}; correct num_hidden_layers")
    if unexpected:
        log.warning("%s: %d tensors of its weights are not part of the model its config.json describes (e.g. %s); "
                    "not loaded", folder, len(unexpected), unexpected[0])
    return model.to(device).eval().requires_grad_(False)
