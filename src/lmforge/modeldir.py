"""A trained model is one directory that every later command takes.

    model.safetensors   the weights (safetensors: no pickle is ever loaded)
    config.json         the model architecture, the tokenizer's kind and end-of-text id
    tokenizer.json      the HuggingFace tokenizer the model was trained with
    train_config.yaml   the fully resolved configuration of the training run
    run.json            where the run is tracked (MLflow URI, experiment and run id)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from lmforge.errors import LmforgeError
from lmforge.model import GPT, GPTConfig
from lmforge.outputs import atomic_path

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TRAIN_CONFIG = "train_config.yaml"
RUN = "run.json"
REQUIRED = (WEIGHTS, CONFIG, TOKENIZER)


@dataclass
class ModelDir:
    """A loaded model directory: the network (in eval mode), its tokenizer and metadata."""

    path: Path
    model: GPT
    tokenizer: Any
    config: dict

    @property
    def eot_id(self) -> int:
        return int(self.config["tokenizer"]["eot_id"])

    def run(self) -> dict | None:
        """The MLflow run this model was trained in (``run.json``), or None."""
        path = self.path / RUN
        return json.loads(path.read_text()) if path.is_file() else None


def save_model_dir(out: str | Path, model: GPT, tokenizer_path: str | Path, tokenizer_meta: dict,
                   train_cfg=None, run: dict | None = None, extra: dict | None = None,
                   write_more: Callable[[Path], None] | None = None) -> Path:
    """Write a model directory at ``out`` atomically; return its path.

    ``write_more(tmp_dir)``, if given, adds further files before the directory is renamed into place.
    """
    out = Path(out)
    with atomic_path(out, directory=True) as tmp:
        save_model(model, str(tmp / WEIGHTS))
        config = {"format": "lmforge", "version": 1, "model": model.config.to_dict(), "tokenizer": tokenizer_meta}
        config.update(extra or {})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        if train_cfg is not None:
            resolved = OmegaConf.to_container(train_cfg, resolve=True) if OmegaConf.is_config(train_cfg) else train_cfg
            (tmp / TRAIN_CONFIG).write_text(yaml.safe_dump(resolved, sort_keys=False))
        if run is not None:
            (tmp / RUN).write_text(json.dumps(run, indent=2) + "\n")
        if write_more is not None:
            write_more(tmp)
    return out


def write_run_info(model_dir: str | Path, run: dict) -> None:
    """Record (or replace) ``run.json`` in an existing model directory."""
    from lmforge.outputs import write_json

    write_json(Path(model_dir) / RUN, run)


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> ModelDir:
    """Load a model directory; LmforgeError naming the file for anything missing or corrupt."""
    from lmforge.vocab import load_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"model directory {path} does not exist; train one (dvc repro train) or fix --model.")
    for name in REQUIRED:
        if not (path / name).is_file():
            raise LmforgeError(f"{path / name} is missing; {path} is not a complete model directory (retrain or re-export it).")
    try:
        config = json.loads((path / CONFIG).read_text())
        gpt_config = GPTConfig.from_dict(config["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise LmforgeError(f"{path / CONFIG} is not a valid lmforge model config ({err}); retrain or re-export the model.") from None
    model = GPT(gpt_config)
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise LmforgeError(f"{path / WEIGHTS} is corrupt or truncated ({err}); retrain or re-export the model.") from None
    # Tied weights are stored once; anything else missing means the file does not fit the config.
    missing = [k for k in missing if not (gpt_config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise LmforgeError(
            f"{path / WEIGHTS} does not match {path / CONFIG} (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "retrain or re-export the model."
        )
    model.to(device).eval()
    tokenizer = load_tokenizer(path / TOKENIZER)
    return ModelDir(path=path, model=model, tokenizer=tokenizer, config=config)
