"""The MLflow UI in a real browser: two finished pipeline runs on a tracking server, opened side by
side in the comparison view of headless Chromium, their names and validation losses on screen.

Needs Debian's `chromium` (.ci/run installs it); Playwright drives that binary and never
downloads one. The screenshot is kept in tests/artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY_PIPELINE, run_pipeline, write_corpus

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
SCREENSHOT = ROOT / "tests/artifacts/mlflow_compare_runs.png"
EXPERIMENT = "ui-test"


def ui_number(value: float) -> str:
    """A metric as the MLflow UI prints one between 0.001 and 10: rounded to 3 decimals, no trailing zeros."""
    assert 1e-3 <= abs(value) < 10
    return str(round(value, 3))


def compare_url(server: str, run_ids: list[str], experiment_id: str) -> str:
    runs = urllib.parse.quote(json.dumps(run_ids))
    experiments = urllib.parse.quote(json.dumps([experiment_id]))
    return f"{server}/#/compare-runs?runs={runs}&experiments={experiments}"


@pytest.fixture
def two_runs(tracking_server, tmp_path, monkeypatch):
    """Two finished runs of the pipeline (learning rates 1e-3 and 3e-4) on the tracking server."""
    from mlflow.tracking import MlflowClient

    from lmforge.config.compose import compose_config
    from lmforge.model.directory import load_model_dir

    corpus = write_corpus(tmp_path / "corpus", n_docs=12, words=300)
    run_ids = []
    for lr in ("1e-3", "3e-4"):
        project = tmp_path / f"lr-{lr}"
        project.mkdir()
        monkeypatch.chdir(project)
        cfg = compose_config([*TINY_PIPELINE, f"optimizer.lr={lr}",
                              f"tracking.uri={tracking_server}", f"tracking.experiment={EXPERIMENT}",
                              f"tracking.run_name=ui-lr-{lr}"], conf_dir=ROOT / "conf")
        run_pipeline(cfg, corpus)
        run_ids.append(load_model_dir(cfg.paths.model).run()["run_id"])
    client = MlflowClient(tracking_uri=tracking_server)
    return [client.get_run(run_id) for run_id in run_ids]


def test_the_comparison_view_shows_both_runs_and_their_validation_loss(tracking_server, two_runs, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "install Debian's chromium: apt-get install -y chromium chromium-driver (.ci/run does)"
    losses = [ui_number(run.data.metrics["eval/val_loss"]) for run in two_runs]
    assert losses[0] != losses[1]  # otherwise the check below could match one run's value twice
    url = compare_url(tracking_server, [run.info.run_id for run in two_runs], two_runs[0].info.experiment_id)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(url)
            # React renders after load: wait for the texts, then check where they are.
            metric = page.get_by_role("link", name="eval/val_loss", exact=True)
            metric.wait_for(timeout=60_000)
            for run in two_runs:
                page.get_by_text(run.info.run_name, exact=True).first.wait_for(timeout=10_000)
                page.get_by_text(run.info.run_id, exact=True).first.wait_for(timeout=10_000)
            # A tidy picture: no assistant panel, no plots, only the params and metrics that differ.
            close = page.get_by_role("button", name="Close")
            if close.count():
                close.first.click()
            page.get_by_text("Visualizations", exact=True).click()
            for toggle in page.get_by_text("Show diff only", exact=True).all():
                toggle.click()
            page.get_by_text("Run details", exact=True).scroll_into_view_if_needed()

            # Each run's validation loss in the eval/val_loss row, in the run's own column.
            row = metric.bounding_box()
            columns = []
            for run, loss in zip(two_runs, losses):
                cells = [c.bounding_box() for c in page.get_by_text(loss, exact=True).all()]
                in_row = [c for c in cells if c and abs(c["y"] - row["y"]) < 5 and c["x"] > row["x"]]
                assert in_row, f"{run.info.run_name}: val loss {loss} is not in the eval/val_loss row"
                columns.append(in_row[0]["x"])
            assert columns[0] < columns[1]  # the runs' columns are in the order the URL names them

            shot = tmp_path / SCREENSHOT.name
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
