"""Where a source's files are and what its config says, without loading its weights.

`locate` turns a source path as written (a model folder, a GGUF file, a packaged model name, a Hub name in the
local Hugging Face cache, `BASE+ADAPTER`, or a registered kind's path, see `kinds`) into a local Hugging Face
folder; `read_config` reads that folder's config and finds its family. Importing this module imports neither
torch nor transformers (`read_config` does, to read a config), so `metadata` can fall back on it cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfs_merge.errors import SourceError, one_line
from dfs_merge.inputs import read_json
from dfs_merge.models import hub
from dfs_merge.models.adapters import read_adapter_config, split_source
from dfs_merge.models.kinds import source_kind

if TYPE_CHECKING:
    from dfs_merge.models.families import Family
    from dfs_merge.models.families.vision import VisionFamily

__all__ = ["locate", "read_config", "vision_family"]


def locate(path: str) -> Path:
    """A local HF folder for `path`: a folder as is; a GGUF file or packaged model name converted once; a Hub
    name, its snapshot in the local Hugging Face cache (`hub.resolve`); for `BASE+ADAPTER`, the base's (the
    adapter's files are checked here, merged at load); for a registered kind (`kinds`), the kind's."""
    base, adapter = split_source(path)
    if adapter is not None:
        read_adapter_config(adapter)
        return locate(base)
    kind = source_kind(path)
    if kind is not None:
        return kind.locate(path)
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SourceError(f"{path}: not a Hugging Face model folder (no config.json)")
        return p
    if not p.exists() and hub.is_hub_name(path):
        folder = hub.resolve(path)
        if not (folder / "config.json").is_file():
            raise SourceError(f"{path}: its snapshot in the Hugging Face cache ({folder}) has no config.json")
        return folder
    is_gguf = p.suffix == ".gguf" and p.is_file()
    is_name = not p.exists() and "/" not in path
    if is_gguf or is_name:
        from dfs_merge.models import store as model_store  # needed only to convert

        try:
            return Path(model_store.fetch(path))
        except model_store.ModelStoreError as err:
            raise SourceError(str(err)) from None
    if p.exists():
        raise SourceError(f"{path}: not a model folder or .gguf file")
    raise SourceError(f"{path}: no such model folder")


def read_config(folder: Path, trust_remote_code: bool = False) -> tuple[Any, Family]:
    """The HF config of a model folder and the family that handles it; for a vision-language model (see
    `vision_family`), its language model's config and family."""
    from transformers import AutoConfig

    from dfs_merge.models.families import family_for, supported_model_types

    data = _config_data(folder)
    model_type = str(data.get("model_type", ""))
    family = family_for(model_type)
    vision = _vision_family(folder, data) if family is None else None
    if family is None and vision is None:
        raise SourceError(
            f"{folder}: unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - any loader failure is the user's file
        raise SourceError(f"{folder}: cannot read the model config ({one_line(err)})") from None
    text = config.get_text_config(decoder=True)
    if vision is not None:
        text_type = str(getattr(text, "model_type", ""))
        family = family_for(text_type)
        if family is None:
            raise SourceError(f"{folder}: the language model of this {model_type} model is a {text_type!r}, which "
                              f"no family handles; supported: {', '.join(supported_model_types())}")
    return text, family


def vision_family(folder: Path) -> VisionFamily | None:
    """The vision family of a model folder whose config.json describes a vision-language model, None for a
    language model; an unsupported vision-language architecture (a `vision_config` in its config) is a
    SourceError naming it."""
    return _vision_family(folder, _config_data(folder))


def _vision_family(folder: Path, data: dict[str, Any]) -> VisionFamily | None:
    from dfs_merge.models.families.vision import supported_vision_types, vision_family_for

    model_type = str(data.get("model_type", ""))
    found = vision_family_for(model_type)
    if found is None and isinstance(data.get("vision_config"), dict):
        raise SourceError(f"{folder}: unsupported vision-language architecture {model_type!r}; supported: "
                          f"{', '.join(supported_vision_types())}")
    return found


def _config_data(folder: Path) -> dict[str, Any]:
    """The folder's config.json as a dict."""
    data = read_json(folder / "config.json", SourceError)
    if not isinstance(data, dict):
        raise SourceError(f"{folder / 'config.json'}: expected a JSON object, got {type(data).__name__}")
    return data
