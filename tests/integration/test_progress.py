"""Progress lines when stderr is not a terminal (make run > log, queued experiments, CI): the real
train stage on a tiny model, its stderr captured as a file would be."""

from __future__ import annotations

import re

import mlflow

from lmforge.outputs import duration
from lmforge.training.callbacks import ProgressLines
from tests.helpers import run_record

LINE = re.compile(r"^step (\d+)/20 \(\d+%\)  train loss (\S+)  val loss (\S+)  ([\d,]+) tokens/s \((\d+) threads?\)  "
                  r"elapsed \S+  ETA \S+$")


def progress_lines(err: str) -> list[re.Match]:
    return [m for m in map(LINE.match, err.splitlines()) if m]


def test_a_run_without_a_terminal_prints_progress_at_each_evaluation(tokens_cfg, capfd):  # noqa: F811
    from lmforge.training.stage import train_stage

    tokens_cfg.tracking.log_model = False  # 20 steps, validation every 10
    train_stage(tokens_cfg)
    lines = progress_lines(capfd.readouterr().err)
    at_evaluations = [m for m in lines if int(m[1]) in (10, 20)]  # (and one every 30 s: none in a quick run)
    assert [int(m[1]) for m in at_evaluations] == [10, 20]
    for m in at_evaluations:
        assert float(m[2]) > 0 and float(m[3]) > 0 and int(m[4].replace(",", "")) > 0
    # The resolved precision and Muon dtype are on the MLflow run.
    params = mlflow.MlflowClient(tokens_cfg.tracking.uri).get_run(run_record(tokens_cfg)["run_id"]).data.params
    assert params["trainer.precision"] == "auto"
    assert params["hardware.precision"] in ("32", "bf16-mixed")
    assert params["hardware.muon_dtype"] in ("float32", "bfloat16")
    # So is the thread count trainer.num_threads=auto (the default on CPU) chose, which the lines show.
    assert params["trainer.num_threads"] == "auto"
    assert {m[5] for m in lines} == {params["hardware.num_threads"]} and int(params["hardware.num_threads"]) >= 1
    assert run_record(tokens_cfg)["num_threads"] == int(params["hardware.num_threads"])


def test_progress_lines_come_every_interval_and_never_on_a_terminal(tokens_cfg, capfd, monkeypatch):  # noqa: F811
    from lmforge.training import stage as training

    tokens_cfg.tracking.log_model = False
    monkeypatch.setattr(ProgressLines, "EVERY_SECONDS", 0.0)  # a line at every step
    training.train_stage(tokens_cfg)
    steps = [int(m[1]) for m in progress_lines(capfd.readouterr().err)]
    assert set(range(1, 21)) <= set(steps)
    monkeypatch.setattr(training, "watched", lambda: True)  # a terminal: Lightning's bar instead
    tokens_cfg.paths.checkpoints = "terminal/checkpoints"
    training.train_stage(tokens_cfg)
    assert progress_lines(capfd.readouterr().err) == []


def test_the_line_reports_rate_and_eta():
    progress = ProgressLines(max_steps=2000, tokens_per_step=768)
    progress._start_step = 0
    line = progress.line(500, 1.61234, None, elapsed=50.0)
    assert line == ("step 500/2000 (25%)  train loss 1.6123  val loss -  7,680 tokens/s  elapsed 50s  ETA 2m30s")
    assert duration(3725) == "1h02m" and duration(59.6) == "1m00s"
    on_two = ProgressLines(max_steps=2000, tokens_per_step=768, threads=2)
    on_two._start_step = 0
    assert "  7,680 tokens/s (2 threads)  " in on_two.line(500, 1.6, None, elapsed=50.0)
    on_one = ProgressLines(max_steps=2000, tokens_per_step=768, threads=1)
    on_one._start_step = 0
    assert "  7,680 tokens/s (1 thread)  " in on_one.line(500, 1.6, None, elapsed=50.0)
