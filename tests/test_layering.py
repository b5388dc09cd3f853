"""The package's layering as a contract (README, "How it works"): no import cycle between the modules of
`dfs_merge`, and no private name imported from another module.

Every module is read with `ast`; nothing is imported, so this runs in well under a second. An import counts
wherever it is written (module level, inside a function or a class, under `try:`), except in the body of an
`if TYPE_CHECKING:` block, which never runs. A module that imports its own package's `__init__` (an ancestor
package, e.g. `from dfs_merge import CHECKOUT` or a package's lazy exports) is not a crossing between modules.
Registries that name classes as `"module:Class"` strings are not imports and are not counted.

A cycle is a strongly connected set of two or more modules: each of them reaches every other through imports.
A private name is one that starts with `_` and is not a dunder (`_helper`, not `__version__`); importing it
from another module of the package (or a `_module` from outside its package) is a crossing.

The checker itself is tested on small fake packages written to `tmp_path`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "dfs_merge"


@dataclass(frozen=True)
class Edge:
    """One import of a package module by another: `importer` imports `target` at `where` (path:line)."""

    importer: str
    target: str
    where: str


@dataclass
class ImportGraph:
    """The package's modules (dotted name -> file), the imports between them, and private names imported."""

    root: Path
    modules: dict[str, Path]
    edges: list[Edge] = field(default_factory=list)
    private: list[str] = field(default_factory=list)

    def successors(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {name: set() for name in self.modules}
        for edge in self.edges:
            out[edge.importer].add(edge.target)
        return out


def module_names(package_dir: Path) -> dict[str, Path]:
    """Every module of the package under `package_dir`, by dotted name (a package is its `__init__.py`)."""
    package_dir = package_dir.resolve()
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:` (and nothing else: `if not TYPE_CHECKING:` runs)."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST):
    """Every import statement under `node` that runs, at any depth; an `if TYPE_CHECKING:` body is skipped
    (its `else:` is not)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.orelse:
                if isinstance(statement, (ast.Import, ast.ImportFrom)):
                    yield statement
                yield from _import_nodes(statement)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _import_nodes(child)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _containing_module(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `dotted` that is one of the package's modules, or None."""
    while dotted and dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def _targets(importer: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]):
    """(target module, name imported from it or None) for each name the statement imports from the package."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            target = _containing_module(alias.name, modules)
            if target:
                yield target, None
        return
    if node.level:
        package = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        if submodule in modules:  # `from pkg import module`: the module itself is imported
            yield submodule, None
        else:
            target = _containing_module(base, modules)
            if target:
                yield target, alias.name


def _private_module_crossed(importer: str, target: str) -> str | None:
    """A `_module` of the package (a path component after the root) imported from outside its own package."""
    parts = target.split(".")
    for i in range(1, len(parts)):
        if _is_private(parts[i]):
            owner = ".".join(parts[:i])
            if importer != owner and not importer.startswith(owner + "."):
                return ".".join(parts[: i + 1])
    return None


def import_graph(package_dir: Path) -> ImportGraph:
    """The imports between the modules of the package under `package_dir`, read with `ast`."""
    modules = module_names(package_dir)
    graph = ImportGraph(root=package_dir.resolve().parent, modules=modules)
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _import_nodes(tree):
            for target, name in _targets(importer, path, node, modules):
                if target == importer:
                    continue
                if importer.startswith(target + ".") and modules[target].name == "__init__.py":
                    continue  # its own package's __init__ (lazy exports, CHECKOUT): not a crossing
                where = f"{path.relative_to(graph.root)}:{node.lineno}"
                graph.edges.append(Edge(importer, target, where))
                if name is not None and _is_private(name):
                    graph.private.append(f"{where}: {importer} imports {name} from {target}")
                crossed = _private_module_crossed(importer, target)
                if crossed:
                    graph.private.append(f"{where}: {importer} imports the private module {crossed}")
    return graph


def strongly_connected(successors: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of two or more nodes, each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(successors[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(successors):
        if v not in index:
            visit(v)
    return sorted(components)


def _by_place(item: tuple[str, ...]) -> tuple[str, int]:
    path, _, line = item[0].rpartition(":")
    return path, int(line)


def cycle_report(graph: ImportGraph) -> list[str]:
    """One paragraph per cycle: its modules, then each import that closes it (where it is written)."""
    lines = []
    for component in strongly_connected(graph.successors()):
        members = set(component)
        lines.append(f"cycle of {len(component)} modules: {', '.join(component)}")
        inside = {
            (e.where, e.importer, e.target)
            for e in graph.edges
            if e.importer in members and e.target in members
        }
        for where, importer, target in sorted(inside, key=_by_place):
            lines.append(f"    {where}: {importer} imports {target}")
    return lines


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    """The imports of dfs_merge itself, read once for both contracts."""
    return import_graph(PACKAGE_DIR)


def test_no_import_cycle_between_modules(graph):
    cycles = strongly_connected(graph.successors())
    if cycles:
        pytest.fail(
            f"{len(cycles)} import cycle(s) between the modules of dfs_merge ({sum(map(len, cycles))} modules); "
            'imports run one way (README "How it works"; imports inside functions count, `if TYPE_CHECKING:` '
            "ones do not):\n" + "\n".join(cycle_report(graph)),
            pytrace=False,
        )


def test_no_private_name_imported_from_another_module(graph):
    if graph.private:
        pytest.fail(
            f"{len(graph.private)} private name(s) imported from another module of dfs_merge; make the name "
            "public where it is shared, or move it:\n" + "\n".join(f"    {line}" for line in graph.private),
            pytrace=False,
        )


# The checker, on fake packages.


def _write_package(root: Path, files: dict[str, str]) -> Path:
    """A fake package `pkg` under `root`: `files` maps paths inside it to their source."""
    package = root / "pkg"
    for relative, source in {"__init__.py": "", **files}.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    return package


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    package = _write_package(
        tmp_path,
        {
            "a.py": "from pkg import b\n\nVALUE = b.helper\n",
            "b.py": "def helper():\n    from .a import VALUE\n    return VALUE\n",
            "c.py": "from pkg.a import VALUE\n",  # imports into the cycle, is not part of it
        },
    )
    graph = import_graph(package)
    assert strongly_connected(graph.successors()) == [["pkg.a", "pkg.b"]]
    report = cycle_report(graph)
    assert report[0] == "cycle of 2 modules: pkg.a, pkg.b"
    assert "    pkg/b.py:2: pkg.b imports pkg.a" in report
    assert "    pkg/a.py:1: pkg.a imports pkg.b" in report
    assert graph.private == []


def test_checker_finds_a_longer_cycle_across_subpackages(tmp_path):
    package = _write_package(
        tmp_path,
        {
            "low/__init__.py": "",
            "low/x.py": "import pkg.high.y\n",
            "high/__init__.py": "",
            "high/y.py": "try:\n    from ..mid import z\nexcept ImportError:\n    z = None\n",
            "mid.py": "class Z:\n    def f(self):\n        from pkg.low.x import thing\n        return thing\n",
        },
    )
    graph = import_graph(package)
    assert strongly_connected(graph.successors()) == [["pkg.high.y", "pkg.low.x", "pkg.mid"]]


def test_checker_ignores_type_checking_imports(tmp_path):
    package = _write_package(
        tmp_path,
        {
            "c.py": (
                "from __future__ import annotations\n"
                "import typing\n"
                "from typing import TYPE_CHECKING\n\n"
                "if TYPE_CHECKING:\n"
                "    from pkg.d import D\n\n"
                "if typing.TYPE_CHECKING:\n"
                "    import pkg.d\n\n"
                "def f(x: D) -> D:\n"
                "    if TYPE_CHECKING:\n"
                "        from .d import D\n"
                "    return x\n"
            ),
            "d.py": "from pkg.c import f\n\nclass D:\n    pass\n",
        },
    )
    graph = import_graph(package)
    assert strongly_connected(graph.successors()) == []
    assert [(e.importer, e.target) for e in graph.edges] == [("pkg.d", "pkg.c")]


def test_checker_counts_the_else_of_type_checking(tmp_path):
    package = _write_package(
        tmp_path,
        {
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\nelse:\n    from pkg.d import D\n",
            "d.py": "from pkg.c import TYPE_CHECKING\n",
        },
    )
    assert strongly_connected(import_graph(package).successors()) == [["pkg.c", "pkg.d"]]


def test_checker_finds_private_imports(tmp_path):
    package = _write_package(
        tmp_path,
        {
            "__init__.py": "__version__ = '1'\n_SECRET = 1\n",
            "d.py": "_helper = 1\nPUBLIC = 2\n",
            "e.py": (
                "from pkg.d import PUBLIC, _helper\n"
                "from pkg import __version__, _SECRET\n"  # its own package's __init__: not a crossing
                "def f():\n"
                "    from .d import _helper as h\n"
                "    return h\n"
            ),
            "sub/__init__.py": "",
            "sub/_impl.py": "VALUE = 1\n",
            "sub/user.py": "from pkg.sub._impl import VALUE\n",  # inside its own package: allowed
            "f.py": "from pkg.sub import _impl\n",  # a private module from outside its package
        },
    )
    graph = import_graph(package)
    assert graph.private == [
        "pkg/e.py:1: pkg.e imports _helper from pkg.d",
        "pkg/e.py:4: pkg.e imports _helper from pkg.d",
        "pkg/f.py:1: pkg.f imports the private module pkg.sub._impl",
    ]
    assert strongly_connected(graph.successors()) == []


def test_checker_does_not_count_a_package_importing_its_own_init(tmp_path):
    package = _write_package(
        tmp_path,
        {
            "__init__.py": "from pkg.sub import thing\n",
            "sub/__init__.py": "from .impl import thing\n",
            "sub/impl.py": "from pkg.sub import helper\nfrom pkg import CONSTANT\nthing = 1\n",
        },
    )
    graph = import_graph(package)
    assert strongly_connected(graph.successors()) == []
    assert sorted((e.importer, e.target) for e in graph.edges) == [
        ("pkg", "pkg.sub"),
        ("pkg.sub", "pkg.sub.impl"),
    ]


def test_checker_on_a_clean_package(tmp_path):
    package = _write_package(
        tmp_path,
        {
            "low.py": "import json\nimport torch\nX = 1\n",
            "high.py": "from pkg.low import X\nfrom . import low\n",
        },
    )
    graph = import_graph(package)
    assert strongly_connected(graph.successors()) == [] and graph.private == []
    assert {(e.importer, e.target) for e in graph.edges} == {("pkg.high", "pkg.low")}
