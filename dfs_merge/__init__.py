"""dfs-merge: evolve the data flow through the layers of existing language models, and how their weights mix."""

from pathlib import Path

__version__ = "0.1.0"

CHECKOUT = Path(__file__).resolve().parent.parent
"""The folder above the package: the repository root in a clone (the tests and benchmarks use it). The
bundled `eval_suites/`, `genomes/` and `models/` are found through `dfs_merge.bundled`, which also knows
the copies an installed wheel carries."""


def lazy_exports(package: str, names: dict[str, str]):  # noqa: ANN201 - returns a module __getattr__
    """A module-level `__getattr__` for `package` that imports each public name from the submodule that
    defines it on first use, so that importing a package (or one light module of it) loads nothing heavy."""
    import importlib

    def __getattr__(name: str):  # noqa: N807, ANN202
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__


# Plugs the kinds of source `merging` defines (a recipe file) into the loader of every process that can load a
# pool, spawned workers included: each imports this package first. Light: `merging` defers its torch imports.
from dfs_merge import merging  # noqa: E402, F401
