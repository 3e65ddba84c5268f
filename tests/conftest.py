"""Shared fixtures: the project root, a config composed from the real conf/ for tiny runs
(``tiny_cfg``, ``tokens_cfg``), a real DVC project copy (``dvc_project``) and a real MLflow server
(``tracking_server``). Helpers that are not fixtures live in ``tests/helpers.py``; each test is
marked with its tier (``unit``, ``integration``, ``e2e``) by the folder it lives in."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY_PIPELINE, commit_all, copy_project, mlflow_server, run_command, write_corpus

TIERS = ("unit", "integration", "e2e")

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(autouse=True)
def no_leaked_tracking_uri() -> Iterator[None]:
    """``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI``: lmforge's own calls restore it
    (``tracking.environment_kept``), and so does every test, so that no test's temporary store
    becomes the default of the commands a later test runs."""
    from lmforge.tracking.runs import environment_kept

    with environment_kept():
        yield


@pytest.fixture(autouse=True, scope="session")
def own_cache(tmp_path_factory) -> Iterator[None]:
    """``trainer.num_threads=auto`` remembers its answers per user (``LMFORGE_CACHE_DIR``): the
    tests' answers live in the session's temporary directory, and commands they start inherit it."""
    from lmforge.config.paths import CACHE_DIR_ENV

    before = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = before


@pytest.fixture
def project_root() -> Path:
    return ROOT


@pytest.fixture
def tiny_cfg(tmp_path, monkeypatch):
    """The real composed config, with model=tiny and every path inside tmp_path (cwd = tmp_path)."""
    from lmforge.config.compose import compose_config

    cfg = compose_config(
        ["model=tiny", "train.max_steps=20", "train.eval_interval=10", "train.eval_iters=2", "train.log_every=5",
         "evaluate.max_batches=2", "evaluate.max_new_tokens=20", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
        conf_dir=ROOT / "conf",
    )
    monkeypatch.chdir(tmp_path)
    return cfg








# --- A real DVC project and a real MLflow server, for the end-to-end tests ---









@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory) -> Path:
    """A copy of the project after a tiny `dvc repro`, with dvc.lock and the metrics committed.

    Shared by several test modules: a test that changes it must leave it as it found it.
    """
    project = copy_project(tmp_path_factory.mktemp("dvc") / "project", TINY_PIPELINE)
    run_command(["dvc", "repro"], project)
    commit_all(project, "tiny pipeline run")
    return project






@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory) -> Iterator[str]:
    """A remote-style MLflow tracking server for the whole session (its URL)."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: for tiny tensors that is fastest, and two threads
    spin-waiting on a shared 2-core machine can make a test 100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokens_cfg(tiny_cfg, tmp_path):
    """tiny_cfg on a small generated corpus, prepared, with a vocabulary and token files."""
    from lmforge.corpus.stage import prepare_stage
    from lmforge.tokenization.encode import tokenize_stage
    from lmforge.tokenization.vocab import vocab_stage

    tiny_cfg.data.sources = [str(write_corpus(tmp_path / "corpus", n_docs=12, words=300))]
    prepare_stage(tiny_cfg)
    vocab_stage(tiny_cfg)
    tokenize_stage(tiny_cfg)
    return tiny_cfg


def pytest_collection_modifyitems(config, items):
    """Mark each test with its tier, the name of the folder under tests/ it lives in."""
    for item in items:
        tier = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


_TIER_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Add each test's setup, call and teardown time to its tier's total."""
    tier = Path(report.fspath).parts[1] if len(Path(report.fspath).parts) > 1 else ""
    if tier in TIERS:
        _TIER_SECONDS[tier] = _TIER_SECONDS.get(tier, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """One line with the time each tier's tests took, setup to teardown, summed (what
    docs/architecture.md's tier table quotes): the wall time of a serial run; under ``make test``'s
    two workers the sum of both, so about twice the wall time."""
    if _TIER_SECONDS:
        spent = ", ".join(f"{tier} {_TIER_SECONDS[tier]:.0f} s" for tier in TIERS if tier in _TIER_SECONDS)
        terminalreporter.write_line(f"time per tier: {spent}")
