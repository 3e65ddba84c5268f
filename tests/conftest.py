"""Shared fixtures: the project root, and a config composed from the real conf/ for tiny runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def project_root() -> Path:
    return ROOT


@pytest.fixture
def tiny_cfg(tmp_path, monkeypatch):
    """The real composed config, with model=tiny and every path inside tmp_path (cwd = tmp_path)."""
    from lmforge.config import compose_config

    cfg = compose_config(
        ["model=tiny", "train.max_steps=20", "train.eval_interval=10", "train.eval_iters=2", "train.log_every=5",
         "evaluate.max_batches=2", "evaluate.max_new_tokens=20", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
        conf_dir=ROOT / "conf",
    )
    monkeypatch.chdir(tmp_path)
    return cfg


def write_corpus(directory: Path, n_docs: int = 20, words: int = 400) -> Path:
    """A small deterministic corpus of plain-text documents; returns the directory."""
    import random

    rng = random.Random(0)
    vocab = ["the", "king", "queen", "sword", "crown", "night", "love", "death", "speak", "lord", "fair", "good"]
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = []
        for _ in range(words // 8):
            lines.append(" ".join(rng.choice(vocab) for _ in range(8)).capitalize() + ".")
        (directory / f"doc{i:03d}.txt").write_text(f"DOC {i}\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return directory
