"""Loader for the bundled suites: reads a task's local JSONL without the current directory mattering.

lm-eval's ``dataset_path: json`` hands ``data_files`` to ``datasets.load_dataset``, which resolves
a relative path against the process's working directory. Each task YAML here therefore names
this function as ``custom_dataset`` (``!function`` is resolved next to the YAML file) and keeps
``dataset_kwargs.data_files`` relative to this folder; lm-eval calls
``load(**metadata, **dataset_kwargs)``. Absolute paths are used as they are, so a caller that
rewrites ``data_files`` to absolute paths also works.

``rows: [start, stop]`` in ``dataset_kwargs`` keeps only those rows of every file: the dev and
validation tasks of a suite are two disjoint slices of one dev file.

``images`` is the ``doc_to_image`` of the image suites: a row's ``image`` is a PNG path relative to this
folder, opened as the one picture of the document.
"""

from __future__ import annotations

import json
from pathlib import Path

SUITE_DIR = Path(__file__).resolve().parent


def resolve(path: str | Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else SUITE_DIR / p


def read_jsonl(path: str | Path) -> list[dict]:
    with resolve(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load(data_files: dict[str, str] | None = None, rows: list[int] | None = None, **_metadata):
    """A ``datasets.DatasetDict`` with one split per entry of ``data_files`` (rows ``start:stop`` if given)."""
    import datasets

    if not data_files:
        raise ValueError("bundled eval suite: dataset_kwargs.data_files is missing")
    if isinstance(data_files, str):
        data_files = {"test": data_files}
    keep = slice(*rows) if rows else slice(None)
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(read_jsonl(path)[keep]) for split, path in data_files.items()}
    )


def images(doc: dict) -> list:
    """The pictures of an image-suite row: its ``image`` (a path relative to this folder) as an RGB PIL image."""
    from PIL import Image

    with Image.open(resolve(doc["image"])) as img:
        return [img.convert("RGB")]
