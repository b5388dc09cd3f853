"""The package as a user installs it: a wheel built from the repository, installed (not editable) into a fresh
venv, its commands run from an empty folder. The bundled suites, example genomes and committed models must come
with the wheel (`dfs_merge/share/`), not from the clone beside the package.

Offline and quick: the wheel is built with the project venv's setuptools (`--no-build-isolation`) from a copy of
the working tree in a temporary folder (no `build/` or `*.egg-info` in the clone), and the fresh venv sees the
project venv's packages through a `.pth` line (nothing is downloaded) but not its editable `dfs_merge`.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from dfs_merge import CHECKOUT

pytestmark = pytest.mark.slow  # a wheel built and installed into a fresh venv

TOP_LEVEL_SKIP = {".git", ".venv", "runs", "build", "dist", ".cache", ".pytest_cache", ".ruff_cache"}
BUNDLED = ("eval_suites", "genomes", "models")


def copy_ignore(folder: str, names: list[str]) -> set[str]:
    """What a copy of the working tree leaves out: caches, build outputs, the venv and run folders."""
    skip = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".egg-info"))}
    if Path(folder).resolve() == CHECKOUT:
        skip |= TOP_LEVEL_SKIP & set(names)
    return skip


@dataclass
class Installed:
    """A fresh venv with the wheel installed, and the wheel."""

    venv: Path
    wheel: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def run(self, *argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        """`dfs-merge ARGV` of the venv, run in `cwd`, with an environment that points nowhere near the clone."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DFS_MERGE_SUITES", "VIRTUAL_ENV")}
        env.update(HF_HUB_OFFLINE="1", PATH=f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
        return subprocess.run([str(self.venv / "bin" / "dfs-merge"), *argv], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)

    def python_says(self, code: str, cwd: Path) -> str:
        """What the venv's Python prints for `code`, run in `cwd`."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DFS_MERGE_SUITES")}
        proc = subprocess.run([str(self.python), "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """The wheel built from a copy of the working tree, installed into a fresh venv over the project's packages."""
    root = tmp_path_factory.mktemp("wheel")
    src, dist, venv = root / "src", root / "dist", root / "venv"
    shutil.copytree(CHECKOUT, src, ignore=copy_ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src), "-w", str(dist)],
                   check=True, cwd=root, timeout=300)
    (wheel,) = dist.glob("dfs_merge-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # The project venv's packages (torch, lm-eval, ...) after the fresh venv's own: a plain path line, so that its
    # .pth files (the editable install's finder) are not run and the installed dfs_merge is the one imported.
    fresh_site = next(venv.glob("lib/python*/site-packages"))
    (fresh_site / "project_packages.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
                    "--ignore-installed", str(wheel)], check=True, cwd=root, timeout=300)
    shutil.rmtree(src)
    return Installed(venv, wheel)


@pytest.fixture
def empty_folder(tmp_path) -> Path:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def test_the_wheel_carries_the_bundled_folders(installed):
    import zipfile

    names = zipfile.ZipFile(installed.wheel).namelist()
    bundled = [p.relative_to(CHECKOUT).as_posix() for name in BUNDLED for p in sorted((CHECKOUT / name).rglob("*"))
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc" and not p.name.startswith(".")]
    assert "genomes/demo.yaml" in bundled and "eval_suites/local_data.py" in bundled
    missing = [t for t in bundled if f"dfs_merge/share/{t}" not in names]
    assert not missing, missing
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.split("/")[0] in BUNDLED]  # inside the package, not top-level packages


def test_the_installed_package_is_imported_and_finds_its_own_data(installed, empty_folder):
    said = json.loads(installed.python_says("""
        import json, dfs_merge
        from dfs_merge import bundled
        from dfs_merge.fitness.tasks import default_suites_dir
        print(json.dumps({"package": dfs_merge.__file__, "suites": str(default_suites_dir()),
                          "genomes": str(bundled.genomes_dir()), "models": str(bundled.models_dir())}))
        """, cwd=empty_folder))
    package = Path(said["package"]).parent
    assert package.is_relative_to(installed.venv), said  # not the clone through an editable install's .pth
    assert not package.is_relative_to(CHECKOUT), said
    for key, name in (("suites", "eval_suites"), ("genomes", "genomes"), ("models", "models")):
        assert Path(said[key]) == package / "share" / name, said


@pytest.mark.slow
def test_eval_on_a_bundled_task_from_an_empty_folder(installed, empty_folder, tiny_source_dirs):
    cfg = empty_folder / "run.yaml"
    cfg.write_text(f"sources: [{tiny_source_dirs[0]}]\ntasks: {{cloze_mc_dev: 1.0, prose_ppl_dev: 1.0}}\n"
                   "limit: 2\nmax_length: 256\n")
    proc = installed.run("eval", "run.yaml", cwd=empty_folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cloze_mc_dev" in proc.stdout and "acc" in proc.stdout, proc.stdout
    assert "prose_ppl_dev" in proc.stdout and "bits_per_byte" in proc.stdout, proc.stdout


def test_show_an_example_genome_from_an_empty_folder(installed, empty_folder):
    proc = installed.run("show", "genomes/smollm2-deepened.genome.yaml", cwd=empty_folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith("genome: ") and Path(first.removeprefix("genome: ")).is_relative_to(installed.venv)
    assert "route: 0:0-19, 0:10-29" in proc.stdout and "hops: 40" in proc.stdout


def test_demo_and_study_configs_resolve_in_the_installed_package(installed, empty_folder):
    said = json.loads(installed.python_says("""
        import json
        from pathlib import Path
        from dfs_merge.cli import build_parser
        from dfs_merge.config import load_config

        out = {}
        for command in (["demo", "genomes/demo.yaml"], ["study"]):
            path = build_parser().parse_args(command).config
            cfg = load_config(path)
            out[command[0]] = {"path": path, "out": str(Path(cfg.out).resolve())}
        family = load_config(Path(out["demo"]["path"]).parent / "family.yaml")
        out["family_sources"] = family.sources
        print(json.dumps(out))
        """, cwd=empty_folder))
    share = next(installed.venv.glob("lib/python*/site-packages/dfs_merge/share"))
    assert Path(said["demo"]["path"]) == share / "genomes" / "demo.yaml", said
    assert Path(said["study"]["path"]) == share / "genomes" / "smollm2-self.yaml", said
    assert Path(said["demo"]["out"]) == empty_folder.resolve() / "runs" / "demo", said  # runs go to the user's folder
    # `smollm2-135m-instruct+../models/family/j` resolves against the genome's folder to the installed adapter
    for source in said["family_sources"]:
        adapter = Path(source.split("+", 1)[1])
        assert (adapter / "adapter_config.json").is_file() and adapter.resolve().is_relative_to(share), said
    proc = installed.run("demo", "--help", cwd=empty_folder)
    assert proc.returncode == 0 and "usage: dfs-merge demo" in proc.stdout


def test_the_family_demo_finds_its_genome_and_parents_in_the_installed_package(installed, empty_folder):
    # `dfs-merge demo` (the family replay) reads genomes/family-best.yaml and the committed adapters; the full
    # run on the real model is tests/apps/test_family_demo.py (the same code, from the clone)
    said = json.loads(installed.python_says("""
        import json
        from dfs_merge.apps import family_study
        from dfs_merge.genome_files import load_genome

        best = load_genome(family_study.BEST)
        print(json.dumps({"best": str(family_study.BEST), "sources": list(best.sources),
                          "parents": list(family_study.SPECIALISTS.values()),
                          "target": [len(family_study.problems(s)) for s in ("dev", "val", "test")]}))
        """, cwd=empty_folder))
    share = next(installed.venv.glob("lib/python*/site-packages/dfs_merge/share"))
    assert Path(said["best"]) == share / "genomes" / "family-best.yaml", said
    for source in said["sources"] + said["parents"]:
        if "+" in source:
            adapter = Path(source.split("+", 1)[1])
            assert (adapter / "adapter_config.json").is_file() and adapter.resolve().is_relative_to(share), said
    assert said["target"] == [600, 300, 600], said
