"""The table of export formats: a new format is one module and one row, and `dfs-merge export` runs it."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from builders import assert_refused, run_cli

from dfs_merge.errors import ExportError
from dfs_merge.export.formats import FORMATS, ExportFormat, ExportOptions
from dfs_merge.genome import Genome
from dfs_merge.genome_files import save_genome
from dfs_merge.route import Route


def toy_module() -> types.ModuleType:
    """A format that writes a genome's route as one JSON line, and refuses a route of more than 8 hops."""
    module = types.ModuleType("toy_export_format")
    seen: list[str] = []

    def precheck(genome: Genome, options: ExportOptions) -> None:
        seen.append("precheck")
        if len(genome.decode()) > 8:
            raise ExportError("toy: at most 8 hops")

    def write(genome: Genome, out: Path, options: ExportOptions, progress) -> Path:
        seen.append("write")
        progress.say("writing the toy")
        out.write_text(json.dumps({"route": genome.decode().text(), "dtype": options.dtype}) + "\n")
        return out

    module.precheck, module.write, module.seen = precheck, write, seen
    return module


@pytest.fixture
def toy(monkeypatch):
    module = toy_module()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(FORMATS, "toy", ExportFormat("toy", "file", module.__name__))
    return module


def save(dirs, route: str, path: Path) -> Path:
    save_genome(Genome.from_route(Route.parse(route), [str(d) for d in dirs], [4, 4], 3), path)
    return path


def test_a_toy_format_runs_end_to_end(toy, tiny_source_dirs, tmp_path):
    genome = save(tiny_source_dirs, "0:0-1, 1:1-2, 0:3", tmp_path / "g.yaml")
    result = run_cli("export", genome, "--format", "toy", "--out", tmp_path / "route.json", "--dtype", "float16")
    assert result.code == 0, result.err
    assert result.out.strip() == f"wrote {tmp_path / 'route.json'}"
    assert "export: writing the toy" in result.err
    assert json.loads((tmp_path / "route.json").read_text()) == {"route": "0:0-1, 1:1-2, 0:3", "dtype": "float16"}
    assert toy.seen == ["precheck", "write"]


def test_a_toy_format_gets_the_common_checks(toy, tiny_source_dirs, tmp_path):
    genome = save(tiny_source_dirs, "0:0-3, 1:0-3, 0:0-3", tmp_path / "g.yaml")
    # its precheck refuses before anything is written
    assert_refused(run_cli("export", genome, "--format", "toy", "--out", tmp_path / "t.json"), "toy: at most 8 hops")
    assert not (tmp_path / "t.json").exists() and toy.seen == ["precheck"]
    # the options of other formats are refused, naming the format that reads them
    assert_refused(run_cli("export", genome, "--format", "toy", "--quant", "q8_0", "--out", tmp_path / "t.json"),
                   "--quant q8_0: only --format gguf has tensor types")
    assert_refused(run_cli("export", genome, "--format", "toy", "--no-copy-tokenizer", "--out", tmp_path / "t.json"),
                   "--no-copy-tokenizer: only --format hf writes shards")
    # its --out is a file, checked as every output is
    assert_refused(run_cli("export", genome, "--format", "toy", "--out", genome, "--force"), str(genome))
    assert toy.seen == ["precheck"]


def test_every_format_module_has_a_precheck_and_a_writer():
    for fmt in FORMATS.values():
        module = fmt.load()
        assert callable(module.precheck) and callable(module.write), fmt.name
