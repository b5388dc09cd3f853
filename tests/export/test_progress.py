"""`dfs-merge export` says what it is doing (loading, writing, verifying, with seconds); library calls stay quiet."""

from __future__ import annotations

import re

import pytest
from builders import run_cli

from dfs_merge.export import checkpoint as export
from dfs_merge.export.checkpoint import export_checkpoint
from dfs_merge.genome import Genome, Route
from dfs_merge.genome_files import save_genome


def genome(dirs) -> Genome:
    return Genome.from_route(Route.parse("0:0-1, 1:1-2, 0:3"), [str(d) for d in dirs], [4, 4], 2)


@pytest.mark.parametrize("beside", [False, True], ids=["busy machine", "free core"])
def test_cli_export_prints_its_stages(beside, tiny_source_dirs, tmp_path, monkeypatch):
    """With a core free the sources load for the comparison beside the writing, and the line says how long the
    comparison then waited for them; on a busy machine they load when the check needs them, in a stage of its
    own. The tensor check comes after them: it reads them (the tiny sources are stored in the written dtype)."""
    monkeypatch.setattr(export, "spare_core", lambda: beside)
    save_genome(genome(tiny_source_dirs), tmp_path / "g.yaml")
    result = run_cli("export", tmp_path / "g.yaml", "--out", tmp_path / "out")
    assert result.code == 0, result.err
    assert result.out.strip() == f"wrote {tmp_path / 'out'}"
    lines = [line for line in result.err.splitlines() if line.startswith("export: ")]
    text = "\n".join(lines)
    assert "export: streaming the tensors of 2 sources from safetensors files" in lines, text
    assert re.search(r"^export: writing 5 hops: \d+ tensors, \d+ MB in 1 shard \.\.\.$", text, re.M), text
    assert re.search(r"^export: wrote 1 shard \(\d+\.\d s\)$", text, re.M), text
    if beside:
        assert "export: loading 2 sources on cpu (float32) to compare, beside the writing ..." in lines, text
        loaded = r"^export: loaded 2 sources and ran the stitched model beside the writing \(\d+\.\d s; waited \d+\.\d s\)$"
    else:
        assert "export: loading 2 sources on cpu (float32) to compare ..." in lines, text
        loaded = r"^export: loaded 2 sources and ran the stitched model \(\d+\.\d s\)$"
    assert re.search(loaded, text, re.M), text
    assert re.search(r"^export: checked 48 tensors \(\d+\.\d s\)$", text, re.M), text
    assert re.search(r"^export: verify: 48 tensors \(\d+ MB\) read back equal bit for bit", text, re.M), text
    assert re.search(r"^export: compared \(\d+\.\d s\)$", text, re.M), text
    assert re.search(r"^export: verify: max\|Δlogit\|/max\|logit\| = .* on 2 prompts; no generation compared$",
                     text, re.M), text
    stages = [r"^export: loading 2 sources", r"^export: wrote 1 shard", loaded, r"^export: checked 48",
              r"^export: compared"]
    if not beside:
        stages[:2] = stages[1::-1]  # the loading starts once the writing is done
    at = [next(i for i, line in enumerate(lines) if re.search(pattern, line)) for pattern in stages]
    assert at == sorted(at), text
    assert "Traceback" not in result.err


def test_cli_export_verify_full_compares_generations(tiny_source_dirs, tmp_path):
    save_genome(genome(tiny_source_dirs), tmp_path / "g.yaml")
    result = run_cli("export", tmp_path / "g.yaml", "--out", tmp_path / "out", "--verify", "full")
    assert result.code == 0, result.err
    assert re.search(r"^export: verifying against the stitched model on 2 prompts \.\.\.$", result.err, re.M)
    assert re.search(r"^export: verify: max\|Δlogit\|/max\|logit\| = .* identical$", result.err, re.M), result.err


def test_cli_export_without_verify_says_no_verifying(tiny_source_dirs, tmp_path):
    save_genome(genome(tiny_source_dirs), tmp_path / "g.yaml")
    result = run_cli("export", tmp_path / "g.yaml", "--out", tmp_path / "out", "--no-verify")
    assert result.code == 0, result.err
    assert "export: wrote 1 shard" in result.err and "verif" not in result.err


def test_library_export_is_silent(tiny_pool, tiny_source_dirs, tmp_path, capfd):
    export_checkpoint(tiny_pool, genome(tiny_source_dirs), tmp_path / "out", max_shard_size="200KB")
    captured = capfd.readouterr()
    assert "export:" not in captured.err and "tensor" not in captured.err, captured.err
    assert captured.out == ""
