"""Hostile input, round 2 (issue 30), the rest: a report of a run log that is a pipe, a YAML bomb of brackets under
`import-mergekit`, a device or shard size no machine has, a misspelt task in any task list, a source whose config
and weights disagree on its layers, slices of two hidden sizes, transformers' load table, a full disk under
`export`.

Each refusal is asserted as the user sees it (`builders.assert_refused`): exit code 2, one line besides progress
bars, no traceback, and nothing under the test's folder written or changed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]
from builders import CliResult, assert_refused, deadline, message_lines, run_cli, tree_state
from safetensors.torch import load_file, save_file
from synthetic import QUIET, TargetRoute, write_fake_sources

from dfs_merge.cli import join_dash_values
from dfs_merge.config import load_config
from dfs_merge.errors import SourceError
from dfs_merge.genome import Genome, Route
from dfs_merge.genome_files import save_genome
from dfs_merge.models.sources import available_devices, resolve_device
from dfs_merge.report import read_run
from dfs_merge.search.evolution import run_evolution

RUN = {"repeats": 2, "scaling": "slot", "tasks": {"prose_ppl_dev": 1.0}, "population": 6, "generations": 1, "seed": 0}


def refused_unchanged(root: Path, *argv: Any, phrases: tuple[str, ...] = ()) -> str:
    """Run the command; assert it is refused in one line and writes nothing under `root`."""
    before = tree_state(root)
    result = run_cli(*argv)
    assert_refused(result, *phrases)
    assert len(message_lines(result.err)) == 1, result.err
    assert tree_state(root) == before
    return result.err


@pytest.fixture()
def finished(tmp_path: Path) -> Path:
    """A finished synthetic run (two config-only sources) in tmp_path/run."""
    sources = write_fake_sources(tmp_path / "sources")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"sources": sources, **RUN, "out": str(tmp_path / "run")}))
    run_evolution(load_config(config), evaluate=TargetRoute(), **QUIET)
    return tmp_path / "run"


@pytest.fixture()
def sources(tiny_source_dirs, tmp_path) -> list[Path]:
    """Private copies of the two tiny sources (tests edit them)."""
    return [Path(shutil.copytree(d, tmp_path / f"src{i}")) for i, d in enumerate(tiny_source_dirs)]


def genome_file(folder: Path, sources: list[Path]) -> Path:
    """A genome over the tiny sources (route 0:0-1, 1:1, 0:2-3; repeats 2) as a file."""
    g = Genome.from_route(Route.parse("0:0-1, 1:1, 0:2-3"), [str(s) for s in sources], [4] * len(sources), 2)
    path = folder / "g.genome.yaml"
    save_genome(g, path)
    return path


def edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def eval_config(folder: Path, sources: list[Path], suite: Path) -> Path:
    """An eval config over `sources` and the tiny multiple-choice task (its out: is never written by eval)."""
    path = folder / "eval.yaml"
    path.write_text(yaml.safe_dump({"sources": [str(s) for s in sources], "repeats": 1, "tasks": {"tiny_mc": 1.0},
                                    "limit": 2, "eval_suites": [str(suite)], "max_length": 64,
                                    "out": str(folder / "run")}))
    return path


# --------------------------------------------------------------------------- report: what evals.jsonl is

def cli_bounded(*argv: Any, seconds: int = 120, memory: int = 6 * 2**30) -> subprocess.CompletedProcess[str]:
    """`dfs-merge ARGV` in a child process with a time limit and an address-space limit: a regression that reads a
    pipe or an endless device fails this test (a timeout, a MemoryError) instead of hanging it or filling the
    machine's memory."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-m", "dfs_merge.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=seconds, preexec_fn=limit, check=False)


@pytest.mark.skipif(not hasattr(os, "mkfifo") or resource is None, reason="needs FIFOs and rlimits (POSIX)")
@pytest.mark.parametrize("special", ["fifo", "device"])
def test_report_of_a_run_log_that_is_a_pipe_or_a_device_is_refused_without_waiting(finished, special):
    (finished / "evals.jsonl").unlink()
    if special == "fifo":
        os.mkfifo(finished / "evals.jsonl")
    else:
        (finished / "evals.jsonl").symlink_to("/dev/zero")
    for argv in (("report", finished), ("report", finished, "--out", finished.parent / "page.html")):
        before = tree_state(finished.parent)
        done = cli_bounded(*argv)
        assert_refused(CliResult(done.returncode, done.stdout, done.stderr),
                       "evals.jsonl: is not a regular file (a pipe, device or socket)")
        assert len(message_lines(done.stderr)) == 1 and tree_state(finished.parent) == before


def test_report_of_a_run_log_over_the_log_cap_is_refused(finished, monkeypatch):
    import dfs_merge.report

    size = (finished / "evals.jsonl").stat().st_size
    monkeypatch.setattr(dfs_merge.report, "MAX_LOG_BYTES", size - 1)  # the cap a resume reads logs under, lowered
    refused_unchanged(finished.parent, "report", finished, phrases=("evals.jsonl: larger than",))


def test_report_leaves_out_a_deeply_nested_log_line_with_a_note(finished):
    lines = (finished / "evals.jsonl").read_text().count("\n")
    with open(finished / "evals.jsonl", "a") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n")
    (finished / "checkpoint.json").write_text("[" * 100_000 + "]" * 100_000)
    (finished / "best.genome.yaml").write_text("a: &x 1\nb: *x\n")  # an alias, refused as every reader refuses it
    run = read_run(finished)
    assert len(run.evals) == lines
    assert "evals.jsonl: 1 line(s) that are not JSON records: skipped" in run.notes
    assert run.checkpoint is None and any(n.startswith("checkpoint.json could not be read (not valid JSON (nested")
                                          for n in run.notes)
    assert run.best is None and any("YAML aliases are not accepted" in n for n in run.notes)
    result = run_cli("report", finished)
    assert result.code == 0, result.err


# --------------------------------------------------------------------------- import-mergekit: bombs and pipes

def test_import_mergekit_of_deeply_nested_brackets_is_refused_without_parsing_it_twice(tmp_path, monkeypatch):
    """`read_yaml` refuses it (nested too deeply); the count of YAML documents that tells a mergekit-multi file,
    PyYAML's event parser (minutes over 100 kB of brackets), is not run on it: only on a file with a `---`."""
    parsed: list[int] = []
    real = yaml.parse

    def counting(stream, Loader=yaml.SafeLoader):  # noqa: N803 - yaml's own name
        parsed.append(len(stream))
        return real(stream, Loader=Loader)

    monkeypatch.setattr(yaml, "parse", counting)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("[" * 100_000)
    refused_unchanged(tmp_path, "import-mergekit", bomb, "--out", tmp_path / "g.genome.yaml",
                      phrases=("bomb.yaml: not valid YAML (nested too deeply)",))
    assert parsed == []
    nested_docs = tmp_path / "two.yaml"
    nested_docs.write_text("---\n" + "[" * 100_000 + "\n---\na: 1\n")
    refused_unchanged(tmp_path, "import-mergekit", nested_docs, "--out", tmp_path / "g.genome.yaml",
                      phrases=("two.yaml: not valid YAML (nested too deeply)",))
    assert parsed == []
    multi = tmp_path / "multi.yaml"
    multi.write_text("merge_method: linear\n---\nmerge_method: passthrough\n")
    refused_unchanged(tmp_path, "import-mergekit", multi, "--out", tmp_path / "g.genome.yaml",
                      phrases=("2 YAML documents, a mergekit-multi config",))
    assert len(parsed) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_import_mergekit_of_a_pipe_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "cfg.yaml")
    with deadline(60):
        refused_unchanged(tmp_path, "import-mergekit", tmp_path / "cfg.yaml", "--out", tmp_path / "g.genome.yaml",
                          phrases=("cfg.yaml: is not a regular file",))


def test_import_mergekit_of_slices_of_two_hidden_sizes_is_refused_naming_both(tiny_source_dirs, tmp_path):
    narrow = write_fake_sources(tmp_path / "narrow", n=1)[0]  # hidden_size 32; the tiny sources' is 48
    config = tmp_path / "frankenmerge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(tiny_source_dirs[0]), "layer_range": [0, 2]}]},
        {"sources": [{"model": narrow, "layer_range": [2, 4]}]},
    ]}))
    refused_unchanged(tmp_path, "import-mergekit", config, "--out", tmp_path / "g.genome.yaml",
                      phrases=("frankenmerge.yaml: sources 0 and 1 differ in hidden_size: 48 vs 32",))


# --------------------------------------------------------------------------- export flags

def test_a_device_no_machine_has_is_one_line_naming_the_valid_ones(sources, tmp_path):
    genome = genome_file(tmp_path, sources)
    valid = ", ".join(available_devices())
    for device in ("tpu:99", "garbage", "cuda:99", "meta", ""):
        refused_unchanged(tmp_path, "export", genome, "--out", tmp_path / "out", "--device", device,
                          phrases=(f"device {device!r}: ", f"give one of {valid}"))
    assert str(resolve_device("cpu")) == "cpu" and resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(SourceError, match=r"^device 'tpu:99': not a device here; give one of auto, cpu"):
        resolve_device("tpu:99")


@pytest.mark.parametrize("argv", [["--max-shard-size", "-5GB"], ["--max-shard-size=-5GB"], ["--max-shard-size", "0"],
                                  ["--max-shard-size", "-0.5 MB"]])
def test_a_shard_size_that_is_not_positive_says_so(sources, tmp_path, argv):
    genome = genome_file(tmp_path, sources)
    refused_unchanged(tmp_path, "export", genome, "--out", tmp_path / "out", *argv,
                      phrases=("max_shard_size: ", "the size must be positive"))


@pytest.mark.parametrize("argv, phrase", [
    (["study", "--held-out", "some"], "argument --held-out: invalid choice: 'some'"),
    (["export", "g.genome.yaml", "--out", "x", "--verify", "thorough"], "argument --verify: invalid choice"),
    (["export", "g.genome.yaml"], "the following arguments are required: --out"),
    (["no-such-command"], "argument command: invalid choice: 'no-such-command'"),
])
def test_a_command_line_argparse_refuses_is_one_line(tmp_path, argv, phrase):
    """A bad flag value, a missing argument or an unknown command: one line naming it (not argparse's whole usage
    first), exit code 2, nothing written."""
    err = refused_unchanged(tmp_path, *argv, phrases=(phrase, "--help)"))
    assert "usage:" not in err


def test_only_a_value_that_looks_negative_is_joined_to_its_flag():
    assert join_dash_values(["export", "g", "--max-shard-size", "-5GB"]) == ["export", "g", "--max-shard-size=-5GB"]
    assert join_dash_values(["export", "g", "--max-shard-size", "--force"]) == ["export", "g", "--max-shard-size",
                                                                                  "--force"]
    assert join_dash_values(["export", "--out", "-5GB"]) == ["export", "--out", "-5GB"]


# --------------------------------------------------------------------------- tasks checked before the search

@pytest.mark.parametrize("key", ["tasks", "select_tasks", "report_tasks"])
def test_a_misspelt_task_in_any_task_list_is_refused_before_the_search(tmp_path, key):
    """The real fitness would meet it only when it scores that split (select and report: after the whole search);
    every name is looked up before the run folder is made or a source loaded (the sources here are configs only)."""
    sources = write_fake_sources(tmp_path / "sources")
    lists: dict[str, Any] = {"tasks": {"prose_ppl_dev": 1.0}, "select_tasks": ["prose_ppl_val"],
                             "report_tasks": ["prose_ppl_test"]}
    lists[key] = {"no_such_task_xyz": 1.0} if key == "tasks" else ["prose_ppl_val", "no_such_task_xyz"]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"sources": sources, **RUN, **lists, "out": str(tmp_path / "run")}))
    refused_unchanged(tmp_path, "evolve", config, phrases=(f"{key}: unknown task 'no_such_task_xyz': not in the eval "
                                                           "suites nor lm-eval's registry",))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- sources whose files disagree

@pytest.mark.parametrize("layers", [0, 2])
def test_a_source_whose_config_says_fewer_layers_than_its_weights_hold_is_refused_at_load(sources, tiny_suite_dir,
                                                                                            tmp_path, layers):
    edit_config(sources[1], num_hidden_layers=layers)
    config = eval_config(tmp_path, sources, tiny_suite_dir)
    refused_unchanged(tmp_path, "eval", config, "--sources-only",
                      phrases=(f"src1: its config.json says {layers} layers (num_hidden_layers) while its weights "
                               "hold 4",))


@pytest.fixture()
def transformers_records() -> Iterator[list[logging.LogRecord]]:
    """What transformers logs (its library logger does not propagate to the root, so caplog sees none of it)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_a_source_missing_tensors_is_one_line_without_transformers_load_table(sources, tiny_suite_dir, tmp_path,
                                                                              transformers_records):
    weights = sources[1] / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if ".layers.3." not in k}, weights, metadata={"format": "pt"})
    config = eval_config(tmp_path, sources, tiny_suite_dir)
    filters = list(logging.getLogger("transformers.modeling_utils").filters)
    refused_unchanged(tmp_path, "eval", config, "--sources-only",
                      phrases=("src1: the weights lack 9 tensors its config.json asks for",))
    assert not [r for r in transformers_records if "LOAD REPORT" in r.getMessage() or "MISSING" in r.getMessage()]
    assert logging.getLogger("transformers.modeling_utils").filters == filters  # the filter is gone after the load


# --------------------------------------------------------------------------- a full disk under export

def test_a_full_disk_under_export_is_one_line_and_nothing_is_published(sources, tmp_path, monkeypatch):
    from dfs_merge.export import checkpoint

    real, shards = checkpoint._save_shard, []

    def fills_up(path, specs, get, *rest):
        shards.append(path)
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)  # some of it written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "_save_shard", fills_up)
    genome = genome_file(tmp_path, sources)
    out = tmp_path / "exports" / "merged"
    out.parent.mkdir()
    err = refused_unchanged(tmp_path, "export", genome, "--out", out)
    assert message_lines(err) == [f"dfs-merge: error: no space left on {out.parent}; nothing was published (the "
                                  "partial export was removed): free some space and export again"]
    assert shards and not shards[0].exists() and list(out.parent.iterdir()) == []
    monkeypatch.setattr(checkpoint, "_save_shard", real)
    result = run_cli("export", genome, "--out", out, "--verify", "off")  # space again: the same command publishes
    assert result.code == 0, result.err
    assert (out / "model.safetensors").is_file()


def test_a_full_disk_under_gguf_export_is_one_line_and_nothing_is_published(sources, tmp_path, monkeypatch):
    from dfs_merge.export import gguf

    written = []

    def fills_up(pool, genome, route, q, vocab, path, name, show):
        written.append(path)
        Path(path).write_bytes(b"GGUF" + b"\0" * 4096)  # some of it written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(gguf, "_write", fills_up)
    genome = genome_file(tmp_path, sources)
    out = tmp_path / "exports" / "merged.gguf"
    out.parent.mkdir()
    err = refused_unchanged(tmp_path, "export", genome, "--format", "gguf", "--out", out)
    assert message_lines(err) == [f"dfs-merge: error: no space left on {out.parent}; nothing was published: free "
                                  "some space and export again"]
    assert written and not Path(written[0]).exists() and list(out.parent.iterdir()) == []
