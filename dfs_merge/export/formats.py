"""The export formats: one table row per `dfs-merge export --format`, naming the module that writes it.

A format's module provides two functions (`FormatModule`): `precheck(genome, options)`, the checks that need
no weights, run before any source is loaded, and `write(genome, out, options, progress)`, which writes `out`
and returns its path. The table names each module by its dotted path and imports it only when its format is
used, so `--format`'s choices and the option checks load nothing heavy. A new format is one module and one
row: `FORMATS["name"] = ExportFormat("name", "file", "package.module")`.

A genome whose base (source 0) is a vision-language model is written by the row's `vision_module` (the HF
checkpoint's: `dfs_merge.export.vlm`, the VLM with its language model replaced); a format without one refuses
it in one line saying why (`vision_refusal`). `ExportFormat.load_for(genome)` picks the module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, cast

from dfs_merge.errors import ExportError, SourceError

if TYPE_CHECKING:
    from dfs_merge.export.progress import Progress
    from dfs_merge.genome_files import CandidateGenome

__all__ = ["FORMATS", "ExportFormat", "ExportOptions", "FormatModule", "check_options"]


@dataclass(frozen=True)
class ExportOptions:
    """What `dfs-merge export` passes to a format: the options every format takes, then those only some read
    (`ExportFormat.options`), each at its default where not given."""

    force: bool = False  # replace an existing output
    verify: str = "quick"  # quick, full or off
    dtype: str | None = None  # the dtype written (GGUF: the one its sources are loaded in)
    device: str = "cpu"
    quant: str | None = None  # the GGUF tensor type
    max_shard_size: str | None = None  # the HF checkpoint's largest shard
    copy_tokenizer: bool = True  # the HF checkpoint's tokenizer files


class FormatModule(Protocol):
    """What a format's module provides."""

    def precheck(self, genome: CandidateGenome, options: ExportOptions) -> None:
        """Refuse what the format cannot write, from the genome and its sources' configs only (no weights)."""

    def write(self, genome: CandidateGenome, out: Path, options: ExportOptions, progress: Progress) -> Path:
        """Write `genome` as `out` (already checked as an output) and return its path."""


@dataclass(frozen=True)
class ExportFormat:
    """One `--format`: its name, whether `--out` is a folder or a file, the module that writes it (dotted path),
    and the `ExportOptions` fields only it reads."""

    name: str
    out: Literal["folder", "file"]
    module: str
    options: tuple[str, ...] = ()
    vision_module: str | None = None  # writes a genome whose base is a vision-language model; None: refused
    vision_refusal: str = ""  # why this format cannot write one

    def load(self) -> FormatModule:
        """The format's module, imported on first use."""
        return cast("FormatModule", importlib.import_module(self.module))

    def load_for(self, genome: CandidateGenome) -> FormatModule:
        """The module that writes `genome`: the format's, or where its base (source 0) is a vision-language model,
        `vision_module` (an ExportError saying why, for a format that cannot write one). A base that cannot be
        found is left to the format's own checks to refuse."""
        from dfs_merge.models.folders import locate, vision_family

        try:
            vision = vision_family(locate(genome.sources[0]))
        except SourceError:
            vision = None
        if vision is None:
            return self.load()
        if self.vision_module is None:
            raise ExportError(f"--format {self.name}: source 0 is a vision-language model ({vision.name}), and "
                              f"{self.vision_refusal}; export it with --format hf")
        return cast("FormatModule", importlib.import_module(self.vision_module))


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("hf", "folder", "dfs_merge.export.checkpoint", ("max_shard_size", "copy_tokenizer"),
                 vision_module="dfs_merge.export.vlm"),
    ExportFormat("gguf", "file", "dfs_merge.export.gguf", ("quant",),
                 vision_refusal="llama.cpp keeps a vision-language model's vision tower and projector in a separate "
                                "mmproj file, which dfs-merge does not write"),
    ExportFormat("mergekit", "file", "dfs_merge.export.mergekit",
                 vision_refusal="mergekit's configs merge language models only: they cannot place a vision tower "
                                "and projector around a merged language model"),
)}

# the options only some formats read: the flag that gives each, and what the formats that read it do
_OWN_OPTIONS: dict[str, tuple[str, str]] = {
    "quant": ("--quant {value}", "has tensor types; drop it or add --format {owner}"),
    "max_shard_size": ("--max-shard-size", "writes shards and tokenizer files; drop it"),
    "copy_tokenizer": ("--no-copy-tokenizer", "writes shards and tokenizer files; drop it"),
}
_DEFAULTS = ExportOptions()


def check_options(fmt: ExportFormat, options: ExportOptions) -> None:
    """Refuse, in one line naming the format that reads it, an option given that `fmt` does not read (`--quant`
    for anything but GGUF), rather than ignore it."""
    for name, (flag, does) in _OWN_OPTIONS.items():
        value = getattr(options, name)
        if name in fmt.options or value == getattr(_DEFAULTS, name):
            continue
        owner = next(f.name for f in FORMATS.values() if name in f.options)
        raise ExportError(f"{flag.format(value=value)}: only --format {owner} {does.format(owner=owner)}")
