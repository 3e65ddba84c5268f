"""Surviving: kill -9 or Ctrl-C mid-run, run again with train.resume=auto, and the result is the
uninterrupted run's, bit for bit: weights, the curves in the model directory, the MLflow metrics,
in the same MLflow run. Real `python pipelines/train.py` processes in a temporary project."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, make_project

pytestmark = pytest.mark.slow

# Dropout on, so that a resumed run also needs the restored random-number state.
TINY = ["model=tiny", "model.dropout=0.1", "train.max_steps=400", "train.eval_interval=50", "train.eval_iters=2",
        "train.log_every=10", "train.checkpoint_every=40", "trainer.num_threads=1", "tracking.log_model=false"]




def train_process(project: Path, *overrides: str, flush_every_add: bool = False, **popen) -> subprocess.Popen:
    """``python pipelines/train.py`` in ``project``; ``flush_every_add``: the same stage with every metric
    sent to MLflow at once (as a 10 s flush would in a long run), so a kill leaves steps past the checkpoint."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, str(ROOT / "pipelines/train.py"), *overrides]
    if flush_every_add:
        cmd = [sys.executable, "-c", "import sys; import lmforge.tracking.runs as t; t.MetricsLog.FLUSH_SECONDS = -1; "
               "from lmforge.stages.runner import run_stage; run_stage('train', sys.argv[1:])", *overrides]
    return subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def run_train(project: Path, *overrides: str) -> None:
    proc = train_process(project, *overrides)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"train failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}"


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def wait_for_checkpoint(project: Path, min_step: int, proc: subprocess.Popen, timeout: float = 180) -> int:
    """Wait until last.ckpt holds step >= min_step while ``proc`` still runs; return that step."""
    path = project / "models/checkpoints/last.ckpt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended before step {min_step} was saved:\n{proc.stderr.read()[-3000:]}"
        if path.is_file() and (step := checkpoint_step(path)) >= min_step:
            return step
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at step {min_step} within {timeout} s")


def run_record(project: Path) -> dict:
    return json.loads((project / "models/checkpoints/run.json").read_text())


def mlflow_run(project: Path, run_id: str) -> tuple[str, dict[str, dict[int, list[float]]]]:
    """The run's status and its metrics as {key: {step: [every value logged at that step]}}."""
    db = sqlite3.connect(project / "mlflow.db")
    status = db.execute("select status from runs where run_uuid=?", (run_id,)).fetchone()[0]
    metrics: dict[str, dict[int, list[float]]] = {}
    # The metrics table holds one row per logged point (its key includes the value and timestamp).
    for key, step, value in db.execute("select key, step, value from metrics where run_uuid=?", (run_id,)):
        metrics.setdefault(key, {}).setdefault(step, []).append(value)
    db.close()
    return status, metrics


def assert_same_training(run: Path, reference: Path) -> None:
    """Weights, curves and logged metrics of ``run`` equal those of ``reference``, bit for bit."""
    weights = load_file(run / "models/gpt/model.safetensors")
    expected = load_file(reference / "models/gpt/model.safetensors")
    assert weights.keys() == expected.keys()
    for name in weights:
        assert torch.equal(weights[name], expected[name]), name
    for curve in ("train_loss.csv", "val_loss.csv"):
        assert (run / "models/gpt/curves" / curve).read_text() == (reference / "models/gpt/curves" / curve).read_text()
    _, metrics = mlflow_run(run, run_record(run)["run_id"])
    _, expected_metrics = mlflow_run(reference, run_record(reference)["run_id"])
    for key in ("train/loss", "train/lr", "val/loss"):
        # Each step once: a step logged before the interruption is not logged again after the resume.
        twice = {step: values for step, values in metrics[key].items() if len(values) > 1}
        assert not twice, f"{key} logged more than once at steps {sorted(twice)}"
        assert metrics[key] == expected_metrics[key], key


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("resume") / "project", TINY)


@pytest.fixture(scope="module")
def reference(project, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    directory = tmp_path_factory.mktemp("reference") / "project"
    shutil.copytree(project, directory)
    run_train(directory)
    return directory


def test_kill_9_then_resume_equals_the_uninterrupted_run(project, reference, tmp_path):
    directory = tmp_path / "project"
    shutil.copytree(project, directory)
    proc = train_process(directory, "train.resume=auto")
    saved = wait_for_checkpoint(directory, 80, proc)
    time.sleep(0.1)  # a few steps past the checkpoint: they are logged now and again after the resume
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert saved < 400 and not (directory / "models/gpt").exists()
    run_id = run_record(directory)["run_id"]
    assert mlflow_run(directory, run_id)[0] == "RUNNING"  # nobody was left to close it

    run_train(directory, "train.resume=auto")
    assert run_record(directory)["run_id"] == run_id
    assert json.loads((directory / "models/gpt/run.json").read_text())["run_id"] == run_id
    assert mlflow_run(directory, run_id)[0] == "FINISHED"
    assert_same_training(directory, reference)


# Ctrl-C; and what SLURM and Kubernetes send before a kill. Either one finishes the step, saves,
# marks the run KILLED and exits 128 + the signal; the resumed run is the uninterrupted one.
STOPS = [(signal.SIGINT, 130, "interrupted at step"), (signal.SIGTERM, 143, "terminated (SIGTERM) at step")]


@pytest.mark.parametrize(("signum", "status", "message"), STOPS, ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_saves_a_checkpoint_marks_the_run_killed_and_resumes_exactly(
        project, reference, tmp_path, signum, status, message):
    directory = tmp_path / "project"
    shutil.copytree(project, directory)
    proc = train_process(directory, "train.resume=auto")
    wait_for_checkpoint(directory, 40, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err[-3000:]
    stopped = checkpoint_step(directory / "models/checkpoints/last.ckpt")
    assert 40 <= stopped < 400
    assert f"{message} {stopped}" in out
    run_id = run_record(directory)["run_id"]
    assert mlflow_run(directory, run_id)[0] == "KILLED"

    run_train(directory, "train.resume=auto")
    assert run_record(directory)["run_id"] == run_id
    assert mlflow_run(directory, run_id)[0] == "FINISHED"
    assert_same_training(directory, reference)


def test_steps_logged_past_the_checkpoint_are_not_logged_again(project, reference, tmp_path):
    # A kill after metrics past the last checkpoint reached MLflow: the resumed run must skip them.
    directory = tmp_path / "project"
    shutil.copytree(project, directory)
    # checkpoint_every is not part of the fingerprint; at 200 the next save (400) is the end of the run.
    proc = train_process(directory, "train.resume=auto", "train.checkpoint_every=200", flush_every_add=True)
    saved = wait_for_checkpoint(directory, 200, proc)
    run_id = run_record(directory)["run_id"]
    deadline = time.monotonic() + 60
    while max(mlflow_run(directory, run_id)[1].get("train/loss", {0: []})) <= saved + 10:
        assert proc.poll() is None and time.monotonic() < deadline, "no step past the checkpoint was logged"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    last_logged = max(mlflow_run(directory, run_id)[1]["train/loss"])
    assert checkpoint_step(directory / "models/checkpoints/last.ckpt") < last_logged

    run_train(directory, "train.resume=auto", "train.checkpoint_every=200")
    assert_same_training(directory, reference)
