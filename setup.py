"""Build hook: a wheel (`pip install .`, `pip wheel .`) carries the repository's top-level `eval_suites/`,
`genomes/` and `models/` as package data under `dfs_merge/share/`, found by `dfs_merge.bundled`.

The folders stay at the top of the repository (one copy in git); they are copied into the build at build
time. An editable install (`pip install -e .`, what `make install` does) copies nothing: the package then
finds them beside itself. The metadata is in setup.cfg.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
FOLDERS = ("eval_suites", "genomes", "models")  # the same as dfs_merge.bundled.FOLDERS
TARGET = Path("dfs_merge") / "share"
SKIP = shutil.ignore_patterns("__pycache__", "*.py[cod]", ".*")


class BuildWithBundledData(build_py):
    """`build_py` that also copies the bundled folders into the package (except for an editable install)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name in FOLDERS:
            src, dst = HERE / name, Path(self.build_lib) / TARGET / name
            if not src.is_dir():
                raise SystemExit(f"setup.py: {src} is missing; build from a clone or a complete sdist")
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst, ignore=SKIP)

    def bundled_outputs(self) -> list[str]:
        """The copied files, as paths in the build folder."""
        if getattr(self, "editable_mode", False):
            return []
        out = Path(self.build_lib) / TARGET
        return [str(p) for p in sorted(out.rglob("*")) if p.is_file()] if out.is_dir() else []

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        """The package's outputs and the bundled files."""
        return [*super().get_outputs(include_bytecode), *self.bundled_outputs()]


setup(cmdclass={"build_py": BuildWithBundledData})
