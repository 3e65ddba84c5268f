"""End to end: the real `dvc repro` and `dvc exp run` in a temporary copy of the project."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import assert_learned, copy_project, first_train_loss, run

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = [
    "model=tiny", "train.max_steps=40", "train.eval_interval=20", "train.eval_iters=2", "train.log_every=5",
    "evaluate.max_batches=4", "evaluate.max_new_tokens=30",
]




@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC copy of the project, with params.yaml composed for a tiny run."""
    return copy_project(tmp_path_factory.mktemp("project"), TINY)


def test_dvc_repro_runs_every_stage_and_tracks_the_run(project):
    run(["dvc", "repro"], project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert set(metrics) >= {"val_loss", "val_perplexity", "val_bits_per_byte"}
    # What 40 steps must achieve: well below uniform over the vocabulary and below the first step's loss.
    vocab_size = json.loads((project / "data/tokens/index.json").read_text())["vocab_size"]
    assert_learned(metrics["val_loss"], first_train_loss(project / "models/gpt"), vocab_size, margin=0.5)
    assert (project / "reports/plots/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ROMEO" in (project / "reports/samples.md").read_text()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "train_config.yaml", "run.json"):
        assert (project / "models/gpt" / name).is_file()

    run_id = json.loads((project / "models/gpt/run.json").read_text())["run_id"]
    db = sqlite3.connect(project / "mlflow.db")
    keys = {k for (k,) in db.execute("select distinct key from metrics where run_uuid=?", (run_id,))}
    assert {"train/loss", "val/loss", "train/lr", "eval/val_loss", "eval/val_bits_per_byte"} <= keys
    params = dict(db.execute("select key, value from params where run_uuid=?", (run_id,)))
    assert params["model.n_layer"] == "2" and params["train.max_steps"] == "40"
    n_steps = db.execute("select count(distinct step) from metrics where run_uuid=? and key='train/loss'",
                         (run_id,)).fetchone()[0]
    assert n_steps >= 5
    artifacts = list((project / "mlartifacts").rglob("*"))
    names = {p.name for p in artifacts}
    assert {"model.safetensors", "tokenizer.json", "train_config.yaml", "samples.md", "loss.png"} <= names

    # A second repro does nothing.
    again = run(["dvc", "repro"], project)
    assert "didn't change" in again.stdout or "up to date" in again.stdout
    assert "Running stage" not in again.stdout

    # A tokenizer parameter re-runs vocab and everything after it, but not prepare.
    params_yaml = yaml.safe_load((project / "params.yaml").read_text())
    params_yaml["tokenizer"]["special_tokens"] = ["<|endoftext|>", "<unk>", "<pad>"]
    (project / "params.yaml").write_text(yaml.safe_dump(params_yaml, sort_keys=False))
    status = run(["dvc", "status", "--json"], project)
    changed = set(json.loads(status.stdout))
    # DVC reports the first changed stage; later ones follow from its outs. The check stage declares
    # every parameter, so it re-runs on any change (in seconds); prepare does not.
    assert changed == {"check", "vocab"}, changed
    rerun = run(["dvc", "repro"], project)
    assert "Running stage 'prepare'" not in rerun.stdout
    for stage in ("vocab", "tokenize", "train", "evaluate"):
        assert f"Running stage '{stage}'" in rerun.stdout, rerun.stdout


def test_generate_streams_text_from_the_model_directory(project):
    if not (project / "models/gpt/model.safetensors").exists():
        run(["dvc", "repro"], project)
    out = run([str(BIN / "lmforge"), "generate", "--model", str(project / "models/gpt"), "--prompt", "**ROMEO**",
               "--max-new-tokens", "40", "--temperature", "0.8", "--top-k", "50", "--seed", "1"], project)
    assert out.stdout.startswith("**ROMEO**")
    assert len(out.stdout) > len("**ROMEO**") + 20
    again = run([str(BIN / "lmforge"), "generate", "--model", str(project / "models/gpt"), "--prompt", "**ROMEO**",
                 "--max-new-tokens", "40", "--temperature", "0.8", "--top-k", "50", "--seed", "1"], project)
    assert again.stdout == out.stdout  # seeded


def test_unknown_config_group_fails_clearly(project):
    proc = run(["dvc", "exp", "run", "-S", "model=nope"], project, check=False)
    assert proc.returncode != 0
    assert "model" in (proc.stdout + proc.stderr) and "nope" in (proc.stdout + proc.stderr)


def test_two_exp_runs_with_overrides_give_two_mlflow_runs(project):
    db_path = project / "mlflow.db"
    before = set()
    if db_path.exists():
        before = {r for (r,) in sqlite3.connect(db_path).execute("select run_uuid from runs")}
    for lr in ("3e-3", "1e-3"):
        run(["dvc", "exp", "run", *[f"-S{o}" for o in TINY], "-S", "train.max_steps=20", "-S", f"optimizer.lr={lr}"],
            project)
    # dvc exp run composed conf/ (with the overrides) into params.yaml
    params_yaml = yaml.safe_load((project / "params.yaml").read_text())
    assert params_yaml["model"]["n_embd"] == 32 and params_yaml["optimizer"]["lr"] == pytest.approx(1e-3)
    db = sqlite3.connect(db_path)
    new = {r for (r,) in db.execute("select run_uuid from runs")} - before
    assert len(new) == 2
    lrs = {v for (v,) in db.execute(
        f"select value from params where key='optimizer.lr' and run_uuid in ({','.join('?' * len(new))})", tuple(new))}
    assert {float(v) for v in lrs} == {3e-3, 1e-3}
    shown = run(["dvc", "exp", "show", "--json"], project)
    assert "val_loss" in shown.stdout
