"""Hostile files and output paths: every command that reads a user's file or writes a path refuses a bad one
with exit code 2 and one line naming the problem, without a traceback and without writing anything.

Reading goes through `dfs_merge.inputs` (one reader: missing, folder, not UTF-8, YAML aliases, size cap),
writing is checked first by `dfs_merge.outputs.check_output`, and `dfs_merge.atomic.atomic_file` names its
temporaries after the writer's pid (a killed writer's are removed by the next write) and gives the file the
permissions a plain `open()` would.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from builders import assert_refused, run_cli, run_cli_unprivileged, run_unprivileged, tree_state, write_jsonl
from synthetic import write_fake_sources

from dfs_merge import atomic
from dfs_merge.atomic import Staging, atomic_file, write_atomic
from dfs_merge.config import ConstraintsConfig, load_config
from dfs_merge.errors import ConfigError, GenomeError
from dfs_merge.genome import Genome, Route
from dfs_merge.genome_files import save_genome
from dfs_merge.inputs import read_json, read_lines, read_text, read_yaml
from dfs_merge.search.rundir import RunDir

NOT_UTF8 = b"format: dfs-merge/genome@1\nname: caf\xe9\n"  # Latin-1
AT = NOT_UTF8.index(b"\xe9")
# nine levels of nine aliases: 9**9 (387 million) strings once expanded, from 300 bytes
BOMB = "".join(
    f"  {chr(97 + i)}: &{chr(97 + i)} [{','.join(['x'] * 9 if i == 0 else ['*' + chr(96 + i)] * 9)}]\n"
    for i in range(9)
)
DEAD_PID = 2**22 + 7  # above the largest pid Linux hands out (pid_max is at most 2**22)


def snapshot(folder: Path) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Every file (size, mtime) and every folder under `folder`: equal before and after means nothing was written."""
    return tree_state(folder), sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_dir())


@pytest.fixture()
def work(tmp_path: Path) -> dict[str, Path]:
    """A folder with two config-only sources, a genome over the first, a run config, a mergekit config,
    a calibration file and a regular file to put paths under."""
    src = [Path(p) for p in write_fake_sources(tmp_path / "sources")]
    genome = tmp_path / "g.genome.yaml"
    save_genome(Genome.from_route(Route.parse("0:0-3"), [str(src[0])], [4], 1, "slot", ConstraintsConfig()), genome)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"sources": [str(src[0])], "tasks": {"prose_ppl_dev": 1.0},  # a bundled task
                                      "out": str(tmp_path / "run")}))
    mergekit = tmp_path / "merge.yaml"
    mergekit.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(src[0]), "layer_range": [0, 4]}]}]}))
    calibration = tmp_path / "calib.jsonl"
    write_jsonl(calibration, [{"text": "The cat sat on the mat."}])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return {"root": tmp_path, "src0": src[0], "src1": src[1], "genome": genome, "config": config,
            "mergekit": mergekit, "calibration": calibration, "blocker": blocker}


# --------------------------------------------------------------------------- reading

def not_utf8(path: Path, valid: str) -> None:
    path.write_bytes(NOT_UTF8)


def alias_bomb(path: Path, valid: str) -> None:
    """A valid file of its kind with the bomb under a key its reader does not need (a genome's `scores:`)."""
    key = "scores" if "genome" in path.name else "comment"
    path.write_text(f"{valid}{key}:\n{BOMB}")


def a_folder(path: Path, valid: str) -> None:
    path.mkdir()


HOSTILE: dict[str, tuple[Callable[[Path, str], None], tuple[str, ...]]] = {
    "not-utf8": (not_utf8, (f"not UTF-8 text (byte 0xe9 at offset {AT})",)),
    "alias-bomb": (alias_bomb, ("YAML aliases are not accepted (*a, line",)),
    "folder": (a_folder, ("is a folder, not a file",)),
}

# (command, the file it reads, where that file goes in argv)
READERS: dict[str, tuple[str, Callable[[dict[str, Path], Path], list[str | Path]]]] = {
    "evolve": ("config", lambda w, f: ["evolve", f]),
    "eval": ("config", lambda w, f: ["eval", f]),
    "baseline": ("config", lambda w, f: ["baseline", f]),
    "study": ("config", lambda w, f: ["study", f]),
    "demo": ("config", lambda w, f: ["demo", f]),
    "show": ("genome", lambda w, f: ["show", f]),
    "export": ("genome", lambda w, f: ["export", f, "--out", w["root"] / "exported"]),
    "export-mergekit": ("genome", lambda w, f: ["export", f, "--format", "mergekit", "--out", w["root"] / "m2.yaml"]),
    "import-mergekit": ("mergekit", lambda w, f: ["import-mergekit", f, "--out", w["root"] / "imported.genome.yaml"]),
}


@pytest.mark.parametrize("hostile", list(HOSTILE))
@pytest.mark.parametrize("command", list(READERS))
def test_a_hostile_input_file_is_one_line(work, command, hostile):
    kind, argv = READERS[command]
    make, phrases = HOSTILE[hostile]
    valid = work[kind].read_text()
    bad = work["root"] / f"bad.{kind}.{'genome.' if kind == 'genome' else ''}yaml"
    make(bad, valid)
    before = snapshot(work["root"])
    result = run_cli(*argv(work, bad))
    assert_refused(result, str(bad), *phrases)  # the bomb's message comes from the composer: nothing was built
    assert snapshot(work["root"]) == before


def test_the_alias_bomb_is_a_bomb_and_is_refused_at_once(tmp_path):
    """The same file through plain `yaml.safe_load` expands to 9**9 leaves (shared here, but any walk of
    it, printing or dumping, never ends); `read_yaml` refuses it before building anything."""
    path = tmp_path / "bomb.yaml"
    path.write_text(f"scores:\n{BOMB}")
    assert len(path.read_bytes()) < 1024
    data = yaml.safe_load(path.read_text())["scores"]["i"]
    width = 1
    while isinstance(data, list):
        width, data = width * len(data), data[0]
    assert width == 9**9
    composed, built = [], []
    compose, construct = yaml.composer.Composer.compose_node, yaml.constructor.BaseConstructor.construct_object
    with pytest.MonkeyPatch.context() as m:
        m.setattr(yaml.composer.Composer, "compose_node", lambda self, *a: composed.append(1) or compose(self, *a))
        m.setattr(yaml.constructor.BaseConstructor, "construct_object",
                  lambda self, *a, **k: built.append(1) or construct(self, *a, **k))
        with pytest.raises(GenomeError, match=r"YAML aliases are not accepted \(\*a, line 3\)"):
            read_yaml(path, GenomeError)
    # refused at the first alias: the nodes before it (the mapping, `scores`, `a` and its nine x's, `b` and its
    # list) were composed, and no Python object was built
    assert len(composed) == 16 and not built, (len(composed), len(built))


@pytest.mark.parametrize(("content", "message"), [
    (b"a: 1\nb: \xff\n", "not UTF-8 text (byte 0xff at offset 8)"),
    (b"a: [1, 2\n", "not valid YAML (line 2)"),
    (b"a: " + b"[" * 20000, "not valid YAML (nested too deeply)"),
    (b"a: 1\nb: \x00\n", "not valid YAML (character #x0000 on line 2 is not allowed)"),
    (b"a: !!python/object/apply:os.system [echo]\n", "not valid YAML (line 1)"),
    (b"when: 2020-13-45\n", "not valid YAML (ValueError: month must be in 1..12)"),
    (b"- a\n- list\n", "expected a YAML mapping, got list"),
    (b"", "expected a YAML mapping, got NoneType"),
])
def test_read_yaml_refusals(tmp_path, content, message):
    path = tmp_path / "f.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        read_yaml(path)
    assert str(err.value) == f"{path}: {message}"


def test_read_text_refusals_and_what_it_accepts(tmp_path, monkeypatch):
    assert read_text(_write(tmp_path / "bom.yaml", b"\xef\xbb\xbfa: 1\n")) == "a: 1\n"  # a byte-order mark is dropped
    assert read_yaml(_write(tmp_path / "anchor.yaml", b"a: &x 1\nb: 2\n")) == {"a": 1, "b": 2}  # an unused anchor
    for path, message in [
        (tmp_path / "missing.yaml", "no such file"),
        (tmp_path / "bom.yaml" / "under", "no such file (a parent of it is a file)"),
        (tmp_path, "is a folder, not a file"),
        (Path("a\0b"), "no such file (not a valid file name)"),
        (Path("/dev/zero"), "is not a regular file (a pipe, device or socket); refusing to read it"),
    ]:
        with pytest.raises(ConfigError) as err:
            read_text(path)
        assert str(err.value).endswith(f": {message}") and "\n" not in str(err.value) and "\0" not in str(err.value)
    with pytest.raises(ConfigError, match="line 1 is longer than 10 bytes"):
        list(read_lines(_write(tmp_path / "long.txt", b"x" * 100), limit=10))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xff at offset 7\)"):
        list(read_lines(_write(tmp_path / "l.txt", b"hello\n\n\xff\n")))
    with pytest.raises(ConfigError, match=r"x.json: not valid JSON \(Expecting value, line 1 column 7\)"):
        read_json(_write(tmp_path / "x.json", b'{"a": '))
    newline = tmp_path / "two\nlines.yaml"
    with pytest.raises(ConfigError) as err:
        read_yaml(newline)
    assert "\n" not in str(err.value)  # an unprintable name is quoted


def test_a_file_without_read_permission_is_refused(tmp_path):
    """Run with file permissions enforced (as root, CI's user, without root's file capabilities: see
    `builders.run_unprivileged`)."""
    locked = _write(tmp_path / "locked.yaml", b"a: 1\n")
    locked.chmod(0)
    code = ("import sys\nfrom dfs_merge.errors import ConfigError\nfrom dfs_merge.inputs import read_yaml\n"
            "try:\n    read_yaml(sys.argv[1])\nexcept ConfigError as err:\n    print(err)\nelse:\n    print('read')\n")
    try:
        done = run_unprivileged([sys.executable, "-c", code, str(locked)], timeout=120)
    finally:
        locked.chmod(0o644)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{locked}: cannot read it (Permission denied)\n"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_resume_with_a_checkpoint_that_is_not_utf8(work):
    run = work["root"] / "run"
    RunDir.open(load_config(work["config"]), resume=False)
    content = b'{"format": "dfs-merge/checkpoint@1", "note": "caf\xe9"}'
    (run / "checkpoint.json").write_bytes(content)
    (run / "evals.jsonl").write_text("")
    result = run_cli("evolve", work["config"], "--resume")
    assert_refused(result, f"{run / 'checkpoint.json'}: not UTF-8 text (byte 0xe9 at offset {content.index(0xE9)})")
    assert (run / "checkpoint.json").read_bytes() == content


@pytest.mark.parametrize(("content", "phrase"), [
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "not UTF-8 text (byte 0xe9 at offset 28)"),
    (b'{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
    (b"", "no rows with a 'text' field"),
])
def test_baseline_calibration_that_is_not_utf8_or_json(work, tiny_suite_dir, content, phrase):
    config = work["root"] / "baseline.yaml"
    config.write_text(yaml.safe_dump({"sources": [str(work["src0"])], "tasks": {"tiny_ppl": 1.0},
                                      "eval_suites": [str(tiny_suite_dir)], "out": str(work["root"] / "run")}))
    work["calibration"].write_bytes(content)
    before = snapshot(work["root"])
    result = run_cli("baseline", config, "--calibration", work["calibration"], "--sizes", "1,2", "--split", "dev")
    assert_refused(result, str(work["calibration"]), phrase)
    assert snapshot(work["root"]) == before


def test_a_source_whose_config_is_not_utf8(work):
    """A source folder is a user's file too: its config.json goes through the same reader."""
    (work["src0"] / "config.json").write_bytes(b'{"model_type": "llama\xff"}')
    result = run_cli("export", work["genome"], "--format", "mergekit", "--out", work["root"] / "m.yaml")
    assert_refused(result, f"{work['src0'] / 'config.json'}: not UTF-8 text (byte 0xff at offset 21)")
    assert not (work["root"] / "m.yaml").exists()


def test_a_model_card_alias_bomb_names_no_licence(tmp_path):
    from dfs_merge.models.metadata import card_license

    (tmp_path / "README.md").write_text(f"---\nlicense: mit\nbomb:\n{BOMB}---\n# a model\n")
    assert card_license(tmp_path) is None
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    assert card_license(tmp_path) == "mit"


# --------------------------------------------------------------------------- writing

# (what is wrong, argv, phrases of the refusal); paths are built from the work folder `w`
WRITERS: dict[str, tuple[Callable[[dict[str, Path]], list[str | Path]], Callable[[dict[str, Path]], list[str]]]] = {
    "export under a file": (
        lambda w: ["export", w["genome"], "--out", w["blocker"] / "out"],
        lambda w: [f"--out {w['blocker'] / 'out'}: {w['blocker']} is a file, not a folder"]),
    "export mergekit under a file": (
        lambda w: ["export", w["genome"], "--format", "mergekit", "--out", w["blocker"] / "deeper" / "m.yaml"],
        lambda w: [f"{w['blocker']} is a file, not a folder"]),
    "export into /proc": (
        lambda w: ["export", w["genome"], "--out", "/proc/dfs-merge-test/out"],
        lambda w: ["--out /proc/dfs-merge-test/out: /proc is not writable"]),
    "export onto an existing folder": (
        lambda w: ["export", w["genome"], "--out", w["src1"]],
        lambda w: [f"--out {w['src1']}: already exists; pass --force to replace it"]),
    "export onto an existing file, forced": (
        lambda w: ["export", w["genome"], "--out", w["blocker"], "--force"],
        lambda w: [f"--out {w['blocker']}: is a file, not a folder"]),
    "export mergekit onto an existing file": (
        lambda w: ["export", w["genome"], "--format", "mergekit", "--out", w["blocker"]],
        lambda w: ["already exists; pass --force to replace it"]),
    "export mergekit onto a folder, forced": (
        lambda w: ["export", w["genome"], "--format", "mergekit", "--out", w["src1"], "--force"],
        lambda w: [f"--out {w['src1']}: is a folder, not a file"]),
    "export into its own source, forced": (
        lambda w: ["export", w["genome"], "--out", w["src0"], "--force"],
        lambda w: [f"--out {w['src0']}: is the input {w['src0']}; an output never overwrites an input"]),
    "export over the folder holding the genome, forced": (
        lambda w: ["export", w["genome"], "--out", w["root"], "--force"],
        lambda w: [f"contains the input {w['genome']}; an output never overwrites an input"]),
    "export mergekit into a source folder": (
        lambda w: ["export", w["genome"], "--format", "mergekit", "--out", w["src0"] / "m.yaml"],
        lambda w: [f"is inside the input {w['src0']}; an output never writes into an input"]),
    "export mergekit over the genome, forced": (
        lambda w: ["export", w["genome"], "--format", "mergekit", "--out", w["genome"], "--force"],
        lambda w: [f"is the input {w['genome']}"]),
    "import-mergekit onto an existing file": (
        lambda w: ["import-mergekit", w["mergekit"], "--out", w["genome"]],
        lambda w: [f"--out {w['genome']}: already exists; pass --force to replace it"]),
    "import-mergekit over its config, forced": (
        lambda w: ["import-mergekit", w["mergekit"], "--out", w["mergekit"], "--force"],
        lambda w: [f"is the input {w['mergekit']}"]),
    "import-mergekit under a file": (
        lambda w: ["import-mergekit", w["mergekit"], "--out", w["blocker"] / "g.yaml"],
        lambda w: [f"{w['blocker']} is a file, not a folder"]),
    "import-mergekit onto a folder, forced": (
        lambda w: ["import-mergekit", w["mergekit"], "--out", w["src1"], "--force"],
        lambda w: ["is a folder, not a file"]),
    "show --png onto an existing file": (
        lambda w: ["show", w["genome"], "--png", w["blocker"]],
        lambda w: [f"--png {w['blocker']}: already exists; pass --force to replace it"]),
    "show --png over the genome, forced": (
        lambda w: ["show", w["genome"], "--png", w["genome"], "--force"],
        lambda w: [f"is the input {w['genome']}"]),
    "show --png under a file": (
        lambda w: ["show", w["genome"], "--png", w["blocker"] / "r.png"],
        lambda w: [f"{w['blocker']} is a file, not a folder"]),
    "show --png onto a device": (
        lambda w: ["show", w["genome"], "--png", "/dev/null", "--force"],
        lambda w: ["--png /dev/null: is not a regular file"]),
    "evolve out under a file": (
        lambda w: ["evolve", w["config"], "--out", w["blocker"] / "run"],
        lambda w: [f"out: {w['blocker'] / 'run'}: {w['blocker']} is a file, not a folder"]),
    "evolve out in /proc": (
        lambda w: ["evolve", w["config"], "--out", "/proc/dfs-merge-test/run"],
        lambda w: ["/proc is not writable"]),
    "evolve out onto a file": (
        lambda w: ["evolve", w["config"], "--out", w["blocker"]],
        lambda w: ["is a file, not a folder"]),
    "evolve out in a source folder": (
        lambda w: ["evolve", w["config"], "--out", w["src0"] / "run"],
        lambda w: [f"is inside the input {w['src0']}"]),
}


@pytest.mark.parametrize("case", list(WRITERS))
def test_a_bad_output_path_is_refused_before_any_work(work, case):
    argv, phrases = WRITERS[case]
    before = snapshot(work["root"])
    result = run_cli(*argv(work))
    assert_refused(result, *phrases(work))
    assert snapshot(work["root"]) == before


@pytest.mark.parametrize("argv", [
    lambda w, ro: ["export", w["genome"], "--out", ro / "out"],
    lambda w, ro: ["export", w["genome"], "--format", "mergekit", "--out", ro / "m.yaml"],
    lambda w, ro: ["import-mergekit", w["mergekit"], "--out", ro / "g.yaml"],
    lambda w, ro: ["show", w["genome"], "--png", ro / "r.png"],
    lambda w, ro: ["evolve", w["config"], "--out", ro / "run"],
])
def test_a_read_only_folder_is_refused(work, argv):
    """Run with file permissions enforced: as root (CI), in a child process without root's file capabilities."""
    ro = work["root"] / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        before = snapshot(work["root"])
        assert_refused(run_cli_unprivileged(*argv(work, ro)), f"{ro} is not writable (Permission denied)")
        assert snapshot(work["root"]) == before
    finally:
        ro.chmod(0o755)


def test_the_refusal_comes_before_the_sources_are_loaded(work, monkeypatch):
    """`export` onto an existing folder is refused without loading a source (that takes seconds on a real model)."""
    from dfs_merge.models import sources

    def never(*args, **kwargs):
        raise AssertionError("loaded the sources before checking --out")

    monkeypatch.setattr(sources.SourcePool, "load", never)
    assert_refused(run_cli("export", work["genome"], "--out", work["src1"]), "already exists")


def test_the_allowed_writes_still_work(work):
    """The same commands with good paths: a new file, and --force over an output that is no input."""
    root = work["root"]
    assert run_cli("export", work["genome"], "--format", "mergekit", "--out", root / "new" / "m.yaml").code == 0
    assert run_cli("export", work["genome"], "--format", "mergekit", "--out", root / "new" / "m.yaml",
                   "--force").code == 0
    assert run_cli("import-mergekit", root / "new" / "m.yaml", "--out", root / "back.genome.yaml").code == 0
    result = run_cli("import-mergekit", root / "new" / "m.yaml", "--out", root / "back.genome.yaml", "--force")
    assert result.code == 0, result.err
    assert run_cli("show", root / "back.genome.yaml", "--png", root / "route.png").code == 0
    assert (root / "route.png").read_bytes().startswith(b"\x89PNG")
    assert run_cli("show", root / "back.genome.yaml", "--png", root / "route.png", "--force").code == 0
    assert not [p for p in root.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(".dfs-probe")]


# --------------------------------------------------------------------------- atomic writes

def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "checkpoint.json"
    code = ("import os, sys, time\nfrom dfs_merge.atomic import atomic_file\n"
            "with atomic_file(sys.argv[1]) as f:\n    f.write('half'); f.flush(); print('writing', flush=True)\n"
            "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, proc.kill)  # a writer that never says "writing" ends the readline below
    watchdog.start()
    try:
        assert proc.stdout.readline().strip() == "writing"
        temporaries = [p.name for p in tmp_path.iterdir()]
        assert len(temporaries) == 1 and temporaries[0].startswith(f".checkpoint.json.{proc.pid}.")
        write_atomic(target, "{}")  # the writer is alive: its temporary stays
        assert (tmp_path / temporaries[0]).exists()
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert (tmp_path / temporaries[0]).read_text() == "half" and target.read_text() == "{}"
    write_atomic(target, '{"a": 1}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json"]


def test_only_dead_writers_temporaries_of_that_file_are_removed(tmp_path):
    live = f".f.txt.{os.getpid()}.abc123.tmp"
    names = {
        f".f.txt.{DEAD_PID}.x1y2z3_q.tmp": False,  # a killed writer of f.txt: removed
        live: True,  # a writer that still runs (this one): kept
        f".f.txt.x.{DEAD_PID}.abc123.tmp": True,  # a killed writer of another file, f.txt.x: kept
        ".f.txt.abc123.tmp": True,  # no pid in its name: not ours to judge
        "f.txt.tmp": True,
    }
    for name in names:
        (tmp_path / name).write_text("x")
    write_atomic(tmp_path / "f.txt", "new")
    assert {n: (tmp_path / n).exists() for n in names} == names
    assert (tmp_path / "f.txt").read_text() == "new"


def test_a_killed_png_writer_leaves_nothing_after_the_next_picture(tmp_path):
    from dfs_merge.plots import history_png

    stale = tmp_path / f".history.png.{DEAD_PID}.k1ll3d00.tmp"
    stale.write_bytes(b"")  # what a writer killed before matplotlib wrote a byte leaves
    history_png([{"generation": 0, "best": 1.0, "mean": 0.5}], tmp_path / "history.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.png"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_an_atomic_file_gets_the_mode_a_plain_open_would(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_atomic(tmp_path / "new.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        with atomic_file(tmp_path / "new.png", "wb") as f:
            f.write(b"x")
        staging = Staging(tag="test-staging", old_tag="test-old", what="test")
        with staging.folder(tmp_path / "folder", replace=False) as folder:
            save_genome(Genome.from_route(Route.parse("0:0-1"), ["s"], [2], 1), folder / "g.yaml")
            (folder / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == want
    for path in ("new.txt", "new.png", "folder/g.yaml", "folder/plain.txt"):
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == want, path
    assert atomic.umask() == old


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    path.chmod(0o640)
    write_atomic(path, "a: 2\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "a: 2\n"


def test_what_the_project_writes_read_yaml_reads_back(tmp_path):
    """Writers use no YAML aliases, even for an object that appears twice, since `read_yaml` refuses them."""
    shared = {"acc": [0.5, 0.25]}
    g = Genome.from_route(Route.parse("0:0-1"), ["s"], [2], 1)
    save_genome(replace(g, scores={"dev": shared, "test": shared}), tmp_path / "g.yaml")
    assert "&" not in (tmp_path / "g.yaml").read_text()
    assert read_yaml(tmp_path / "g.yaml")["scores"] == {"dev": shared, "test": shared}


def test_baseline_with_a_missing_calibration_file(work, tiny_suite_dir):
    config = work["root"] / "baseline.yaml"
    config.write_text(yaml.safe_dump({"sources": [str(work["src0"])], "tasks": {"tiny_ppl": 1.0},
                                      "eval_suites": [str(tiny_suite_dir)], "out": str(work["root"] / "run")}))
    before = snapshot(work["root"])
    missing = work["root"] / "no-calibration.jsonl"
    assert_refused(run_cli("baseline", config, "--calibration", missing, "--sizes", "1", "--split", "dev"),
                   str(missing), "no such file")
    assert snapshot(work["root"]) == before
