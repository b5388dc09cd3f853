"""Where the bundled data lives: the eval suites, the example genomes and configs, the committed models.

In a clone (and an editable install) they are the repository's top-level `eval_suites/`, `genomes/` and
`models/`, beside the package. A wheel (`pip install .`, `pip wheel .`) carries copies of the three under
`dfs_merge/share/` (`setup.py` copies them at build time; git holds one copy only), in the same relative
arrangement, so that a genome's `../models/family/j` still resolves against its own folder. Every module
finds them through this one, never through the package's parent folder.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
INSTALLED = PACKAGE / "share"
"""The wheel's copy of the bundled folders (absent in a clone)."""
CHECKOUT = PACKAGE.parent
"""The folder above the package: the repository root in a clone."""
FOLDERS = ("eval_suites", "genomes", "models")
"""The top-level folders of the repository that a wheel carries."""


def root() -> Path:
    """The folder that holds `eval_suites/`, `genomes/` and `models/`: the installed copy when the package
    was installed from a wheel, else the repository root beside the package."""
    return INSTALLED if INSTALLED.is_dir() else CHECKOUT


def suites_dir() -> Path:
    """The bundled lm-eval suites (`eval_suites/`: task YAMLs, `data/`, `local_data.py`)."""
    return root() / "eval_suites"


def genomes_dir() -> Path:
    """The example genomes and run configs (`genomes/`: `demo.yaml`, `smollm2-deepened.genome.yaml`, ...)."""
    return root() / "genomes"


def models_dir() -> Path:
    """The committed models (`models/`: the family's LoRA adapters in `family/`, the zoo in `zoo/`)."""
    return root() / "models"


def example_path(path: str) -> str:
    """`path` as given when it exists (or is absolute), else the bundled file of that relative path when there
    is one (`genomes/demo.yaml` from any folder), else `path` unchanged for its reader to refuse.

    The argument type of the commands whose defaults name a bundled config (`demo`, `study`)."""
    given = Path(path)
    try:
        if given.is_absolute() or given.exists():
            return path
        bundled = root() / given
        if given.parts and given.parts[0] in FOLDERS and bundled.is_file():
            return str(bundled)
    except (OSError, ValueError):  # a name too long, a NUL byte: leave it for its reader to refuse
        pass
    return path
