"""The installed `lmforge` command and the stage scripts: a mistake is one line on stderr and exit status 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_model_dir


def test_bad_input_through_the_installed_command(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    lmforge = Path(sys.executable).parent / "lmforge"
    proc = subprocess.run([str(lmforge), "generate", "--model", str(model_dir), "--prompt", "the", "--top-p", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "error: sampling.top_p=2.0 must be in (0, 1] or null.\n"


def test_the_prepare_cli_exits_1_with_one_line_and_writes_nothing(project_root, tmp_path):
    out = tmp_path / "prepared"
    proc = subprocess.run(
        [sys.executable, "pipelines/prepare.py", f"data.sources=[{tmp_path}/missing.txt]",
         f"paths.prepared={out}", f"paths.reports={tmp_path}/reports"],
        cwd=project_root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: data.sources path '{tmp_path}/missing.txt' does not exist; " \
                                  "fix the path in data.sources."
    assert not out.exists() and not (tmp_path / "reports").exists()


def project_without_outputs(directory: Path) -> Path:
    """conf/, params.yaml and the pipeline scripts: enough for `lmforge check` and a stage's checks."""
    import shutil

    from tests.helpers import ROOT

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "conf", directory / "conf")
    shutil.copytree(ROOT / "pipelines", directory / "pipelines")
    shutil.copy2(ROOT / "params.yaml", directory / "params.yaml")
    return directory


def lmforge_in(directory: Path, *args: str) -> subprocess.CompletedProcess:
    from tests.helpers import run_command

    return run_command([str(Path(sys.executable).parent / "lmforge"), *args], directory, check=False)


# Issue 20 item 6: what the stages refused (or crashed on, leaving FAILED MLflow runs) `check` passed.
@pytest.mark.parametrize("overrides, line", [
    (["data.val_fraction=1.5"], "error: data.val_fraction=1.5 must be in (0, 1) (e.g. 0.1)."),
    (["tokenizer=bpe", "tokenizer.vocab_size=200"],
     "error: tokenizer.vocab_size=200 is too small: byte-level BPE needs at least 257 (256 byte tokens plus "
     "1 special token); set tokenizer.vocab_size to 257 or more."),
    (["optimizer.lr=-1"], "error: optimizer.lr=-1 must be a positive number."),
    (["optimizer.lr=nan"], "error: optimizer.lr=nan is not a finite number; it must be a positive number."),
    (["seed=true"], "error: seed=True must be an integer in [0, 4294967295]."),
])
def test_check_and_the_train_stage_refuse_alike_in_one_line_with_no_mlflow_run(tmp_path, overrides, line):
    project = project_without_outputs(tmp_path / "project")
    check = lmforge_in(project, "check", *overrides)
    train = lmforge_in(project, "train", *overrides)
    for proc in (check, train):
        assert (proc.returncode, proc.stderr, proc.stdout) == (1, line + "\n", ""), proc.stderr[-2000:]
    assert sorted(p.name for p in project.iterdir()) == ["conf", "params.yaml", "pipelines"]  # no mlflow.db


# Issue 20 item 7: Hydra's page for a bad group choice, one line everywhere.
@pytest.mark.parametrize("override, line", [
    ("model=nope", "error: unknown choice 'nope' for config group 'model'; valid choices: baby, baby-llama, "
                   "gpt2-medium, gpt2-small, llama-small, tiny."),
    ("tokenizer=BPE", "error: unknown choice 'BPE' for config group 'tokenizer'; valid choices: bpe, char, word."),
])
def test_a_bad_group_choice_is_one_line_from_check_compose_and_every_stage_script(tmp_path, override, line):
    project = project_without_outputs(tmp_path / "project")
    procs = [lmforge_in(project, "check", override), lmforge_in(project, "compose", override),
             lmforge_in(project, "prepare", override)]
    from tests.helpers import run_command

    procs.append(run_command([sys.executable, "pipelines/tokenize.py", override], project, check=False))
    for proc in procs:
        assert (proc.returncode, proc.stderr) == (1, line + "\n"), proc.stderr[-2000:]


def test_generate_from_a_model_uri_where_there_is_no_store_creates_none(tmp_path):
    project = project_without_outputs(tmp_path / "project")
    proc = lmforge_in(project, "generate", "--model", "models:/nope/1", "--prompt", "the")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: there is no MLflow store at sqlite:///{project.resolve()}/mlflow.db")
    assert not (project / "mlflow.db").exists()
