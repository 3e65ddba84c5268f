"""Surviving: kill -9 or Ctrl-C mid-run, run again (train.resume=auto is the default), and the result
is the uninterrupted run's, bit for bit: weights, the curves in the model directory, the MLflow
metrics, in the same MLflow run. Real `python pipelines/train.py` processes in a temporary project,
and real `dvc repro` / `dvc exp run` pressed Ctrl-C on as a terminal does (SIGINT to the process
group): a plain `dvc repro` resumes, a checkpoint of another configuration is kept aside, and the
MLflow run carries the name of the experiment that finished it and what changed between attempts."""

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

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import BIN, ROOT, commit_all, copy_project, make_project, run_command, write_corpus

pytestmark = pytest.mark.slow

# Dropout on, so that a resumed run also needs the restored random-number state. The precision is
# pinned: `auto` is settled by a timing probe, and the uninterrupted reference run must not answer
# otherwise than the interrupted one (a resumed run keeps its run's answer: see the test below).
TINY = ["model=tiny", "model.dropout=0.1", "train.max_steps=400", "train.eval_interval=50", "train.eval_iters=2",
        "train.log_every=10", "train.checkpoint_every=40", "trainer.num_threads=1", "trainer.precision=32",
        "tracking.log_model=false"]




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


# --- Through DVC: Ctrl-C on `dvc repro` / `dvc exp run`, then a plain rerun ---

# The project's settings: TINY on a small corpus of its own (composed into params.yaml, or passed to
# `dvc exp run -S`, which composes conf/ afresh).
DVC_TINY = [*TINY, "data.sources=[corpus]", "evaluate.max_batches=2", "evaluate.max_new_tokens=20"]


@pytest.fixture(scope="module")
def dvc_base(tmp_path_factory) -> Path:
    """A git + DVC project with DVC_TINY in params.yaml and its data stages run and committed."""
    project = copy_project(tmp_path_factory.mktemp("dvc-resume") / "project", DVC_TINY)
    write_corpus(project / "corpus", n_docs=12, words=300)
    run_command(["dvc", "repro", "tokenize"], project)
    commit_all(project, "corpus and data stages")
    return project


@pytest.fixture(scope="module")
def dvc_reference(dvc_base, tmp_path_factory) -> Path:
    """The uninterrupted `dvc repro`."""
    directory = tmp_path_factory.mktemp("dvc-reference") / "project"
    shutil.copytree(dvc_base, directory, symlinks=True)
    run_command(["dvc", "repro"], directory)
    return directory


def press_ctrl_c(cmd: list[str], project: Path, min_step: int, log: Path) -> tuple[int, str]:
    """Run ``cmd`` in its own process group, as a terminal runs a command, and press Ctrl-C (SIGINT to
    the whole group: DVC and the stage it runs) once last.ckpt holds step >= ``min_step``."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DVC_")},
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log, "w") as out:  # a file, not a pipe nobody reads while waiting
        proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        path, deadline = project / "models/checkpoints/last.ckpt", time.monotonic() + 300
        while not (path.is_file() and checkpoint_step(path) >= min_step):
            assert proc.poll() is None, f"{cmd} ended before step {min_step} was saved:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint at step {min_step}:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    return proc.returncode, log.read_text()


def test_a_plain_dvc_repro_after_ctrl_c_resumes_bit_for_bit(dvc_base, dvc_reference, tmp_path):
    directory = tmp_path / "project"
    shutil.copytree(dvc_base, directory, symlinks=True)
    status, out = press_ctrl_c(["dvc", "repro"], directory, 40, tmp_path / "first.log")
    assert status != 0 and "interrupted at step" in out, out[-3000:]
    stopped = checkpoint_step(directory / "models/checkpoints/last.ckpt")
    assert 40 <= stopped < 400 and not (directory / "models/gpt").exists()
    run_id = run_record(directory)["run_id"]
    assert mlflow_run(directory, run_id)[0] == "KILLED"

    out = run_command(["dvc", "repro"], directory).stdout  # no override: resuming is the default
    assert f"resuming from models/checkpoints/last.ckpt in MLflow run {run_id}" in out
    assert run_record(directory)["run_id"] == run_id and mlflow_run(directory, run_id)[0] == "FINISHED"
    assert_same_training(directory, dvc_reference)
    assert not list((directory / "models").glob("checkpoints.*"))  # nothing was kept aside


def test_a_new_configuration_keeps_the_unfinished_checkpoints_aside(dvc_base, tmp_path):
    directory = tmp_path / "project"
    shutil.copytree(dvc_base, directory, symlinks=True)
    press_ctrl_c(["dvc", "repro"], directory, 40, tmp_path / "first.log")
    checkpoints = directory / "models/checkpoints"
    saved = {path.name: path.read_bytes() for path in checkpoints.iterdir()}
    stopped, record = checkpoint_step(checkpoints / "last.ckpt"), run_record(directory)

    # Another configuration (max_steps is part of the trajectory), reproduced by a plain `dvc repro`.
    run_command([str(BIN / "lmforge"), "compose", *DVC_TINY, "train.max_steps=30"], directory)
    out = run_command(["dvc", "repro"], directory).stdout
    backup = directory / f"models/checkpoints.gpt-char-{record['run_id'][:8]}-step{stopped}"
    assert {path.name: path.read_bytes() for path in backup.iterdir() if path.name != "note.txt"} == saved
    note = (backup / "note.txt").read_text()
    assert note.count("\n") == 1 and "a run of another configuration" in note and f"step {stopped}" in note
    assert f"train: {note}" in out
    assert run_record(directory)["run_id"] != record["run_id"]
    assert checkpoint_step(checkpoints / "last.ckpt") == 30  # the new run's own


def test_dvc_exp_run_after_ctrl_c_names_the_run_after_the_experiment_that_finished_it(dvc_base, tmp_path):
    from mlflow.tracking import MlflowClient

    directory = tmp_path / "project"
    shutil.copytree(dvc_base, directory, symlinks=True)
    settings = [arg for setting in DVC_TINY for arg in ("-S", setting)]
    press_ctrl_c(["dvc", "exp", "run", "-n", "first", *settings], directory, 40, tmp_path / "first.log")
    run_id = run_record(directory)["run_id"]
    # The reports DVC wrote are committed, as a project's are: rewriting them must not count as dirty.
    commit_all(directory, "reports of the first attempt")
    head = run_command(["git", "rev-parse", "HEAD"], directory).stdout.strip()

    run_command(["dvc", "exp", "run", "-n", "second", *settings, "-S", "trainer.num_threads=2"], directory)
    assert "second" in run_command(["dvc", "exp", "list", "--name-only"], directory).stdout.split()
    run = MlflowClient(tracking_uri=f"sqlite:///{directory / 'mlflow.db'}").get_run(run_id)
    assert run_record(directory)["run_id"] == run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "second" and run.data.tags["lmforge.dvc_experiment"] == "second"
    assert run.data.tags["lmforge.git_dirty"] == "false"  # dvc.lock, params.yaml, reports/*.json: DVC's
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["lmforge.attempts"] == "2"
    changed = run.data.tags["lmforge.attempt2.changed"].split("; ")
    assert "trainer.num_threads: 1 -> 2" in changed and "lmforge.dvc_experiment: first -> second" in changed
    assert "run name: first -> second" in changed
    assert any(c.startswith("mlflow.source.git.commit: ") and c.endswith(f" -> {head}") for c in changed)
    params = run.data.params
    assert params["trainer.num_threads"] == "1" and params["attempt2/trainer.num_threads"] == "2"  # write-once
    shown = run_command([str(BIN / "lmforge"), "runs", "show", run_id], directory).stdout
    assert "attempts         2" in shown and "trainer.num_threads: 1 -> 2" in shown


class StopAt(L.Callback):
    """Presses Ctrl-C (SIGINT to this process) at the end of optimizer step ``step``; records the
    precision each fit runs at."""

    def __init__(self, step: int | None = None):
        self.step, self.precisions = step, []

    def on_train_start(self, trainer, pl_module):
        self.precisions.append(trainer.precision)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not pl_module.mid_step:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_resumed_run_keeps_the_precision_its_run_started_with(tokens_cfg, monkeypatch):
    # trainer.precision=auto is settled by a timing probe: a busy machine may answer otherwise on
    # the second attempt, and that attempt must not switch precision halfway through the run.
    from mlflow.tracking import MlflowClient

    from lmforge.training import hardware
    from lmforge.training.stage import train_stage

    cfg = tokens_cfg
    cfg.tracking.log_model, cfg.trainer.precision = False, "auto"
    cfg.train.update({"max_steps": 12, "eval_interval": 6, "checkpoint_every": 4})
    monkeypatch.setattr(hardware, "resolve_precision", lambda precision, accelerator: "32")
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, callbacks=[StopAt(5)])
    record = json.loads(Path(cfg.paths.checkpoints, "run.json").read_text())
    assert record["precision"] == "32"

    monkeypatch.setattr(hardware, "resolve_precision", lambda precision, accelerator: "bf16-mixed")
    resumed = StopAt()
    train_stage(cfg, callbacks=[resumed])
    assert resumed.precisions == ["32-true"]
    tags = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(record["run_id"]).data.tags
    assert tags["lmforge.attempts"] == "2" and "hardware.precision" not in tags["lmforge.attempt2.changed"]


def test_a_resumed_run_keeps_the_thread_count_its_run_started_with(tokens_cfg, monkeypatch):
    # trainer.num_threads=auto is settled by a timing probe, remembered per machine; a deleted cache
    # or a busy probe may answer otherwise on the second attempt, and torch's kernels do not give the
    # same bits at every thread count.
    import torch
    from mlflow.tracking import MlflowClient

    from lmforge.training import threads
    from lmforge.training.stage import train_stage

    cfg = tokens_cfg
    cfg.tracking.log_model, cfg.trainer.num_threads = False, "auto"
    cfg.train.update({"max_steps": 12, "eval_interval": 6, "checkpoint_every": 4})
    monkeypatch.setattr(threads, "measured_choice", lambda *a, **k: threads.ThreadChoice(1, "auto: test says 1"))
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, callbacks=[StopAt(5)])
    record = json.loads(Path(cfg.paths.checkpoints, "run.json").read_text())
    assert record["num_threads"] == 1

    monkeypatch.setattr(threads, "measured_choice", lambda *a, **k: threads.ThreadChoice(2, "auto: test says 2"))
    seen = []

    class Threads(StopAt):
        def on_train_start(self, trainer, pl_module):
            seen.append(torch.get_num_threads())

    train_stage(cfg, callbacks=[Threads()])
    assert seen == [1]
    tags = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(record["run_id"]).data.tags
    assert tags["lmforge.attempts"] == "2" and "hardware.num_threads" not in tags["lmforge.attempt2.changed"]
