"""Reproducibility: two `dvc repro --force` from the same commit on CPU give the same metrics.json
(every metric but the timing ones), the same weights, curves and samples."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import commit_all, run_command

pytestmark = pytest.mark.slow

# Wall-clock measurements: they differ between any two runs, and say nothing about the model.
TIMING = re.compile(r"per_second|seconds|mfu")
SAME_BYTES = ("models/gpt/model.safetensors", "models/gpt/curves/train_loss.csv", "models/gpt/curves/val_loss.csv",
              "reports/samples.md")


def test_two_forced_repros_from_one_commit_give_identical_results(dvc_project):
    first_metrics = json.loads((dvc_project / "reports/metrics.json").read_text())
    first = {name: (dvc_project / name).read_bytes() for name in SAME_BYTES}

    proc = run_command(["dvc", "repro", "--force"], dvc_project)
    # Not a terminal: no stage draws a progress bar (they redraw with carriage returns).
    assert "\r" not in proc.stdout + proc.stderr

    again = json.loads((dvc_project / "reports/metrics.json").read_text())
    model_metrics = {k for k in first_metrics if not TIMING.search(k)}
    assert {"val_loss", "val_bits_per_byte", "val_perplexity"} <= model_metrics
    assert set(again) == set(first_metrics)
    assert {k: again[k] for k in model_metrics} == {k: first_metrics[k] for k in model_metrics}
    for name, content in first.items():
        assert (dvc_project / name).read_bytes() == content, f"{name} differs between the two runs"
    commit_all(dvc_project, "forced repro")  # leave the shared project clean (timings moved)
