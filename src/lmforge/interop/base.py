"""A fine-tune's base model as a network: its weights in our ``GPT`` (an lmforge model directory
loaded, a ``transformers`` directory converted by ``lmforge.interop.hf``), copied into a model
with room for added tokens, and the base of a tuned model directory for evaluation.

Where the base is and which files (Hub ids, revisions, hashes) is ``lmforge.tokenization.base``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config.paths import TOKENIZER_FILE
from lmforge.tokenization.base import LMFORGE, Base, resolve_recorded


@dataclass
class BaseModel:
    """A base's network as our GPT, its tokenizer file and end-of-text token."""

    model: object  # lmforge.model.gpt.GPT
    tokenizer_path: Path
    eot_token: str
    eot_id: int
    tokenizer_kind: str


def load_base(base: Base) -> BaseModel:
    """The network of ``base`` as a ``GPT`` (float32, on the CPU) with its tokenizer."""
    if base.kind == LMFORGE:
        from lmforge.model.directory import load_model_dir

        loaded = load_model_dir(base.path)
        meta = loaded.config["tokenizer"]
        return BaseModel(loaded.model, base.path / TOKENIZER_FILE, meta["eot_token"], int(meta["eot_id"]),
                         str(meta.get("kind", "imported")))
    from lmforge.interop.hf import read_hf_dir

    model, tokenizer_path, eot_token, eot_id = read_hf_dir(base.path)
    return BaseModel(model, tokenizer_path, eot_token, eot_id, "imported")


@torch.no_grad()
def copy_base_weights(model, loaded: BaseModel) -> None:
    """Copy the base's weights into ``model`` (a GPT of the base's architecture, perhaps with more
    token rows: those start at the mean of the base's rows, as a chat template's added tokens do)."""
    state = loaded.model.state_dict()
    rows = model.config.vocab_size
    for key in ("transformer.wte.weight", "lm_head.weight"):
        old = state[key]
        if old.shape[0] < rows:
            grown = old.new_empty((rows, old.shape[1]))
            grown[: old.shape[0]] = old
            grown[old.shape[0]:] = old.mean(dim=0)
            state[key] = grown
    model.load_state_dict(state)


def base_network(record_dir: str | Path, config):
    """The network a fine-tuned model directory ``record_dir`` started from (its ``base.json``), at the
    GPT ``config`` of the tuned model (rows for added tokens as training began); None without a base."""
    from lmforge.model.gpt import GPT

    found = resolve_recorded(record_dir)
    if found is None:
        return None
    model = GPT(config)
    copy_base_weights(model, load_base(found[0]))
    return model.eval()


