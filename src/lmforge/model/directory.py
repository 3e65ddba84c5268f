"""A trained model is one directory that every later command takes.

    model.safetensors   the weights (safetensors: no pickle is ever loaded)
    config.json         the model architecture, the tokenizer's kind and end-of-text id
    tokenizer.json      the HuggingFace tokenizer the model was trained with
    chat_template.jinja the chat template it was trained with, and chat.json (data.format=chat only)
    train_config.yaml   the fully resolved configuration of the training run
    run.json            where the run is tracked (MLflow URI, experiment and run id)

Commands name a model by its directory or by an MLflow URI (``runs:/<run_id>/model``, the run's
copy of the directory, or ``models:/<name>/<version>``, the registered pyfunc model, which
carries the directory among its artifacts); ``fetch_model_dir`` downloads a URI into a local cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from lmforge.config.paths import TOKENIZER_FILE
from lmforge.errors import LmforgeError
from lmforge.model.config import GPTConfig
from lmforge.model.gpt import GPT
from lmforge.outputs import atomic_path
from lmforge.tokenization.chat import CHAT_META, TEMPLATE_FILE
from lmforge.tracking.runs import default_tracking_uri

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = TOKENIZER_FILE
TRAIN_CONFIG = "train_config.yaml"
RUN = "run.json"
REQUIRED = (WEIGHTS, CONFIG, TOKENIZER)
CHAT_FILES = (TEMPLATE_FILE, CHAT_META)


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

    def chat_template(self):
        """The chat template the model was trained with (``chat_template.jinja``, a ``ChatTemplate``), or None."""
        from lmforge.tokenization.chat import load_chat

        return load_chat(self.path)

    def run(self) -> dict | None:
        """The MLflow run this model was trained in (``run.json``), or None."""
        path = self.path / RUN
        return json.loads(path.read_text()) if path.is_file() else None

    def train_config(self):
        """The resolved configuration of the training run (``train_config.yaml``) as an OmegaConf, or None."""
        path = self.path / TRAIN_CONFIG
        return OmegaConf.create(yaml.safe_load(path.read_text(encoding="utf-8"))) if path.is_file() else None


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
        for name in CHAT_FILES:  # the chat template travels with its tokenizer (lmforge.tokenization.chat)
            if (Path(tokenizer_path).parent / name).is_file():
                shutil.copyfile(Path(tokenizer_path).parent / name, tmp / name)
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
    from lmforge.tokenization.tokenizer import load_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"model directory {path} does not exist; train one (dvc repro train) or fix --model.")
    for name in REQUIRED:
        if not (path / name).is_file():
            raise LmforgeError(f"{path / name} is missing; "
                               f"{path} is not a complete model directory (retrain or re-export it).")
    try:
        config = json.loads((path / CONFIG).read_text())
        gpt_config = GPTConfig.from_dict(config["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise LmforgeError(f"{path / CONFIG} is not a valid lmforge model config ({err}); "
                           "retrain or re-export the model.") from None
    model = GPT(gpt_config)
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise LmforgeError(f"{path / WEIGHTS} is corrupt or truncated ({err}); "
                           "retrain or re-export the model.") from None
    # Tied weights are stored once; anything else missing means the file does not fit the config.
    missing = [k for k in missing if not (gpt_config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise LmforgeError(
            f"{path / WEIGHTS} does not match {path / CONFIG} (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "retrain or re-export the model."
        )
    model.to(device).eval()
    tokenizer = load_tokenizer(path / TOKENIZER)
    check_tokenizer_fits(tokenizer, gpt_config.vocab_size, path / TOKENIZER, f"the embedding table ({path / CONFIG})")
    return ModelDir(path=path, model=model, tokenizer=tokenizer, config=config)


def check_tokenizer_fits(tokenizer, vocab_size: int, tokenizer_path: str | Path, table: str) -> None:
    """Raise LmforgeError unless every id of ``tokenizer`` has a row in an embedding ``table`` of
    ``vocab_size`` rows: a larger id would end in an IndexError mid-evaluation or mid-generation."""
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    top = max(ids, default=-1)
    if top >= vocab_size:
        raise LmforgeError(f"{tokenizer_path} has {len(ids)} tokens (ids up to {top}) but {table} has only "
                           f"{vocab_size} rows, so ids from {vocab_size} on have no embedding; "
                           "use the tokenizer the model was trained with.")


def refuse_existing(out: str | Path, force: bool) -> None:
    """Raise LmforgeError if ``out`` exists and ``force`` is false: a model directory holds a
    run's record (run.json, train_config.yaml, curves) that a replacement would lose."""
    if not force and (Path(out).exists() or Path(out).is_symlink()):
        raise LmforgeError(f"{out} already exists; choose another output directory, or give --force to replace it.")


# --- Naming a model by an MLflow URI ---

MLFLOW_SCHEMES = ("runs:/", "models:/")


def is_mlflow_uri(ref: str | Path) -> bool:
    """True for ``runs:/...`` and ``models:/...`` references."""
    return str(ref).startswith(MLFLOW_SCHEMES)


def cache_dir() -> Path:
    """Where downloaded models go: ``$LMFORGE_CACHE``, else ``$XDG_CACHE_HOME/lmforge`` (``~/.cache``)."""
    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"




def fetch_model_dir(ref: str | Path, tracking_uri: str | None = None) -> Path:
    """A local model directory for ``ref``: a directory path as given, or an MLflow URI downloaded.

    ``runs:/<run_id>/<path>`` and ``models:/<name>/<version>`` (or ``@alias``) are fetched from
    ``tracking_uri`` (default: ``default_tracking_uri()``) into ``cache_dir()``, fresh each time,
    and the model directory inside the download is returned (for a pyfunc model, the one among
    its artifacts). LmforgeError when the download fails or holds no model directory.
    """
    if not is_mlflow_uri(ref):
        return Path(ref)
    from lmforge.tracking.runs import check_reachable, environment_kept, quiet_mlflow_env

    ref = str(ref)
    uri = tracking_uri or default_tracking_uri()
    check_reachable(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():  # MLflow would create it
        raise LmforgeError(f"there is no MLflow store at {uri} to look {ref} up in; pass --tracking-uri (or set "
                           "MLFLOW_TRACKING_URI) to the store that holds it, or run from the project that trained it.")
    quiet_mlflow_env()
    import mlflow
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    key = hashlib.sha256(f"{uri}\n{ref}".encode()).hexdigest()[:16]
    dest = cache_dir() / "mlflow" / key
    with atomic_path(dest, directory=True) as tmp, environment_kept():
        # MLflow resolves models:/ through its process-wide registry URI whatever registry_uri says
        # (without this it looked in ./mlflow.db): point both at the store, for this process only.
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(tmp), tracking_uri=uri, registry_uri=uri)
        except MlflowException as err:
            reason = str(err.message).splitlines()[0]
            raise LmforgeError(f"cannot download {ref} from {uri} ({reason}); "
                               "check the run id or model name and version.") from None
    found = sorted({p.parent for p in dest.rglob(WEIGHTS) if (p.parent / CONFIG).is_file()}, key=lambda p: len(p.parts))
    if not found:
        raise LmforgeError(f"{ref} holds no lmforge model directory (no {WEIGHTS} beside a {CONFIG}); "
                           "name the model directory's artifact path.")
    return found[0]


# --- Starting training from a model directory (train.init_from) ---

# Settings that may differ from the directory's: dropout changes training, not the model's function.
_ARCHITECTURE_EXEMPT = ("dropout",)


def init_from_model_dir(model: GPT, path: str | Path, tokenizer_path: str | Path) -> None:
    """Copy the weights of the model directory ``path`` into ``model`` (for ``train.init_from``).

    The architecture is the config's (``model.*``) and must equal the directory's, and the
    tokenizer the token files were made with (``tokenizer_path``) must have the directory's
    vocabulary, so that every token id means the same text. Each mismatch is a LmforgeError
    naming the settings to change.
    """
    from lmforge.tokenization.tokenizer import load_tokenizer

    loaded = load_model_dir(path)
    ours, theirs = _architecture(model.config), _architecture(loaded.model.config)
    differ = [f"model.{k}={theirs[k]!r}" for k in ours if ours[k] != theirs[k] and k != "vocab_size"]
    if differ:
        raise LmforgeError(
            f"train.init_from={path} has a different architecture than the config; set {' '.join(differ)} "
            "(or point train.init_from at a model of this architecture)."
        )
    vocabulary = load_tokenizer(Path(tokenizer_path)).get_vocab(with_added_tokens=True)
    if loaded.tokenizer.get_vocab(with_added_tokens=True) != vocabulary:
        raise LmforgeError(
            f"train.init_from={path} uses a different tokenizer than the token files; copy "
            f"{loaded.path / TOKENIZER} to paths.vocab and rerun the tokenize stage, or train from scratch."
        )
    if ours["vocab_size"] != theirs["vocab_size"]:
        raise LmforgeError(
            f"train.init_from={path} has vocab_size={theirs['vocab_size']} but its tokenizer has "
            f"{ours['vocab_size']} tokens; lmforge trains only models whose embedding matches the tokenizer."
        )
    model.load_state_dict(loaded.model.state_dict())


def _architecture(config: GPTConfig) -> dict:
    settings = config.to_dict()
    settings["n_kv_head"] = config.kv_heads  # null and n_head are the same model
    settings["mlp_hidden"] = config.mlp_hidden_size
    return {k: v for k, v in settings.items() if k not in _ARCHITECTURE_EXEMPT}
