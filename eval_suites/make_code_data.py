#!/usr/bin/env python3
"""Regenerate the bundled Python code suites (eval_suites/data/code_*.jsonl). Standard library only.

Source: the Python standard library's own ``.py`` files (PSF License; CPython's ``Lib/``), read as
text and parsed with ``ast``; nothing is imported. The committed files were made from **CPython
3.11.7** (``PYTHON_VERSION``): another version's library differs, so the script refuses to run on
another Python unless ``--stdlib`` names a 3.11.7 ``Lib/`` folder (e.g. of the CPython 3.11.7 source
tarball) or ``--any-version`` says that different data is wanted.

    python eval_suites/make_code_data.py              # on Python 3.11.7: the same bytes every time

Two tasks, three splits each (dev: fitness, val: the final choice, test: held out):

- ``code_complete_*``: a function's ``def`` line, its docstring and at least two of its body lines,
  then the indentation and first word of the next line (a one-line simple statement) as the context;
  the rest of that line up to its last letter or digit as the target (``rest``: what follows it on the
  line). Scored as a loglikelihood: ``acc`` is 1 when the target's tokens are the model's greedy
  continuation.
- ``code_ppl_*``: whole small functions (signature, docstring, body), scored as one rolling window.

Splits are disjoint by module: every module of a top-level package (``email.*``, ``asyncio.*``,
...) or a top-level module goes to one split, by a hash of its name. A function whose text (or a
completion item whose context and target) also occurs in another split is dropped from all of them.
Rows are spread over the packages of their split (one function per package per round, the packages in
a seeded order, a package's modules in turn), so that any ``limit`` spans many packages.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import random
import re
import sys
import sysconfig
import textwrap
import tokenize
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PYTHON_VERSION = "3.11.7"
DATA_DIR = Path(__file__).resolve().parent / "data"
SEED = "code/v1"

# top-level package -> split, by sha256 of "code-split/<name>": the first 40% test, the next 20% val, the rest dev
SPLIT_BOUNDS = (("test", 0.4), ("val", 0.6), ("dev", 1.0))
SIZES = {  # rows per split
    "code_complete": {"dev": 120, "val": 120, "test": 200},
    "code_ppl": {"dev": 40, "val": 40, "test": 80},
}

# folders and files that are not the library itself (tests, generated or platform files, jokes)
SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "turtledemo", "__phello__"}
SKIP_MODULES = {"this", "antigravity", "__hello__", "__future__"}
SKIP_PREFIXES = ("_sysconfigdata",)

MAX_LINE = 100  # characters of any line of a function used
COMPLETE_MAX_CONTEXT = 800  # characters of a completion item's context
MIN_CODE_BEFORE = 2  # lines of code between the docstring and a completion item's target
TARGET_MIN, TARGET_MAX = 8, 72  # characters of a target line without its indentation
PPL_MIN, PPL_MAX = 250, 900  # characters of a perplexity document
# A completion item's context ends with the target line's indentation and first word (a name or a keyword); its
# target is the rest of that line up to its last letter or digit (`rest`, what follows on the line, is not asked:
# closing brackets, quotes, a colon). Both ends are where every tokenizer splits anyway. Qwen2's tokenizer joins a
# newline to the punctuation before it (`"""\n`, `):\n`) and SmolLM2's to the indentation after it, so a context
# ending in a newline would be scored from other tokens than the model reads in a file (no whole line was ever its
# greedy continuation), and a target ending in `)` would ask for a token (`)` alone) that Qwen2, rightly, never
# predicts before a line break; a boundary next to a letter or digit is a boundary for both.
FIRST_WORD = re.compile(r"^( *(?:[A-Za-z_][A-Za-z0-9_]*[A-Za-z0-9]|[A-Za-z]))(?![A-Za-z0-9_])(.+)$")
LAST_WORD_CHAR = re.compile(r"^(.*[A-Za-z0-9])([^A-Za-z0-9]*)$")


def split_line(line: str) -> tuple[str, str, str] | None:
    """(indentation and first word, target, rest) of a line of code, or None when it has no such parts."""
    first = FIRST_WORD.match(line)
    if not first:
        return None
    last = LAST_WORD_CHAR.match(first.group(2))
    if not last or len(last.group(1).strip()) < 3:
        return None
    return first.group(1), last.group(1), last.group(2)


TRIVIAL = re.compile(r"^(pass|break|continue|return|raise|return None|return True|return False|return self|"
                     r"\.\.\.|yield|del \w+|global [\w, ]+|nonlocal [\w, ]+)$")
SIMPLE = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.Expr, ast.Raise, ast.Assert,
          ast.Delete, ast.Import, ast.ImportFrom)


@dataclass
class Function:
    module: str
    package: str  # the top-level package or module: the unit of the split
    qualname: str
    lineno: int  # of the `def` line in the module's file
    lines: list[str]  # the function's source lines (from the `def` line, decorators left out), dedented
    body: int  # index into `lines` of the first line after the docstring
    targets: list[int]  # indices into `lines` of the lines a completion item may ask for

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_files(root: Path) -> list[tuple[str, Path]]:
    """(module name, file) of every library module, sorted by name."""
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_PARTS & set(rel.parts[:-1]) or rel.parts[0] in SKIP_PARTS:
            continue
        name = module_name(root, path)
        if not name or name.split(".")[0] in SKIP_MODULES or name.startswith(SKIP_PREFIXES):
            continue
        out.append((name, path))
    return sorted(out)


def split_of(package: str) -> str:
    u = int.from_bytes(hashlib.sha256(f"code-split/{package}".encode()).digest()[:8], "big") / 2**64
    return next(split for split, bound in SPLIT_BOUNDS if u < bound)


def comment_lines(source: str) -> set[int]:
    """1-based numbers of the lines that hold a comment."""
    out = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out.add(tok.start[0])
    return out


def functions_of(name: str, source: str) -> list[Function]:
    """The module's top-level functions and the methods of its top-level classes that have a docstring and use
    plain ASCII, no tab and no line over MAX_LINE characters."""
    try:
        tree = ast.parse(source)
        comments = comment_lines(source)
    except (SyntaxError, tokenize.TokenError, IndentationError):
        return []
    src_lines = source.split("\n")
    nodes: list[tuple[str, ast.AST]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nodes.append((node.name, node))
        elif isinstance(node, ast.ClassDef):
            nodes += [(f"{node.name}.{n.name}", n) for n in node.body
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    out = []
    for qualname, fn in nodes:
        if not ast.get_docstring(fn) or len(fn.body) < 2:
            continue
        raw = src_lines[fn.lineno - 1: fn.end_lineno]
        text = "\n".join(raw)
        if not text.isascii() or "\t" in text or "\f" in text or any(len(x) > MAX_LINE for x in raw):
            continue
        if any(n in comments for n in range(fn.lineno, fn.end_lineno + 1)):
            continue  # comments are prose about the next line: the task asks for code
        lines = textwrap.dedent(text).split("\n")
        doc_end = fn.body[0].end_lineno
        targets = []
        for stmt in ast.walk(fn):
            if not isinstance(stmt, SIMPLE) or stmt is fn.body[0] or stmt.lineno <= doc_end:
                continue
            if stmt.lineno != stmt.end_lineno:
                continue
            line = src_lines[stmt.lineno - 1]  # ASCII (checked above): column offsets are character offsets
            if line.strip() != line[stmt.col_offset: stmt.end_col_offset]:
                continue  # the line holds more than this statement (`if x: return y`, `a = 1; b = 2`)
            code = line.strip()
            if not TARGET_MIN <= len(code) <= TARGET_MAX or TRIVIAL.match(code):
                continue
            if split_line(line) is None:
                continue  # the line must start with a name or keyword and go on after it
            targets.append(stmt.lineno - fn.lineno)
        out.append(Function(name, name.split(".")[0], qualname, fn.lineno, lines, doc_end - fn.lineno + 1,
                            sorted(targets)))
    return out


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def spread(items: list[dict], n: int, rng: random.Random, what: str) -> list[dict]:
    """`n` items taken round-robin: one per top-level package per round, the packages in a seeded order, and
    within a package one per module in turn (so that a large package such as idlelib does not fill a split)."""
    by_package: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for it in items:
        by_package[it["module"].split(".")[0]][it["module"]].append(it)
    queues: dict[str, list[dict]] = {}
    for package in sorted(by_package):
        modules = sorted(by_package[package])
        rng.shuffle(modules)
        for m in modules:
            rng.shuffle(by_package[package][m])
        rounds = max(len(v) for v in by_package[package].values())
        queues[package] = [by_package[package][m][i] for i in range(rounds) for m in modules
                           if i < len(by_package[package][m])]
    packages = sorted(queues)
    rng.shuffle(packages)
    out: list[dict] = []
    while len(out) < n and any(queues.values()):
        for p in packages:
            if queues[p] and len(out) < n:
                out.append(queues[p].pop(0))
    if len(out) < n:
        sys.exit(f"only {len(out)} {what} items, {n} wanted")
    return out


def build(root: Path) -> dict[str, list[dict]]:
    """Every task's rows by file name (`code_complete_dev.jsonl`, ...)."""
    funcs: list[Function] = []
    for name, path in library_files(root):
        funcs += functions_of(name, path.read_text(encoding="utf-8", errors="replace"))
    # a function text (or a completion item) in two splits would be the same document twice: drop it everywhere
    splits_of: dict[str, set[str]] = defaultdict(set)
    for f in funcs:
        splits_of[normalised(f.text)].add(split_of(f.package))
    funcs = [f for f in funcs if len(splits_of[normalised(f.text)]) == 1]

    complete: dict[str, list[dict]] = defaultdict(list)
    ppl: dict[str, list[dict]] = defaultdict(list)
    item_splits: dict[str, set[str]] = defaultdict(set)
    seen: set[str] = set()
    for f in funcs:
        split = split_of(f.package)
        if normalised(f.text) in seen:
            continue  # the same function twice in one split (a copy in a sibling module)
        seen.add(normalised(f.text))
        base = {"module": f.module, "function": f.qualname, "line": f.lineno}
        if PPL_MIN <= len(f.text) <= PPL_MAX:
            ppl[split].append({**base, "text": f.text})
        fits = [k for k in f.targets if len("\n".join(f.lines[:k]) + "\n") <= COMPLETE_MAX_CONTEXT
                and sum(1 for x in f.lines[f.body:k] if x.strip()) >= MIN_CODE_BEFORE]
        if fits:
            k = random.Random(f"{SEED}/target/{f.module}/{f.qualname}").choice(fits)
            head, target, rest = split_line(f.lines[k])
            context = "\n".join(f.lines[:k]) + "\n" + head
            item = {**base, "context": context, "target": target, "rest": rest}
            item_splits[normalised(context + target)].add(split)
            complete[split].append(item)

    out: dict[str, list[dict]] = {}
    for task, by_split in (("code_complete", complete), ("code_ppl", ppl)):
        for split, n in SIZES[task].items():
            items = by_split[split]
            if task == "code_complete":
                items = [it for it in items if len(item_splits[normalised(it["context"] + it["target"])]) == 1]
            rows = spread(items, n, random.Random(f"{SEED}/order/{task}/{split}"), f"{task}_{split}")
            out[f"{task}_{split}.jsonl"] = [{"id": f"{task}-{split}-{i:03d}", **r} for i, r in enumerate(rows)]
    return out


def write_jsonl(data_dir: Path, name: str, rows: list[dict]) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / name
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stdlib", type=Path, help="a CPython 3.11.7 Lib/ folder (default: this Python's own library)")
    ap.add_argument("--any-version", action="store_true",
                    help=f"run on a library other than {PYTHON_VERSION}'s (the data will differ from the committed)")
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="the folder to write into (default: eval_suites/data)")
    args = ap.parse_args(argv)
    root = args.stdlib or Path(sysconfig.get_paths()["stdlib"])
    version = ".".join(str(v) for v in sys.version_info[:3])
    if args.stdlib is None and version != PYTHON_VERSION and not args.any_version:
        sys.exit(f"this is Python {version}; the committed code suites come from {PYTHON_VERSION}'s standard library: "
                 f"run this script with Python {PYTHON_VERSION}, or pass --stdlib PATH/TO/Python-{PYTHON_VERSION}/Lib "
                 f"(or --any-version for other data)")
    if not (root / "os.py").is_file():
        sys.exit(f"{root}: not a Python standard library folder (no os.py)")
    for name, rows in build(root).items():
        path = write_jsonl(args.out, name, rows)
        modules = len({r["module"] for r in rows})
        print(f"{path}: {len(rows)} rows from {modules} modules (standard library of {root}, Python {version})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
