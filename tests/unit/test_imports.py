"""No import cycle among lmforge's modules, counting imports inside functions too.

A function-level import hides a cycle from Python (it resolves at call time), not from a reader:
two modules that import each other are one concern split in two. This reads every module's
``import`` and ``from ... import`` statements with ``ast`` (wherever they are, relative ones
resolved) and fails on any cycle in the resulting graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "src" / "lmforge"


def module_name(path: Path, source: Path) -> str:
    """``src/lmforge/corpus/stage.py`` -> ``lmforge.corpus.stage``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(source).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, source: Path, modules: set[str]) -> set[str]:
    """Which of ``modules`` the file ``path`` imports anywhere in its body (a name imported from a
    package counts as that submodule when one exists, else as the package)."""
    name = module_name(path, source)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                found.add(submodule if submodule in modules else origin)
    # `import lmforge.corpus.stage` also runs lmforge.corpus; the package's own __init__ is not an edge.
    targets = set()
    for module in found:
        while module and module not in modules:
            module = module.rpartition(".")[0]
        if module and module != name:
            targets.add(module)
    return targets


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of the package directory ``package`` -> the package's modules it imports."""
    source = package.parent
    paths = sorted(package.rglob("*.py"))
    modules = {module_name(p, source) for p in paths}
    return {module_name(p, source): imported_modules(p, source, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search, colours)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``graph`` with each module replaced by its package (``lmforge.corpus.stage`` -> ``lmforge.corpus``;
    a top-level module such as ``lmforge.errors`` stays itself), edges inside a package dropped."""

    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(package(module), set()).update(package(t) for t in targets)
    return {name: targets - {name} for name, targets in packages.items()}


def test_no_import_cycle_among_lmforge_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_among_lmforge_packages():
    # corpus -> engines -> corpus is no cycle between modules, yet makes two packages one concern.
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
    # The check itself must be able to fail: a cycle hidden in a function and one made of a
    # relative import are both found.
    package = tmp_path / "lmforge"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("import json\n\ndef f():\n    from lmforge.b import g\n")
    (package / "b.py").write_text("from lmforge.sub import c\n")
    (package / "sub" / "c.py").write_text("def h():\n    from ..a import f\n")
    graph = import_graph(package)
    assert graph["lmforge.a"] == {"lmforge.b"}
    assert graph["lmforge.b"] == {"lmforge.sub.c"}
    assert graph["lmforge.sub.c"] == {"lmforge.a"}
    assert find_cycle(graph) == ["lmforge.a", "lmforge.b", "lmforge.sub.c", "lmforge.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None
