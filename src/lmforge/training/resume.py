"""Resuming: which checkpoint and MLflow run a ``train.resume=auto`` run continues, decided by a
fingerprint of everything that sets the training trajectory (``checkpoints/run.json``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import OmegaConf

RESUME = ("never", "auto")
LAST_CHECKPOINT = "last.ckpt"
RUN_FILE = "run.json"  # in paths.checkpoints: the MLflow run and configuration of the checkpoints


def config_fingerprint(cfg, index: dict) -> str:
    """A hash of everything that decides the training trajectory: seed, model, optimizer, training
    settings (but ``train.resume`` and ``checkpoint_every``) and the token files. Checkpoints
    resume only into a run with
    the same fingerprint; the hardware (``trainer``) may change between the two."""
    train_cfg = {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items()
                 if k not in ("resume", "checkpoint_every")}
    identity = {
        "seed": cfg.seed,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "train": train_cfg,
        "tokens": {"tokenizer_sha256": index.get("tokenizer_sha256"), "vocab_size": index["vocab_size"],
                   "splits": {s: v["tokens"] for s, v in index["splits"].items()}},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def find_resume_point(checkpoints: Path, resume: str, fingerprint: str) -> tuple[Path | None, dict | None]:
    """For ``train.resume=auto``: the checkpoint to continue from and the run record of ``run.json``.

    Returns (None, None) when starting afresh: resume=never, no ``run.json``, or one written by a
    run of another configuration. The run record comes without a checkpoint when a run of this
    configuration was killed before its first save: it restarts from step 0 in the same MLflow run.
    """
    run_file = checkpoints / RUN_FILE
    if resume != "auto" or not run_file.is_file():
        return None, None
    try:
        record = json.loads(run_file.read_text())
    except json.JSONDecodeError:
        return None, None
    if record.get("fingerprint") != fingerprint:
        print(f"resume=auto: {checkpoints} holds a run of another configuration; starting a new run")
        return None, None
    last = checkpoints / LAST_CHECKPOINT
    return (last if last.is_file() else None), record


def clear_checkpoints(checkpoints: Path) -> None:
    """Remove what a previous run left in ``checkpoints`` (ours only: *.ckpt, run.json, temporaries)."""
    if not checkpoints.is_dir():
        return
    for path in checkpoints.iterdir():
        if path.suffix == ".ckpt" or path.name == RUN_FILE or ".tmp-" in path.name:
            path.unlink()
