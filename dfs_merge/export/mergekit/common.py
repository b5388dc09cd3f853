"""The vocabulary every mergekit config shares, out and in: model references, settings, layer ranges, dtypes.

mergekit semantics this module relies on (mergekit 0.1.5, `config.py`, `common.py`):

- a model is a path or a Hub name, `BASE+LORA` (or the long form `{model: {path}, lora: {path}}`) for a
  LoRA adapter applied to a base;
- a numeric parameter is a number, a gradient (a list of numbers interpolated over a slice's layers at
  `t`), or a list of `{filter, value}` entries resolved per tensor to the first whose `filter` is a
  substring of the tensor's name (no filter, or `*`, matches all); no match leaves it unset;
- `tokenizer_source` is `base`, `union`, `model:NAME` or a model's path (or `tokenizer.source`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dfs_merge.errors import ExportError, GenomeError
from dfs_merge.inputs import NoAliasDumper
from dfs_merge.models.adapters import split_source
from dfs_merge.models.sources import locate
from dfs_merge.outputs import check_output

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["base_model", "check_config_output", "distinct_models", "dump_config", "layer_range", "merge_dtype",
           "model_name", "model_reference", "resolve_setting", "same_path", "tokenizer_source"]


# --------------------------------------------------------------------------- writing


def model_reference(source: str) -> str:
    """How mergekit names a source: its local folder, with `+ADAPTER` (mergekit's LoRA syntax) for an adapter."""
    base, adapter = split_source(source)
    folder = str(locate(base).resolve())
    return f"{folder}+{adapter.resolve()}" if adapter is not None else folder


def merge_dtype(config: PretrainedConfig) -> str:
    """The dtype a mergekit config merges a model in by default: the float dtype its HF config says the
    weights are stored in, else float32."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(d).replace("torch.", "") if d is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def dump_config(data: dict[str, Any]) -> str:
    """One config document as YAML, keys in the order given, lists of numbers on one line, no aliases."""
    return yaml.dump(data, Dumper=NoAliasDumper, sort_keys=False, default_flow_style=None, width=200)


def check_config_output(out: str | Path, inputs: Sequence[str], *, force: bool) -> Path:
    """The config file to write: refused when it exists (unless `force`) or is one of the `inputs`."""
    return check_output(out, kind="file", force=force, inputs=list(inputs), error=ExportError, what=None,
                        force_hint="force=True (--force)")


# --------------------------------------------------------------------------- reading


def model_name(entry: Any, where: str) -> str:
    """A slice's model as a source: a path or name, `BASE+LORA` kept as it is (a LoRA adapter source)."""
    model = entry.get("model") if isinstance(entry, dict) else None
    if isinstance(model, dict):  # mergekit's long form {model: {path: ...}, lora: {path: ...}}
        inner, lora = model.get("model"), model.get("lora")
        model = inner.get("path") if isinstance(inner, dict) else None
        if isinstance(model, str) and model and lora:
            lora_path = lora.get("path") if isinstance(lora, dict) else None
            if not isinstance(lora_path, str) or not lora_path:
                raise GenomeError(f"{where}: its lora needs a 'path'")
            model = f"{model}+{lora_path}"
    if not isinstance(model, str) or not model:
        raise GenomeError(f"{where}: needs a 'model' path")
    return model


def base_model(data: dict[str, Any], where: str) -> Any:
    """A config's `base_model` as given, its long form (a mapping) read as a model name; None when unset."""
    value = data.get("base_model")
    return model_name({"model": value}, f"{where}: base_model") if isinstance(value, dict) else value


def same_path(a: str, b: str) -> bool:
    """Whether two model references name one model: the same text, or paths to the same folder."""
    if a == b:
        return True
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def distinct_models(models: Iterable[str]) -> list[str]:
    """The models in order of first appearance, each once (`same_path`)."""
    found: list[str] = []
    for m in models:
        if not any(same_path(m, s) for s in found):
            found.append(m)
    return found


def layer_range(entry: dict[str, Any], where: str) -> tuple[int, int]:
    """A slice source's `layer_range` [start, end), checked: two integers with 0 <= start <= end."""
    rng = entry.get("layer_range")
    if (not isinstance(rng, (list, tuple)) or len(rng) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng) or not 0 <= rng[0] <= rng[1]):
        raise GenomeError(f"{where}: layer_range must be [start, end] with 0 <= start <= end, got {rng!r}")
    return int(rng[0]), int(rng[1])


def resolve_setting(setting: Any, tensor: str, t: float) -> float | None:
    """mergekit's `evaluate_setting` for a numeric parameter: filters, then gradients over `t`."""
    if setting is None:
        return None
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, bool) or isinstance(setting, str):
        raise ValueError(f"not a number: {setting!r}")
    if isinstance(setting, (int, float)):
        return float(setting)
    if not isinstance(setting, list):
        raise ValueError(f"unexpected value {setting!r}")
    if not setting:
        return None
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(setting[i0]) + frac * float(setting[i1])
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond:
            raise ValueError(f"expected {{filter, value}} entries, got {cond!r}")
        filt = cond.get("filter")
        if filt is None or filt == "*" or (tensor and str(filt) in tensor):
            return resolve_setting(cond["value"], tensor, t)
    return None


def tokenizer_source(data: dict[str, Any], sources: Sequence[str], where: str) -> int:
    """The source index of a config's `tokenizer_source` (or `tokenizer.source`): `base` (or none) is 0,
    `model:NAME` (older mergekit's syntax) or a model's path names one of the sources."""
    tok = data.get("tokenizer_source")
    spec = data.get("tokenizer")
    if spec is not None:
        if not isinstance(spec, dict):
            raise GenomeError(f"{where}: tokenizer: expected a mapping")
        changed = next((k for k in ("tokens", "pad_to_multiple_of") if spec.get(k)), None)
        if changed is not None:
            raise GenomeError(f"{where}: tokenizer.{changed}: mergekit changes the vocabulary (adds tokens or pads "
                              "the embeddings); a genome uses one source's tokenizer as it is")
        tok = spec.get("source", tok)
    if tok is None or tok == "base":
        return 0
    if tok == "union":
        raise GenomeError(f"{where}: tokenizer_source 'union': mergekit builds a new vocabulary from every model's; a "
                          "genome uses one source's tokenizer as it is (use base or model:NAME)")
    name = tok.removeprefix("model:") if isinstance(tok, str) else None
    k = next((i for i, s in enumerate(sources) if name and same_path(name, s)), None)
    if k is None:
        raise GenomeError(f"{where}: tokenizer_source {tok!r} is none of the config's models ({', '.join(sources)}); "
                          "a genome's tokenizer is one of its sources'")
    return k
