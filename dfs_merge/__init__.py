"""dfs-merge: evolve the data flow through the layers of existing language models, and how their weights mix."""

from pathlib import Path

__version__ = "0.1.0"

CHECKOUT = Path(__file__).resolve().parent.parent
"""The folder that holds the package and, beside it, the bundled `eval_suites/`, `genomes/` and `models/`."""


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
