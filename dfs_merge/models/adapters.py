"""LoRA adapters as sources: `BASE+ADAPTER`, as mergekit writes it, merged into the base's weights once at load.

`smollm2-135m-instruct+models/family/j` is the base `smollm2-135m-instruct` (any source the pool can load)
with the PEFT LoRA adapter in the folder `models/family/j` (`adapter_config.json` and
`adapter_model.safetensors`; a pickled `adapter_model.bin` is refused). The merge is PEFT's own
(`PeftModel.from_pretrained` then `merge_and_unload(safe_merge=True)`), in memory, over a shell model whose
parameters are the base's own tensors: the adapted weights come out as new tensors and every other tensor
stays shared with the base, so base + two adapters hold little more than one model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dfs_merge.errors import DfsMergeError, SourceError, one_line

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"


def split_source(path: str) -> tuple[str, Path | None]:
    """`BASE+ADAPTER` as (base, adapter folder); any other source (an existing path included) as (path, None)."""
    if "+" not in path or Path(path).expanduser().exists():
        return path, None
    base, _, adapter = path.rpartition("+")
    if not base or not adapter:
        raise SourceError(f"{path}: expected BASE+ADAPTER (a source, '+', a LoRA adapter folder)")
    return base, Path(adapter).expanduser()


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter's config, after checking the folder holds a LoRA adapter with safetensors weights."""
    if not folder.is_dir():
        raise SourceError(f"{folder}: no such adapter folder")
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise SourceError(f"{folder}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        if (folder / PICKLED_WEIGHTS).is_file():
            raise SourceError(f"{folder}: the adapter's weights are pickled ({PICKLED_WEIGHTS}), which is not loaded "
                              f"for safety; convert them to {ADAPTER_WEIGHTS}")
        raise SourceError(f"{folder}: the adapter has no {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SourceError(f"{config_file}: unreadable adapter config ({one_line(err)})") from None
    if not isinstance(config, dict):
        raise SourceError(f"{config_file}: not a JSON object")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise SourceError(f"{folder}: a {config.get('peft_type')!r} adapter; only LoRA adapters can be merged")
    return config


def _same_base(recorded: str, base: str, base_folder: Path) -> bool:
    """Whether an adapter's `base_model_name_or_path` names this base: the same name or folder, or the same
    last path component (`HuggingFaceTB/SmolLM2-135M-Instruct` and `smollm2-135m-instruct`)."""
    if recorded in (base, str(base_folder)):
        return True
    p = Path(recorded).expanduser()
    if p.exists() and p.resolve() == base_folder.resolve():
        return True
    return recorded.rstrip("/").rsplit("/", 1)[-1].lower() in {base.rstrip("/").rsplit("/", 1)[-1].lower(),
                                                                base_folder.name.lower()}


def check_base(folder: Path, config: dict[str, Any], base: str, base_folder: Path) -> None:
    """Refuse an adapter that was trained on another base than `base` (when its config names one)."""
    recorded = config.get("base_model_name_or_path")
    if recorded and not _same_base(str(recorded), base, base_folder):
        raise SourceError(f"{folder}: the adapter was trained on {recorded}, not on {base}")


def merged_model(base_model: Any, folder: Path) -> Any:
    """A model whose weights are `base_model`'s with the LoRA adapter in `folder` merged in; every tensor the
    adapter does not touch is the base's own (shared, not copied). The base is left unchanged."""
    import copy

    import torch
    from peft import PeftModel

    # A copy of the module tree whose parameters are new Parameter objects over the base's storage (and whose
    # buffers are the base's own): PEFT's safe merge then gives each adapted weight new storage, in the shell only.
    memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.data, requires_grad=False) for p in base_model.parameters()}
    memo.update({id(b): b for b in base_model.buffers()})
    shell = copy.deepcopy(base_model, memo)
    try:
        peft_model = PeftModel.from_pretrained(shell, str(folder), is_trainable=False)
        merged = peft_model.merge_and_unload(safe_merge=True)  # safe: new tensors, the base's stay as they are
    except Exception as err:  # noqa: BLE001 - peft raises many kinds for an adapter that does not fit
        raise SourceError(f"{folder}: the adapter does not fit its base ({one_line(err)})") from None
    return merged.eval().requires_grad_(False)


def resolve_source(p: str, base: Path) -> str:
    """A source path relative to `base` (a config's or genome file's folder) if it exists there and not as
    given; names and other paths unchanged; each part of `BASE+ADAPTER` on its own."""
    try:
        source, adapter = split_source(p)
    except DfsMergeError:
        return p
    if adapter is not None:
        return f"{resolve_source(source, base)}+{resolve_source(str(adapter), base)}"
    try:
        candidate = base / p
        if not Path(p).is_absolute() and not Path(p).exists() and candidate.exists():
            return str(candidate)
    except (OSError, ValueError):  # a name too long, a NUL byte: no such path, so leave it for its user to refuse
        pass
    return p
