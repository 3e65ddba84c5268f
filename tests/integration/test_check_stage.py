"""The check stage under the real `dvc exp run`: a bad override stops the pipeline before any stage runs."""

from __future__ import annotations

import sys

import pytest
import yaml

from tests.helpers import BIN, TINY_PIPELINE, copy_project, run_command


@pytest.mark.slow
@pytest.mark.parametrize("override, words", [
    ("+optimizer.lrr=0.5", ["'optimizer.lrr'", "optimizer.lr"]),
    ("+data.typo=1", ["'data.typo'"]),  # no stage but check reads data.typo: the check stage must run
    ("paths.prepared=elsewhere", ["paths.prepared=elsewhere differs from data/prepared"]),
    # Issue 20 item 6: these passed the check stage, then failed in prepare or crashed in train.
    ("data.val_fraction=1.5", ["error: data.val_fraction=1.5 must be in (0, 1)"]),
    ("optimizer.lr=-1", ["error: optimizer.lr=-1 must be a positive number"]),
])
def test_dvc_exp_run_stops_before_anything_runs(tmp_path_factory, override, words):
    project = copy_project(tmp_path_factory.mktemp("check") / "project", TINY_PIPELINE)
    proc = run_command(["dvc", "exp", "run", "-S", override], project, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-2000:]
    for word in words:
        assert word in output, output[-2000:]
    assert not (project / "data/prepared").exists() and not (project / "models/gpt").exists()


@pytest.mark.slow
def test_a_stage_run_by_hand_after_a_failed_exp_run_says_params_yaml_kept_its_overrides(tmp_path_factory):
    # Issue 20 item 5: `dvc exp run -S` writes params.yaml, and a failure leaves it so.
    project = copy_project(tmp_path_factory.mktemp("stale") / "project", TINY_PIPELINE)
    failed = run_command(["dvc", "exp", "run", "-S", "data.val_fraction=1.5"], project, check=False)
    assert failed.returncode != 0
    assert yaml.safe_load((project / "params.yaml").read_text())["data"]["val_fraction"] == 1.5
    by_hand = run_command([sys.executable, "pipelines/prepare.py"], project, check=False)
    assert by_hand.returncode == 1 and by_hand.stderr.count("\n") == 1, by_hand.stderr
    assert by_hand.stderr == (
        "error: data.val_fraction=1.5 must be in (0, 1) (e.g. 0.1); params.yaml sets data.val_fraction=1.5 where "
        "conf/ gives 0.1: a failed `dvc exp run -S` leaves its overrides in params.yaml, so restore it with "
        "`git checkout params.yaml` or `lmforge compose`.\n")
    run_command(["git", "checkout", "params.yaml"], project)
    assert run_command([str(BIN / "lmforge"), "check"], project).stdout.startswith("ok: ")
