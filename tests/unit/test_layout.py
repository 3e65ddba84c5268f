"""The codebase stays easy to walk: no module over ``MAX_MODULE_LINES``, no function over
``MAX_FUNCTION_LINES`` (the model's ``forward`` may read best whole), and the training package
talks to MLflow only through ``lmforge.tracking.runs``."""

from __future__ import annotations

import ast

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "src" / "lmforge"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
# Reads best as one piece, top to bottom in the order the tensors flow.
EXEMPT_FUNCTIONS = {("model/gpt.py", "GPT.forward")}
MODULES = sorted(PACKAGE.rglob("*.py"))


def functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, lines) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node.end_lineno - node.lineno + 1
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_short(path):
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.name} is over {MAX_MODULE_LINES} lines: split it"
    relative = str(path.relative_to(PACKAGE))
    long = [f"{name} ({lines} lines)" for name, lines in functions(ast.parse(source))
            if lines > MAX_FUNCTION_LINES and (relative, name) not in EXEMPT_FUNCTIONS]
    assert not long, f"{relative}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_every_module_says_what_it_owns():
    missing = [str(p.relative_to(PACKAGE)) for p in MODULES if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without an opening docstring: {missing}"


def test_training_never_imports_mlflow():
    for path in sorted((PACKAGE / "training").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "mlflow" for n in names), f"{path.name} imports mlflow"
