"""A genome's settings as an export writes them: the tokenizer's source, the dtypes, the chat template.

`export_settings` reads them from a genome (defaults where it has none); the chat-template helpers find a
template's text (a mergekit template name, `auto`, or the text itself), read one from a model folder, and
write one the way transformers 5 saves it. The HF checkpoint writer and the model card use them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dfs_merge.errors import ExportError
from dfs_merge.models.sources import DTYPES

if TYPE_CHECKING:
    from dfs_merge.genome_files import CandidateGenome

__all__ = ["Settings", "chat_template_text", "export_settings", "read_chat_template", "write_chat_template"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """A genome's settings for its export: the tokenizer's source, the dtypes, the chat template."""

    tokenizer_source: int = 0
    dtype: torch.dtype | None = None  # what the merge computes in (mergekit's `dtype`); None: as held
    out_dtype: torch.dtype | None = None  # as written; None: as `dtype`, else as the sources hold them
    chat_template: str | None = None


def export_settings(genome: CandidateGenome, dtype: str | None = None) -> Settings:
    """The settings of `genome` (the defaults where it sets none: a recipe sets none); `dtype` overrides its
    `out_dtype` (the CLI's `--dtype`)."""
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    given = genome.settings()
    compute = given.get("dtype")
    written = dtype or given.get("out_dtype") or compute
    tok = int(given.get("tokenizer_source", 0))
    if not 0 <= tok < len(genome.sources):
        raise ExportError(f"tokenizer_source {tok} names no source (there are {len(genome.sources)})")
    return Settings(tok, DTYPES[compute] if compute else None, DTYPES[written] if written else None,
                    given.get("chat_template"))


def chat_template_text(value: str, folders: list[Path | None]) -> str | None:
    """The Jinja text of a genome's `chat_template`: mergekit's bundled template of that name, `auto` (the
    sources' most common template; None when none has one), or the text itself."""
    if value == "auto":
        found = [t for t in (read_chat_template(f) for f in folders if f is not None) if t]
        if not found:
            log.warning("chat_template auto: no source has a chat template; none is written")
            return None
        return Counter(found).most_common(1)[0][0]
    if len(value) < 256 and "\n" not in value and "{" not in value:
        try:
            from importlib.resources import files

            return (files("mergekit._data.chat_templates") / f"{value}.jinja").read_text()
        except ModuleNotFoundError:
            raise ExportError(f"chat_template {value!r}: a mergekit template name needs mergekit installed "
                              "(pip install mergekit), or give the template's Jinja text") from None
        except OSError:
            raise ExportError(f"chat_template {value!r}: mergekit has no template of that name") from None
    return value


def read_chat_template(folder: Path) -> str | None:
    """A model folder's chat template: chat_template.jinja, else tokenizer_config.json's or chat_template.json's
    `chat_template` text; None when it has none."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    for name in ("tokenizer_config.json", "chat_template.json"):
        try:
            value = json.loads((folder / name).read_text()).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and value:
            return value
    return None


def write_chat_template(folder: Path, text: str) -> None:
    """Write `text` as the folder's chat template the way transformers 5 saves one (chat_template.jinja), and
    drop any other copy (chat_template.json, tokenizer_config.json's key) that would compete with it."""
    (folder / "chat_template.jinja").write_text(text)
    (folder / "chat_template.json").unlink(missing_ok=True)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if isinstance(data, dict) and "chat_template" in data:
            del data["chat_template"]
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
