"""Resuming: which checkpoint and MLflow run a training continues, decided by a fingerprint of
everything that sets the training trajectory (``checkpoints/run.json``), and what becomes of
checkpoints a new run would overwrite.

``train.resume=auto`` (the default) continues an unfinished run of the same configuration, so a
plain ``dvc repro`` after Ctrl-C picks up where the run stopped (resuming is bit-identical). A new
run never overwrites the checkpoints of an unfinished one: they are moved into a backup beside
the checkpoint directory, with a one-line note. A finished run's checkpoints are replaced: its
result is its model directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lmforge.outputs import write_json, write_text

RESUME = ("never", "auto")
LAST_CHECKPOINT = "last.ckpt"
RUN_FILE = "run.json"  # in paths.checkpoints: the MLflow run and configuration of the checkpoints
NOTE_FILE = "note.txt"  # in a backup: what it holds and how to continue it


def config_fingerprint(cfg, index: dict) -> str:
    """A hash of everything that decides the training trajectory: seed, model, optimizer, training
    settings (but ``train.resume`` and ``checkpoint_every``) and the token files. Checkpoints
    resume only into a run with the same fingerprint; the hardware (``trainer``) may change between
    the two."""
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
    if cfg.get("finetune") is not None and cfg.finetune.get("base"):  # its base and method too
        identity["finetune"] = OmegaConf.to_container(cfg.finetune, resolve=True)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def read_record(checkpoints: Path) -> dict | None:
    """The run record of ``checkpoints/run.json`` (run id, name, fingerprint, finished), or None."""
    try:
        record = json.loads((Path(checkpoints) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def find_resume_point(checkpoints: Path, resume: str, fingerprint: str) -> tuple[Path | None, dict | None]:
    """The checkpoint to continue from and the run record of ``run.json``, for ``train.resume=auto``.

    Returns (None, None) when starting afresh: resume=never, no ``run.json``, a run of another
    configuration, or a finished run (retraining it is what a rerun of the stage asks for: the code
    or the hardware settings changed). The run record comes without a checkpoint when a run of this
    configuration was killed before its first save: it restarts from step 0 in the same MLflow run.
    """
    record = read_record(checkpoints)
    if resume != "auto" or record is None or record.get("finished") or record.get("fingerprint") != fingerprint:
        return None, None
    last = checkpoints / LAST_CHECKPOINT
    return (last if last.is_file() else None), record


def start_afresh(checkpoints: Path, resume: str, fingerprint: str) -> Path | None:
    """Make room in ``checkpoints`` for a new run; return the backup made, if any.

    A finished run's checkpoints are removed (its model directory holds its result). Those of an
    unfinished run (another configuration, or ``train.resume=never``) are moved into a backup
    beside the directory (``keep_aside``). Only our files are touched: *.ckpt, run.json, temporaries.
    """
    if not checkpoints.is_dir():
        return None
    record = read_record(checkpoints)
    if any(path.suffix == ".ckpt" for path in checkpoints.iterdir()) and not (record or {}).get("finished"):
        if record is None:
            why = f"no {RUN_FILE} names its run"
        elif record.get("fingerprint") != fingerprint:
            why = "a run of another configuration"
        else:
            why = f"train.resume={resume}"
        return keep_aside(checkpoints, record or {}, why)
    for path in _ours(checkpoints):
        path.unlink()
    return None


def keep_aside(checkpoints: Path, record: dict, why: str) -> Path:
    """Move the checkpoints and run.json of an unfinished run into ``<checkpoints>.<run name>-<run
    id>-step<N>`` beside ``checkpoints``, write the one-line note there and print it; return the backup."""
    step = saved_step(checkpoints / LAST_CHECKPOINT)
    parts = [record.get("run_name") or "run", str(record.get("run_id", ""))[:8],
             f"step{step}" if step is not None else ""]
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(p for p in parts if p))
    backup = checkpoints.with_name(f"{checkpoints.name}.{label}")
    number = 1
    while backup.exists():
        number += 1
        backup = checkpoints.with_name(f"{checkpoints.name}.{label}-{number}")
    backup.mkdir(parents=True)
    for path in _ours(checkpoints):
        if ".tmp-" in path.name:
            path.unlink()  # a save that was cut short: nothing to keep
        else:
            os.replace(path, backup / path.name)
    stopped = f"last saved at step {step}" if step is not None else "no step saved"
    note = (f"kept the checkpoints of the unfinished run {record.get('run_name') or '(unnamed)'} "
            f"({why}; {stopped}) in {backup}: to continue it, move its files back into {checkpoints} "
            "and train its configuration again; delete it if it is not needed.")
    write_text(backup / NOTE_FILE, note + "\n")
    print(f"train: {note}", flush=True)
    return backup


def mark_finished(checkpoints: Path) -> None:
    """Record in run.json that its run finished: its checkpoints are then not resumed, nor kept aside."""
    record = read_record(checkpoints)
    if record is not None:
        write_json(Path(checkpoints) / RUN_FILE, {**record, "finished": True})


def saved_step(path: Path) -> int | None:
    """The optimizer step a checkpoint was saved at (its tensors are mapped, not read), or None."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # noqa: BLE001 - a missing or unreadable checkpoint has no step to report
        return None


def _ours(checkpoints: Path) -> list[Path]:
    return [path for path in checkpoints.iterdir()
            if path.is_file() and (path.suffix == ".ckpt" or path.name == RUN_FILE or ".tmp-" in path.name)]
