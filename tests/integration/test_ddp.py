"""Two-process DDP on CPU (gloo) through the real train stage: the ranks draw different batches,
the logged losses are the mean over the ranks, and only rank 0 talks to MLflow and writes."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from tests.helpers import make_project

pytestmark = pytest.mark.slow


# Run by Lightning once per rank (its launcher starts rank 1 with the same command line).
SCRIPT = '''
import json, sys
import lightning as L
import torch
from lmforge.config.compose import load_config
from lmforge.training.stage import train_stage


class Record(L.Callback):
    """This rank's view: a fingerprint of each training batch and the local losses behind the
    logged metrics (train loss at logged steps, validation loss per evaluation)."""

    def __init__(self):
        self.batches, self.train, self.val = [], {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        self.batches.append(x.flatten().tolist()[:16])
        step = trainer.global_step + 1
        if step % pl_module.log_every == 0 or step == 1:
            with torch.no_grad():
                self.train[step] = float(pl_module.model(x, y)[1])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        with torch.no_grad():
            self.val.setdefault(trainer.global_step, []).append(float(pl_module.model(*batch)[1]))

    def teardown(self, trainer, pl_module, stage):
        with open(f"rank{trainer.global_rank}.json", "w") as f:
            json.dump({"batches": self.batches, "train": self.train, "val": self.val}, f)


train_stage(load_config(sys.argv[1:]), callbacks=[Record()])
'''


def test_two_process_ddp_on_cpu(tmp_path):
    project = make_project(tmp_path / "project", [
        "model=tiny", "train.max_steps=20", "train.eval_interval=10", "train.eval_iters=3", "train.log_every=5",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32", "trainer.compile=false",
        "trainer.num_threads=1", "tracking.log_model=false",
    ])
    (project / "ddp_train.py").write_text(SCRIPT)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([sys.executable, "ddp_train.py"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((project / f"rank{r}.json").read_text()) for r in (0, 1)]

    # Different data on each rank, and as many steps on each.
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 20
    assert not {json.dumps(b) for b in ranks[0]["batches"]} & {json.dumps(b) for b in ranks[1]["batches"]}

    # One MLflow run (rank 0's), whose losses are the mean of the two ranks' local losses.
    db = sqlite3.connect(project / "mlflow.db")
    runs = db.execute("select run_uuid, status from runs").fetchall()
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    rows = db.execute("select key, step, value from metrics where run_uuid=?", (runs[0][0],))
    logged = {(k, s): v for k, s, v in rows}
    for step in ("5", "10", "15", "20"):
        local = [r["train"][step] for r in ranks]
        assert local[0] != local[1]
        assert logged[("train/loss", int(step))] == pytest.approx(sum(local) / 2, rel=1e-5)
    for step in ("10", "20"):
        local = [sum(r["val"][step]) / len(r["val"][step]) for r in ranks]
        assert local[0] != local[1]
        assert logged[("val/loss", int(step))] == pytest.approx(sum(local) / 2, rel=1e-5)
    # tokens/s counts both ranks' tokens.
    assert any(k == "perf/tokens_per_second" for k, _ in logged)
    config = json.loads((project / "models/gpt/config.json").read_text())
    assert config["training"]["tokens"] == 20 * 2 * 12 * 32
