"""Training from a base model (``finetune.base``): the network is the base's architecture with its
weights, then (``finetune.method=lora``) adapters on it (``training.lora``).

The base is the one the vocab stage adopted the tokenizer of (``paths.vocab/base.json``, verified
against the base's files by ``lmforge.interop.base``). ``model.*`` do not apply but two:
``model.block_size`` is the length of the training windows (at most the base's context; the tuned
model keeps the base's) and ``model.dropout``. When the tokenizer has more tokens than the base's
embedding has rows (special tokens a chat template added), the embedding and head grow, the new
rows starting at the mean of the old ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.interop.base import BaseModel, copy_base_weights, load_base
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.tokenization.base import Base, base_setting, read_record, resolve_recorded


@dataclass
class Start:
    """What training starts from: the base, its network, and how many token rows were added."""

    base: Base
    loaded: BaseModel
    added_tokens: int


def base_start(cfg) -> Start | None:
    """The base of ``cfg`` as the vocab stage recorded it in ``paths.vocab``, loaded; None when
    ``finetune.base`` is null. LmforgeError when the vocab stage has not adopted this base."""
    ref, _ = base_setting(cfg)
    if ref is None:
        return None
    vocab = Path(cfg.paths.vocab)
    record = read_record(vocab)
    if record is None or record.get("ref") != ref:
        had = f"the tokenizer of {record['ref']}" if record else "a tokenizer trained from scratch"
        raise LmforgeError(f"finetune.base={ref} but {vocab} holds {had}; rerun the vocab and tokenize stages "
                           "(dvc repro) so that the tokens come from the base's tokenizer.")
    base, _ = resolve_recorded(vocab)
    return Start(base, load_base(base), 0)


def model_config_from_base(cfg, start: Start, vocab_size: int) -> dict:
    """The GPT config of a fine-tune: the base's, with ``model.dropout`` and room for every token id."""
    config = start.loaded.model.config.to_dict()
    if int(cfg.model.block_size) > config["block_size"]:
        raise LmforgeError(f"model.block_size={cfg.model.block_size} is longer than the context of finetune.base="
                           f"{start.base.ref} ({config['block_size']} tokens); set model.block_size to at most "
                           f"{config['block_size']}.")
    config["dropout"] = float(cfg.model.dropout)
    start.added_tokens = max(0, int(vocab_size) - config["vocab_size"])
    config["vocab_size"] = max(config["vocab_size"], int(vocab_size))
    try:
        GPTConfig.from_dict(config).validate()
    except ValueError as err:
        raise LmforgeError(str(err)) from None
    return config


def init_from_base(model: GPT, start: Start) -> None:
    """Copy the base's weights into ``model``; rows for added tokens start at the mean row."""
    copy_base_weights(model, start.loaded)


def base_summary(cfg) -> tuple[GPTConfig, str] | None:
    """For ``lmforge check``: the architecture the fine-tune trains (the base's config, read from its
    config.json without its weights) and where it comes from; None without a base or when the base
    is a Hub id not fetched yet (the vocab stage fetches it)."""
    import json

    from lmforge.interop.hf_config import from_hf_config
    from lmforge.tokenization.base import LMFORGE, cached_hub_file, directory_kind

    ref, revision = base_setting(cfg)
    if ref is None:
        return None
    path = Path(ref).expanduser()
    if not path.is_dir():
        cached = cached_hub_file(ref, revision, "config.json")
        if cached is None:
            return None
        path = cached.parent
    kind = directory_kind(path, ref)
    data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config = GPTConfig.from_dict(data["model"]) if kind == LMFORGE else from_hf_config(data, path / "config.json")[1]
    return config, f"the architecture of finetune.base={ref}"
