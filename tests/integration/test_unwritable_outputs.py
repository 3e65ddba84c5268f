"""A stage that cannot write one of its outputs says so in one line before it replaces any (issue 20, item 8).

Run through the stage runner (once as the whole ``python pipelines/prepare.py`` command) with ``data/``
or ``reports/`` read-only. chmod does not stop root, so as root a folder is made immutable
(``chattr +i``); either way the helper first checks that a write there really fails, so no test here
can pass vacuously.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, write_corpus


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` made read-only for this process (chmod, or ``chattr +i`` as root), restored after."""
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        undo = lambda: folder.chmod(mode)  # noqa: E731
    else:
        chattr = shutil.which("chattr")
        made = chattr and subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode == 0
        if not made:
            pytest.fail(f"cannot make {folder} read-only as root here (chattr +i failed: no chattr, or a file "
                        "system or container without immutable files); run this test as a user other than root.")
        undo = lambda: subprocess.run([chattr, "-i", str(folder)], check=True)  # noqa: E731
    try:
        with pytest.raises(OSError):  # the premise: a write there really fails
            (folder / ".probe").write_text("x")
        yield
    finally:
        undo()


def arguments(work: Path, *overrides: str) -> list[str]:
    paths = [f"paths.{key}={work / where}" for key, where in
             (("prepared", "data/prepared"), ("vocab", "data/vocab"), ("tokens", "data/tokens"),
              ("reports", "reports"), ("model", "models/gpt"), ("checkpoints", "models/checkpoints"))]
    return [f"data.sources=[{work / 'corpus'}]", "tokenizer=char", *paths, *overrides]


def cli(name: str, work: Path, *overrides: str) -> tuple[int, str]:
    """``python pipelines/<name>.py ...`` as DVC runs it: its exit status and stderr."""
    result = subprocess.run([sys.executable, f"pipelines/{name}.py", *arguments(work, *overrides)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


@pytest.fixture
def stage(capsys, monkeypatch):
    """The same stage runner in this process (no interpreter start-up): its exit status and stderr."""
    from lmforge.stages.runner import run_stage

    monkeypatch.chdir(ROOT)

    def run(name: str, work: Path, *overrides: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            run_stage(name, arguments(work, *overrides))
            code = 0
        except SystemExit as err:
            code = err.code
        return code, capsys.readouterr().err

    return run


def tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden temporaries included) with the hash of a file's bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def one_error_line(result: tuple[int, str], *names: str) -> str:
    code, stderr = result
    assert code == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write "), stderr
    assert all(name in lines[0] for name in names), lines[0]
    return lines[0]


@pytest.fixture
def prepared(tmp_path, stage) -> Path:
    """A work folder where prepare has run once; then the corpus changed, so a rerun would change data/prepared."""
    write_corpus(tmp_path / "corpus", n_docs=12, words=200)
    assert stage("prepare", tmp_path) == (0, "")
    (tmp_path / "corpus/new.txt").write_text("A new document that changes the split.\n" * 20)
    return tmp_path


def test_prepare_with_reports_read_only_replaces_nothing(prepared):
    before = tree(prepared / "data"), tree(prepared / "reports")
    with read_only(prepared / "reports"):
        result = cli("prepare", prepared)  # the whole command, as a user meets it: no traceback
    line = one_error_line(result, str(prepared / "reports/prepare.json"), "paths.reports")
    assert "is not writable" in line and line.endswith("and rerun (nothing was written).")
    # Before the fix: data/prepared was replaced while reports/prepare.json stayed stale.
    assert (tree(prepared / "data"), tree(prepared / "reports")) == before


def test_prepare_with_data_read_only_replaces_nothing(prepared, stage):
    before = tree(prepared / "data"), tree(prepared / "reports")
    with read_only(prepared / "data"):
        result = stage("prepare", prepared)
    one_error_line(result, str(prepared / "data/prepared"), "paths.prepared")
    assert (tree(prepared / "data"), tree(prepared / "reports")) == before


def test_prepare_with_reports_below_a_file_replaces_nothing(prepared, stage):
    # Where no folder can be made read-only: a path whose parent is a regular file fails for root too.
    (prepared / "not-a-folder").write_text("a file")
    before = tree(prepared / "data")
    result = stage("prepare", prepared, f"paths.reports={prepared / 'not-a-folder/reports'}")
    line = one_error_line(result, "paths.reports")
    assert f"{prepared / 'not-a-folder'} is a file, not a folder" in line
    assert tree(prepared / "data") == before


def test_vocab_and_tokenize_check_their_outputs_first(prepared, stage):
    with read_only(prepared / "reports"):
        one_error_line(stage("vocab", prepared), str(prepared / "reports/vocab.json"), "paths.reports")
    assert not (prepared / "data/vocab").exists()  # refused before the vocabulary was built and saved
    assert stage("vocab", prepared)[0] == 0
    with read_only(prepared / "data"):
        one_error_line(stage("tokenize", prepared), str(prepared / "data/tokens"), "paths.tokens")
    assert not (prepared / "data/tokens").exists()
    assert stage("tokenize", prepared)[0] == 0 and (prepared / "data/tokens/index.json").is_file()


def test_train_and_evaluate_check_their_outputs_before_any_work(tmp_path, stage):
    # Nothing to train on or evaluate exists: the one line about the output comes first.
    (tmp_path / "not-a-folder").write_text("a file")
    train = stage("train", tmp_path, f"paths.model={tmp_path / 'not-a-folder/gpt'}")
    one_error_line(train, "paths.model", f"{tmp_path / 'not-a-folder'} is a file, not a folder")
    evaluate = stage("evaluate", tmp_path, f"paths.reports={tmp_path / 'not-a-folder/reports'}")
    one_error_line(evaluate, "paths.reports", f"{tmp_path / 'not-a-folder'} is a file, not a folder")
