"""The check stage under the real `dvc exp run`: a bad override stops the pipeline before any stage runs."""

from __future__ import annotations

import pytest

from tests.helpers import TINY_PIPELINE, copy_project, run_command


@pytest.mark.slow
@pytest.mark.parametrize("override, words", [
    ("+optimizer.lrr=0.5", ["'optimizer.lrr'", "optimizer.lr"]),
    ("+data.typo=1", ["'data.typo'"]),  # no stage but check reads data.typo: the check stage must run
    ("paths.prepared=elsewhere", ["paths.prepared=elsewhere differs from data/prepared"]),
])
def test_dvc_exp_run_stops_before_anything_runs(tmp_path_factory, override, words):
    project = copy_project(tmp_path_factory.mktemp("check") / "project", TINY_PIPELINE)
    proc = run_command(["dvc", "exp", "run", "-S", override], project, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-2000:]
    for word in words:
        assert word in output, output[-2000:]
    assert not (project / "data/prepared").exists() and not (project / "models/gpt").exists()
