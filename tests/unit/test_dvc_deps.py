"""dvc.yaml declares what each stage runs and reads, derived rather than kept by hand.

Code: the lmforge modules a stage's entry point imports, transitively, at module level and inside
functions (the AST of every module on the way), declared by package: a stage depends on
``src/lmforge/<package>`` for each package it runs and on each top-level module it imports, and on
nothing else, so an edit re-runs exactly the stages that run the edited package.
``stages/runner.py`` is read per stage: its own imports, the stage runner's, and the one branch of
``stage_function`` that picks the stage. ``stages/check.py`` only accepts or refuses a configuration
and writes nothing a data stage outputs, so the walk stops there (except for the ``check`` stage,
whose output it writes).

Params: every config key a stage reads while it runs, recorded on the real stages of a tiny
project. ``paths.*`` are not params: dvc.yaml names the paths as literal deps and outs, and a
stage under DVC refuses a ``paths.*`` that differs from them (``checks.check_dvc_paths``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

SRC = ROOT / "src"
STAGE_NAMES = ("check", "prepare", "vocab", "tokenize", "train", "evaluate")
RUNNER = SRC / "lmforge/stages/runner.py"
CHECK_STAGE = SRC / "lmforge/stages/check.py"
RUNNER_FUNCTIONS = ("run_stage", "_run_stage", "guarded")


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The file of module ``name`` (``lmforge.corpus`` -> its ``__init__.py``), or None for an attribute."""
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(nodes) -> set[str]:
    """Every lmforge module (or module attribute) that the import statements under ``nodes`` name."""
    names = set()
    for tree in nodes:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.startswith("lmforge")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmforge"):
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def runner_nodes(stage: str) -> list:
    """The parts of stages.py that run for ``stage``: module level, the runner, and its ``stage_function`` branch."""
    tree = ast.parse((SRC / "lmforge/stages/runner.py").read_text())
    nodes = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        if fn.name in RUNNER_FUNCTIONS:
            nodes.append(fn)
        elif fn.name == "stage_function":
            branch = next(n for n in ast.walk(fn) if isinstance(n, ast.If) and isinstance(n.test, ast.Compare)
                          and any(isinstance(c, ast.Constant) and c.value == stage for c in n.test.comparators))
            nodes.extend(branch.body)
    return nodes


def code_closure(stage: str) -> set[Path]:
    """The lmforge files that ``pipelines/<stage>.py`` imports, transitively."""
    entry = ROOT / "pipelines" / f"{stage}.py"
    files: set[Path] = set()
    todo = [name for name in imported_names([ast.parse(entry.read_text())])]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None:
            continue
        # Importing a.b.c runs the __init__ of a.b first.
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) not in {n for n in todo}]
        if path in files:
            continue
        if path == CHECK_STAGE and stage != "check":
            continue  # accepts or refuses a config; writes nothing a data stage outputs
        files.add(path)
        nodes = runner_nodes(stage) if path == RUNNER else [ast.parse(path.read_text())]
        todo += sorted(imported_names(nodes))
    return {f for f in files if f != SRC / "lmforge/__init__.py"}  # the package's empty __init__


def code_deps(stage: str) -> list[str]:
    """What dvc.yaml must declare for ``stage``'s code: each package it runs, each top-level module."""
    deps = set()
    for path in code_closure(stage):
        parts = path.relative_to(SRC / "lmforge").parts
        deps.add(f"src/lmforge/{parts[0]}" if len(parts) > 1 else f"src/lmforge/{parts[0]}")
    return sorted(deps)


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_a_stage_depends_on_exactly_the_packages_it_runs(stage):
    deps = [d if isinstance(d, str) else next(iter(d)) for d in dvc_stages()[stage]["deps"]]
    assert f"pipelines/{stage}.py" in deps
    closure = code_closure(stage)
    assert RUNNER in closure and SRC / "lmforge/config/compose.py" in closure  # the walk itself works
    declared = sorted(d for d in deps if d.startswith("src/"))
    expected = code_deps(stage)
    assert declared == expected, (f"dvc.yaml stage '{stage}' declares {declared} but runs {expected}: "
                                  f"missing {sorted(set(expected) - set(declared))}, "
                                  f"not run {sorted(set(declared) - set(expected))}")


def test_the_walk_follows_function_level_imports():
    # training.stage imports lmforge.serving.pyfunc inside a function: it must count.
    assert SRC / "lmforge/serving/pyfunc.py" in code_closure("train")
    assert SRC / "lmforge/training/stage.py" not in code_closure("prepare")


@pytest.mark.parametrize("package, reruns", [("corpus", {"check", "prepare"}),
                                             ("engines", {"check", "prepare", "tokenize"})])
def test_an_edit_reruns_only_the_stages_that_run_it(package, reruns):
    # An edit to the JSONL reader or the Ray engine must not re-run training (hours, on a GPU).
    assert {s for s in STAGE_NAMES if f"src/lmforge/{package}" in code_deps(s)} <= reruns


# --- params: recorded while the real stages run on a tiny project ---










def rewrite_dvc_yaml() -> None:
    """Rewrite the ``src/`` deps of every stage in dvc.yaml to what ``code_deps`` derives."""
    lines, out, stage, i = (ROOT / "dvc.yaml").read_text().split("\n"), [], None, 0
    while i < len(lines):
        if match := re.match(r"^  (\w+):", lines[i]):
            stage = match.group(1)
        if stage in STAGE_NAMES and lines[i].startswith("      - src/"):
            while i < len(lines) and lines[i].startswith("      - src/"):
                i += 1
            out += [f"      - {dep}" for dep in code_deps(stage)]
            continue
        out.append(lines[i])
        i += 1
    (ROOT / "dvc.yaml").write_text("\n".join(out))


if __name__ == "__main__":  # python -m tests.unit.test_dvc_deps: after moving code between packages
    rewrite_dvc_yaml()
