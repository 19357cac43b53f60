"""The shape of the house: no import cycles, and private modules stay private to their package.

Read from the source with :mod:`ast`, so every import counts: top-level and lazy (inside a
function) alike. Imports under ``if TYPE_CHECKING:`` are left out: they never run, so they cannot
make an import order fail, and annotations may name a type from a module that uses this one.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

import featurescope

PACKAGE_DIR = Path(featurescope.__file__).parent
ROOT = "featurescope"

#: The layers, lowest first: a module may import its own layer or any layer below it.
LAYERS = (
    (
        "featurescope._version",
        "featurescope._io",
        "featurescope._printable",
        "featurescope._progress",
        "featurescope._torch_utils",
        "featurescope.errors",
    ),
    ("featurescope.hookspecs",),
    ("featurescope.plugins",),
    ("featurescope.data",),
    ("featurescope.index",),
    ("featurescope.zoo",),
    ("featurescope.tap",),
    ("featurescope.visualizers",),
    # units draws with the visualizers (write_units); the visualizers take its tensors only.
    ("featurescope.units",),
    ("featurescope.compare",),
    ("featurescope.train",),
    ("featurescope.pages",),
    # The web app takes an ImageSearch but imports none of study's code (ImageSearch.serve()
    # delegates down to it).
    ("featurescope.serve",),
    ("featurescope.study",),
    ("featurescope.cli", "featurescope.__main__"),
)


#: Packages that must not know of each other even where the layers would allow it.
NEVER = {
    "featurescope.index": ("featurescope.zoo", "featurescope.tap", "featurescope.visualizers"),
    "featurescope.visualizers": ("featurescope.zoo", "featurescope.tap", "featurescope.compare"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[tuple[ast.stmt, str, list[str]]]:
    """``(node, module, names)`` for every import that can run."""
    found: list[tuple[ast.stmt, str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node, alias.name, []))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node, node.module, [a.name for a in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(module: str, names: list[str]) -> list[str]:
    """The featurescope modules an import statement loads (a submodule if a name is one)."""
    if module != ROOT and not module.startswith(ROOT + "."):
        return []
    targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    if len(targets) < len(names) or not names:
        targets.append(module)
    return [t for t in targets if t in MODULES]


@functools.cache  # every test reads the same graph; parsing the package once is enough
def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges = graph.setdefault(name, set())
        for _node, module, names in _runtime_imports(tree):
            edges.update(t for t in _targets(module, names) if t != name)
    return graph


def _package_of(module: str) -> str:
    path = MODULES[module]
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _layer(module: str) -> int:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    raise AssertionError(f"{module} belongs to no layer of LAYERS: add it there")


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state and module != ROOT:
            walk(module)
    assert not [c for c in cycles if ROOT not in c], "import cycles:\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def test_nothing_inside_imports_the_root_package() -> None:
    """The root ``__init__`` gathers the public API; a module below it importing it would form a
    cycle. Only the CLI, which nothing imports, uses the public API as a user does."""
    top = len(LAYERS) - 1
    offenders = [
        m for m, edges in _graph().items() if m != ROOT and ROOT in edges and _layer(m) < top
    ]
    assert not offenders, f"import from a submodule, not from 'featurescope': {offenders}"


def test_private_modules_stay_in_their_package() -> None:
    """``featurescope.a._b`` is imported only from inside ``featurescope.a``."""
    offenders = []
    for importer, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        home = _package_of(importer)
        for node, module, names in _runtime_imports(tree):
            for target in [module, *(f"{module}.{n}" for n in names)]:
                parts = target.split(".")
                for i, part in enumerate(parts):
                    if part.startswith("_") and not part.startswith("__"):
                        owner = ".".join(parts[:i])
                        if owner.startswith(ROOT) and not (
                            home == owner or home.startswith(owner + ".")
                        ):
                            offenders.append(f"{importer}:{node.lineno} imports {target}")
                        break
    assert not offenders, "private names used outside their package:\n" + "\n".join(offenders)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_dependencies_point_down(module: str) -> None:
    """Data → zoo → tap → visualizers | index → study → CLI, never back up."""
    if module == ROOT:
        return
    up = sorted(t for t in _graph()[module] if t != ROOT and _layer(t) > _layer(module))
    assert not up, f"{module} (layer {_layer(module)}) imports higher layers: {up}"


def test_independent_packages_stay_apart() -> None:
    """The index knows nothing of models; visualizers take tensors and search results."""
    offenders = []
    for module, edges in _graph().items():
        for owner, banned in NEVER.items():
            if module == owner or module.startswith(owner + "."):
                offenders += [
                    f"{module} imports {t}"
                    for t in sorted(edges)
                    if any(t == b or t.startswith(b + ".") for b in banned)
                ]
    assert not offenders, "\n".join(offenders)
