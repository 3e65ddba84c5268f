"""Sweeps: `dvc exp run --queue` over a grid, `dvc queue start`, and every run in `dvc exp show`
and in the project's one MLflow store (not in the temporary copies DVC runs them in)."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from tests.helpers import TINY_PIPELINE, run_command

pytestmark = pytest.mark.slow

# Two runs (a config group choice and a value), the smallest grid whose runs differ in both kinds of
# parameter: each run of the full pipeline costs about half a minute of the suite.
GRID = ["-S", "model=tiny,baby", "-S", "optimizer.lr=3e-4"]
# `dvc exp run -S` composes conf/ afresh, so the tiny settings go with the grid.
TINY = [arg for setting in TINY_PIPELINE if not setting.startswith("model=") for arg in ("-S", setting)]


def wait_for_queue(project, timeout: float = 420) -> str:
    """Poll `dvc queue status` until nothing is queued or running; return the last status table."""
    deadline = time.monotonic() + timeout
    while True:
        status = run_command(["dvc", "queue", "status"], project).stdout
        if not any(word in status for word in (" Queued", " Running")):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"the queue did not finish in {timeout} s:\n{status}")
        time.sleep(2)


def test_a_queued_grid_lands_every_run_in_dvc_exp_show_and_the_project_store(dvc_project):
    from mlflow.tracking import MlflowClient

    before = {r.info.run_id for r in _runs(dvc_project)}
    run_command(["dvc", "exp", "run", "--queue", *GRID, *TINY], dvc_project)
    try:
        run_command(["dvc", "queue", "start", "-j", "1"], dvc_project)
        status = wait_for_queue(dvc_project)
    finally:
        run_command(["dvc", "queue", "stop"], dvc_project, check=False)
    assert status.count("Success") == 2 and "Failed" not in status, status

    # dvc exp show: both experiments with their params and metrics.
    shown = json.loads(run_command(["dvc", "exp", "show", "--json"], dvc_project).stdout)
    experiments = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                params = data["params"]["params.yaml"]["data"]
                metrics = data["metrics"]["reports/metrics.json"]["data"]
                experiments[rev["name"]] = (params["model"]["n_layer"], params["optimizer"]["lr"], metrics["val_loss"])
    assert sorted((n, lr) for n, lr, _ in experiments.values()) == [(2, 0.0003), (4, 0.0003)]

    # The MLflow store of the project (not of DVC's temporary copies) holds the same two runs.
    new = [r for r in _runs(dvc_project) if r.info.run_id not in before]
    assert len(new) == 2
    by_name = {r.data.tags["lmforge.dvc_experiment"]: r for r in new}
    assert set(by_name) == set(experiments)
    lock = yaml.safe_load((dvc_project / "dvc.lock").read_text())
    corpus_md5 = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    head = run_command(["git", "rev-parse", "HEAD"], dvc_project).stdout.strip()
    for name, (n_layer, lr, val_loss) in experiments.items():
        run = by_name[name]
        assert run.info.run_name == name and run.info.status == "FINISHED"
        assert run.data.params["model.n_layer"] == str(n_layer)
        assert float(run.data.params["optimizer.lr"]) == lr
        assert run.data.metrics["eval/val_loss"] == pytest.approx(val_loss)
        assert run.data.tags["mlflow.source.git.commit"] == head  # the baseline, not DVC's temporary commit
        assert run.data.tags["lmforge.corpus.md5"] == corpus_md5
        assert run.data.tags["lmforge.hashes_from"] == "dvc.lock"
        artifacts = {a.path for a in MlflowClient(tracking_uri=_uri(dvc_project)).list_artifacts(run.info.run_id)}
        assert {"report.md", "metrics.json"} <= artifacts
    assert not list((dvc_project / ".dvc").rglob("mlflow.db"))


def test_an_unknown_key_in_dvc_exp_run_names_it_and_changes_nothing(dvc_project):
    params = (dvc_project / "params.yaml").read_text()
    proc = run_command(["dvc", "exp", "run", "-S", "train.max_stepz=5"], dvc_project, check=False)
    assert proc.returncode != 0
    # DVC composes with Hydra and prints Hydra's message; it names the key (but, unlike a stage run
    # by hand, suggests no valid keys: DVC offers no hook for that).
    assert "train.max_stepz" in proc.stderr + proc.stdout
    assert (dvc_project / "params.yaml").read_text() == params
    assert run_command(["git", "status", "--porcelain"], dvc_project).stdout == ""


def test_an_unknown_key_in_a_stage_run_by_hand_names_the_nearest_keys(dvc_project):
    proc = run_command(["python", "pipelines/train.py", "train.max_stepz=5"], dvc_project, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert "train.max_stepz" in proc.stderr and "train.max_steps" in proc.stderr


def _uri(project) -> str:
    return f"sqlite:///{project / 'mlflow.db'}"


def _runs(project):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_uri(project))
    experiment = client.get_experiment_by_name("lmforge")
    return client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []
