"""Tokenize, train and evaluate on tiny sizes with the real configs and the real trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lmforge.corpus import prepare
from lmforge.errors import LmforgeError
from lmforge.tokens import TokenStream, tokenize
from lmforge.training import build_optimizer, lr_at
from lmforge.vocab import vocab_stage
from tests.conftest import write_corpus


@pytest.fixture
def tokens_cfg(tiny_cfg, tmp_path):
    """tiny_cfg on a small generated corpus, prepared, with a vocabulary and token files."""
    tiny_cfg.data.sources = [str(write_corpus(tmp_path / "corpus", n_docs=12, words=300))]
    prepare(tiny_cfg)
    vocab_stage(tiny_cfg)
    tokenize(tiny_cfg)
    return tiny_cfg


def test_token_files_round_trip(tokens_cfg):
    from lmforge.vocab import load_tokenizer

    index = json.loads(Path(tokens_cfg.paths.tokens, "index.json").read_text())
    assert index["dtype"] == "uint16"
    stream = TokenStream(tokens_cfg.paths.tokens, "val")
    assert len(stream) == index["splits"]["val"]["tokens"]
    tokenizer = load_tokenizer(Path(tokens_cfg.paths.vocab) / "tokenizer.json")
    text = Path(tokens_cfg.paths.prepared, "val.txt").read_text(encoding="utf-8")
    assert tokenizer.decode(stream.read(0, len(stream)).tolist(), skip_special_tokens=False) == text


def test_shards_split_at_the_configured_size(tokens_cfg):
    tokens_cfg.data.shard_size = 1000  # bytes: 500 uint16 tokens a shard
    index = tokenize(tokens_cfg)
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["tokens"] <= 500 for s in shards)
    stream = TokenStream(tokens_cfg.paths.tokens, "train")
    whole = stream.read(0, len(stream))
    assert np.array_equal(stream.read(490, 30), whole[490:520])  # a window across a shard boundary


def test_lr_schedule_warms_up_then_decays_to_min():
    opt = OmegaConf.create({"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "schedule": "cosine"})
    assert lr_at(0, opt, 100) == pytest.approx(1e-4)
    assert lr_at(9, opt, 100) == pytest.approx(1e-3)
    assert lr_at(100, opt, 100) == pytest.approx(1e-4)
    lrs = [lr_at(s, opt, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_only_on_matrices(tiny_cfg):
    from lmforge.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    optimizer = build_optimizer(model, tiny_cfg.optimizer)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] > 0 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0 and all(p.dim() == 1 for p in no_decay["params"])


def test_train_and_evaluate_write_a_model_directory_and_metrics(tokens_cfg):
    from lmforge.evaluation import evaluate
    from lmforge.modeldir import load_model_dir
    from lmforge.training import train

    tokens_cfg.train.max_steps = 30
    out = train(tokens_cfg)
    loaded = load_model_dir(out)
    assert loaded.model.config.n_layer == tokens_cfg.model.n_layer
    val = [float(line.split(",")[1]) for line in (out / "curves/val_loss.csv").read_text().splitlines()[1:]]
    assert len(val) >= 2 and val[-1] < val[0]  # it learned something
    metrics = evaluate(tokens_cfg)
    assert metrics["val_loss"] < np.log(loaded.model.config.vocab_size)
    assert metrics["val_bits_per_byte"] == pytest.approx(
        metrics["val_loss"] * metrics["val_tokens"] / metrics["val_bytes"] / np.log(2), rel=0.05)
    assert Path(tokens_cfg.paths.reports, "plots", "loss.png").is_file()


def test_block_size_larger_than_validation_split_is_a_clear_error(tokens_cfg):
    from lmforge.training import train

    val_tokens = TokenStream(tokens_cfg.paths.tokens, "val").__len__()
    tokens_cfg.model.block_size = val_tokens + 10
    with pytest.raises(LmforgeError, match="model.block_size"):
        train(tokens_cfg)
    assert not Path(tokens_cfg.paths.model).exists()


def test_corrupt_or_incomplete_model_directory_is_a_clear_error(tokens_cfg, tmp_path):
    from lmforge.model import GPT, GPTConfig
    from lmforge.modeldir import load_model_dir, save_model_dir

    model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=16))
    out = save_model_dir(tmp_path / "m", model, Path(tokens_cfg.paths.vocab) / "tokenizer.json",
                         {"kind": "char", "eot_token": "<|endoftext|>", "eot_id": 0})
    loaded = load_model_dir(out)
    for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LmforgeError, match="model.safetensors.*corrupt"):
        load_model_dir(out)
    weights.unlink()
    with pytest.raises(LmforgeError, match="model.safetensors is missing"):
        load_model_dir(out)
