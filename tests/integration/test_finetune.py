"""Fine-tuning end to end, in process: a tiny base is trained here, then prepare -> vocab -> tokenize
-> train -> evaluate run with ``experiment=finetune`` and ``finetune.base`` naming it (as a model
directory, and as a Hub id from a cache in the Hub's layout), full and LoRA. The tokenizer is the
base's, the architecture the base's, training starts from its weights, LoRA's checkpoints hold the
adapters only and resume bit for bit, and evaluate scores the base beside the tuned model."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lmforge.config.compose import compose_config
from lmforge.corpus.stage import prepare_stage
from lmforge.errors import LmforgeError
from lmforge.model.directory import load_model_dir
from lmforge.tokenization.encode import tokenize_stage
from lmforge.tokenization.vocab import vocab_stage
from lmforge.training.callbacks import Stopped
from lmforge.training.stage import train_stage
from tests.helpers import ROOT, run_pipeline, write_corpus
from tests.unit.test_base import hub_cache

pytestmark = pytest.mark.slow

QUICK = ["train.eval_interval=5", "train.eval_iters=2", "train.log_every=5", "evaluate.max_batches=2",
         "evaluate.max_new_tokens=10", "trainer.precision=32", "tracking.log_model=false"]


# A Llama-family tiny model (transformers' LlamaForCausalLM), beside model=tiny's GPT-2 family.
LLAMA = ["model.positions=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false",
         "model.tie_embeddings=false", "model.n_kv_head=1"]


def train_base(root: Path, *overrides: str) -> Path:
    """A tiny model trained here for 30 steps on a character vocabulary; returns its directory."""
    cfg = compose_config(["model=tiny", "train.max_steps=30", *QUICK, f"tracking.uri=sqlite:///{root}/mlflow.db",
                          *overrides], conf_dir=ROOT / "conf")
    for key in ("prepared", "vocab", "tokens", "model", "checkpoints", "reports"):
        cfg.paths[key] = str(root / cfg.paths[key])
    run_pipeline(cfg, write_corpus(root / "corpus", n_docs=12, words=300))
    return Path(cfg.paths.model)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The base of every test: a GPT-2-family tiny model."""
    return train_base(tmp_path_factory.mktemp("base"))


def finetune_cfg(tmp_path: Path, base: str, *overrides: str):
    return compose_config(["experiment=finetune", f"finetune.base={base}", "model=tiny", "train.max_steps=10",
                           "train.checkpoint_every=5", "optimizer.lr=3e-3", "finetune.lora.lr=1e-2", *QUICK,
                           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides], conf_dir=ROOT / "conf")


def tags_and_metrics(db: Path) -> tuple[dict, dict]:
    connection = sqlite3.connect(db)
    tags = dict(connection.execute("select key, value from tags"))
    metrics = dict(connection.execute("select key, value from latest_metrics"))
    return tags, metrics


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_a_model_directory(base_dir, tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    cfg = finetune_cfg(tmp_path, str(base_dir), f"finetune.method={method}")
    metrics = run_pipeline(cfg, write_corpus(tmp_path / "corpus", n_docs=8, words=200))

    # The vocab stage adopted the base's tokenizer and recorded the base.
    assert Path("data/vocab/tokenizer.json").read_bytes() == (base_dir / "tokenizer.json").read_bytes()
    record = json.loads(Path("data/vocab/base.json").read_text())
    assert record["ref"] == str(base_dir) and record["files"]["model.safetensors"]
    # The model directory: the base's architecture, merged weights that load as any model, the base named.
    tuned = load_model_dir("models/gpt")
    base = load_model_dir(base_dir)
    assert tuned.model.config == base.model.config
    assert json.loads(Path("models/gpt/base.json").read_text()) == {k: record[k] for k in
                                                                     ("ref", "kind", "source", "revision", "files")}
    finetune = tuned.config["finetune"]
    assert finetune["method"] == method and finetune["base"]["ref"] == str(base_dir)
    # The base is scored beside the tuned model, on the same tokens: tuning on this text helped.
    assert metrics["base_val_loss"] > metrics["val_loss"]
    tags, logged = tags_and_metrics(tmp_path / "mlflow.db")
    assert tags["lmforge.base.ref"] == str(base_dir) and tags["lmforge.base.source"] == "local"
    assert logged["eval/base_val_loss"] == pytest.approx(metrics["base_val_loss"])
    fraction = logged["model/trainable_fraction"]
    if method == "full":
        assert fraction == 1.0 and not Path("models/gpt/adapter_model.safetensors").exists()
        return
    assert 0 < fraction < 0.5
    # LoRA: the checkpoint holds only the adapters; the model directory holds them in PEFT's format.
    state = torch.load("models/checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(".lora_" in key for key in state)
    adapter = load_file("models/gpt/adapter_model.safetensors")
    assert set(adapter) == {k.replace("model.", "base_model.model.", 1).replace(".default", "") for k in state}
    config = json.loads(Path("models/gpt/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["target_modules"] == ["c_attn", "c_fc",
                                                                                               "c_proj"]
    # Only the adapted matrices moved; norms, embeddings and the rest are the base's.
    tuned_state, base_state = tuned.model.state_dict(), base.model.state_dict()
    moved = {k for k in base_state if not torch.equal(tuned_state[k], base_state[k])}
    assert moved and all(k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for k in moved)


class StopAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_lora_resumes_bit_for_bit(base_dir, tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", n_docs=8, words=200)
    results = []
    for name, stops in (("straight", False), ("resumed", True)):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        cfg = finetune_cfg(tmp_path / name, str(base_dir), "finetune.method=lora", "model.dropout=0.1")
        cfg.data.sources = [str(corpus)]
        prepare_stage(cfg)
        vocab_stage(cfg)
        tokenize_stage(cfg)
        if stops:
            with pytest.raises(Stopped):
                train_stage(cfg, callbacks=[StopAt(7)])
            assert torch.load("models/checkpoints/last.ckpt", weights_only=True)["global_step"] == 5
        train_stage(cfg)
        results.append(load_file("models/gpt/model.safetensors"))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_finetune_a_hub_id_from_the_cache(base_dir, tmp_path, monkeypatch):
    # The base exported to transformers' format and put in a Hub cache: finetune.base=org/tiny offline.
    from lmforge.interop.hf import export_hf

    cache = hub_cache(tmp_path, export_hf(base_dir, tmp_path / "hf"), repo="org/tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    cfg = finetune_cfg(tmp_path, "org/tiny", "finetune.method=lora", "train.max_steps=5")
    metrics = run_pipeline(cfg, write_corpus(tmp_path / "corpus", n_docs=8, words=200))
    assert metrics["base_val_loss"] > 0
    record = json.loads(Path("models/gpt/base.json").read_text())
    assert record["source"] == "hub" and record["revision"] == "0123456789abcdef0123456789abcdef01234567"
    tags, _ = tags_and_metrics(tmp_path / "mlflow.db")
    assert tags["lmforge.base.revision"] == record["revision"]
    from lmforge.tracking.lineage import describe_run

    shown = describe_run(json.loads(Path("models/gpt/run.json").read_text())["run_id"], f"sqlite:///{tmp_path}/mlflow.db")
    assert f"base model       org/tiny at {record['revision']} (transformers, hub; files sha256" in shown
    assert load_model_dir("models/gpt").config["tokenizer"]["kind"] == "imported"


def test_a_base_other_than_the_vocab_stage_adopted_is_refused(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = finetune_cfg(tmp_path, str(base_dir))
    cfg.data.sources = [str(write_corpus(tmp_path / "corpus", n_docs=8, words=200))]
    prepare_stage(cfg)
    vocab_stage(cfg)
    tokenize_stage(cfg)
    other = shutil.copytree(base_dir, tmp_path / "other")
    cfg.finetune.base = str(other)
    with pytest.raises(LmforgeError, match="holds the tokenizer of .*rerun the vocab and tokenize stages"):
        train_stage(cfg)
    cfg.finetune.base = str(base_dir)
    cfg.model.block_size = 64
    with pytest.raises(LmforgeError, match="model.block_size=64 is longer than the context of finetune.base"):
        train_stage(cfg)


@torch.no_grad()
def greedy(model, ids: list[int], steps: int, eot: int) -> list[int]:
    for _ in range(steps):
        logits = model(torch.tensor([ids]))[0][0, -1]
        ids = ids + [int(logits.argmax())]
        if ids[-1] == eot:
            break
    return ids


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_adapter_loads_onto_the_transformers_base_with_peft(base_dir, tmp_path, monkeypatch, capsys, family):
    # export --adapter OUT: peft.PeftModel.from_pretrained on the base's --format hf export gives the
    # tuned model: the same logits and the same greedy tokens as lmforge's merged weights.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.helpers import run_cli

    base = base_dir if family == "gpt2" else train_base(tmp_path / "llama-base", *LLAMA)
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    cfg = finetune_cfg(tmp_path, str(base), "finetune.method=lora", "finetune.lora.dropout=0.0")
    run_pipeline(cfg, write_corpus(tmp_path / "corpus", n_docs=8, words=200))
    assert run_cli(["export", "--model", base, "--format", "hf", tmp_path / "hf"], capsys)[0] == 0
    code, out, err = run_cli(["export", "--model", "models/gpt", "--adapter", tmp_path / "adapter"], capsys)
    assert code == 0, err
    assert "PeftModel.from_pretrained" in out

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float64)
    before = hf(torch.tensor([[1, 2, 3]])).logits
    tuned_hf = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    tuned = load_model_dir("models/gpt")
    tuned.model.double()
    ids = tuned.tokenizer.encode("the king and").ids
    theirs = tuned_hf(torch.tensor([ids])).logits[0]
    ours = tuned.model(torch.tensor([ids]))[0][0]
    assert torch.allclose(theirs, ours, atol=1e-8)
    assert not torch.allclose(before, tuned_hf(torch.tensor([[1, 2, 3]])).logits, atol=1e-4)  # the adapter acts
    expected = greedy(tuned.model, ids, 20, tuned.eot_id)
    generated = tuned_hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                  eos_token_id=tuned.eot_id, pad_token_id=tuned.eot_id)[0].tolist()
    assert generated == expected


def test_export_adapter_refuses_a_model_without_adapters(base_dir, tmp_path, capsys):
    from tests.helpers import run_cli

    code, _, err = run_cli(["export", "--model", base_dir, "--adapter", tmp_path / "out"], capsys)
    assert code == 1 and "was not fine-tuned with finetune.method=lora" in err and err.count("\n") == 1
    code, _, err = run_cli(["export", "--model", base_dir, tmp_path / "out"], capsys)
    assert code == 1 and "export needs --format hf|gguf and OUT" in err
