"""Tokenize, train and evaluate on tiny sizes with the real configs and the real trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lmforge.errors import LmforgeError
from lmforge.tokenization.encode import tokenize_stage
from lmforge.tokenization.shards import TokenStream
from lmforge.training.optim import accumulation_steps, build_optimizer, lr_at, lr_factor
from tests.helpers import assert_learned, first_train_loss, run_record


def test_token_files_round_trip(tokens_cfg):
    from lmforge.tokenization.tokenizer import load_tokenizer

    index = json.loads(Path(tokens_cfg.paths.tokens, "index.json").read_text())
    assert index["dtype"] == "uint16"
    stream = TokenStream(tokens_cfg.paths.tokens, "val")
    assert len(stream) == index["splits"]["val"]["tokens"]
    tokenizer = load_tokenizer(Path(tokens_cfg.paths.vocab) / "tokenizer.json")
    text = Path(tokens_cfg.paths.prepared, "val.txt").read_text(encoding="utf-8")
    assert tokenizer.decode(stream.read(0, len(stream)).tolist(), skip_special_tokens=False) == text


def test_shards_split_at_the_configured_size(tokens_cfg):
    tokens_cfg.data.shard_size = 1000  # bytes: 500 uint16 tokens a shard
    index = tokenize_stage(tokens_cfg)
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["tokens"] <= 500 for s in shards)
    stream = TokenStream(tokens_cfg.paths.tokens, "train")
    whole = stream.read(0, len(stream))
    assert np.array_equal(stream.read(490, 30), whole[490:520])  # a window across a shard boundary


def test_lr_schedule_warms_up_then_decays_to_min():
    opt = OmegaConf.create({"lr": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 10, "schedule": "cosine"})
    assert lr_at(0, opt, 100) == pytest.approx(1e-4)
    assert lr_at(9, opt, 100) == pytest.approx(1e-3)
    assert lr_at(100, opt, 100) == pytest.approx(1e-4)
    lrs = [lr_at(s, opt, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_every_schedule_warms_up_and_stays_between_min_and_peak(schedule):
    opt = OmegaConf.create({"lr": 2e-3, "min_lr_ratio": 0.1, "warmup_steps": 5, "schedule": schedule})
    factors = [lr_factor(s, opt, 50) for s in range(60)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(0.1 - 1e-12 <= f <= 1.0 for f in factors)
    assert factors[50] == pytest.approx(1.0 if schedule == "constant" else 0.1)
    assert lr_at(20, opt, 50) == pytest.approx(2e-3 * factors[20])
    if schedule == "linear":
        assert factors[27] == pytest.approx(1.0 - 0.9 * 22 / 45)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_cooldown():
    opt = OmegaConf.create({"lr": 1e-3, "min_lr_ratio": 0.0, "warmup_steps": 10, "schedule": "wsd",
                            "cooldown_fraction": 0.5})
    factors = [lr_factor(s, opt, 100) for s in range(101)]
    assert factors[9] == factors[10] == factors[50] == 1.0  # warm, then stable until half the steps are left
    assert factors[75] == pytest.approx(0.5) and factors[99] == pytest.approx(0.02) and factors[100] == 0.0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    floor = OmegaConf.merge(opt, {"min_lr_ratio": 0.2, "cooldown_fraction": 0.0})
    assert lr_factor(99, floor, 100) == 1.0  # no cooldown: constant after warmup


def test_embeddings_take_their_own_rate_when_one_is_set():
    from lmforge.model.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False))
    opt = OmegaConf.create({"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1,
                            "embedding_lr": 0.03})
    groups = build_optimizer(model, opt).param_groups
    by_param = {id(p): g for g in groups for p in g["params"]}
    for embedding in (model.transformer.wte.weight, model.transformer.wpe.weight):
        assert by_param[id(embedding)]["lr"] == 0.03 and by_param[id(embedding)]["weight_decay"] == 0.1
    assert by_param[id(model.lm_head.weight)]["lr"] == 1e-3
    same = build_optimizer(model, OmegaConf.merge(opt, {"embedding_lr": None})).param_groups
    assert {g["lr"] for g in same} == {1e-3} and len(same) == 2


def test_global_batch_in_tokens_sets_the_accumulation():
    assert accumulation_steps(None, 12, 64, 4) == 1
    assert accumulation_steps(12 * 64 * 4 * 8, 12, 64, 4) == 8
    with pytest.raises(LmforgeError, match="train.global_batch_tokens=1000 .* multiple of 3072"):
        accumulation_steps(1000, 12, 64, 4)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tmp_path):
    from lmforge.config.compose import compose_config
    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.training.optim import MuonWithAdamW

    opt_cfg = compose_config(["optimizer=muon"], conf_dir=Path(__file__).parents[2] / "conf").optimizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False,
                          positions="rope", norm="rmsnorm", mlp="swiglu", bias=False))
    optimizer = build_optimizer(model, opt_cfg)
    assert isinstance(optimizer, MuonWithAdamW) and isinstance(optimizer.muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert adamw == set(names.values()) - muon
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight"} <= adamw

    # One schedule scales both optimizers' groups, also after a state-dict round trip.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    _, loss = model(torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16)))
    loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    scheduler.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    state = optimizer.state_dict()
    path = tmp_path / "optimizer.pt"
    torch.save(state, path)
    fresh = build_optimizer(model, opt_cfg)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    fresh.param_groups[0]["lr"] = 0.123
    assert fresh.muon.param_groups[0]["lr"] == 0.123
    assert fresh.muon.state_dict()["state"].keys() == optimizer.muon.state_dict()["state"].keys()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5 * opt_cfg.muon_lr] + [0.5 * opt_cfg.lr] * 2)


def test_weight_decay_only_on_matrices():
    from lmforge.model.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    optimizer = build_optimizer(model, compose_optimizer("adamw"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] > 0 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0 and all(p.dim() == 1 for p in no_decay["params"])


def test_train_and_evaluate_write_a_model_directory_and_metrics(tokens_cfg):
    from lmforge.evaluation.stage import evaluate_stage
    from lmforge.model.directory import load_model_dir
    from lmforge.training.stage import train_stage

    tokens_cfg.train.max_steps = 30
    out = train_stage(tokens_cfg)
    loaded = load_model_dir(out)
    assert loaded.model.config.n_layer == tokens_cfg.model.n_layer
    val = [float(line.split(",")[1]) for line in (out / "curves/val_loss.csv").read_text().splitlines()[1:]]
    assert len(val) >= 2 and val[-1] < val[0]  # it learned something
    metrics = evaluate_stage(tokens_cfg)
    assert metrics["val_loss"] < np.log(loaded.model.config.vocab_size)
    assert metrics["val_bits_per_byte"] == pytest.approx(
        metrics["val_loss"] * metrics["val_tokens"] / metrics["val_bytes"] / np.log(2), rel=0.05)
    assert Path(tokens_cfg.paths.reports, "plots", "loss.png").is_file()


def test_block_size_larger_than_validation_split_is_a_clear_error(tokens_cfg):
    from lmforge.training.stage import train_stage

    val_tokens = TokenStream(tokens_cfg.paths.tokens, "val").__len__()
    tokens_cfg.model.block_size = val_tokens + 10
    with pytest.raises(LmforgeError, match="model.block_size"):
        train_stage(tokens_cfg)
    assert not Path(tokens_cfg.paths.model).exists()


def test_corrupt_or_incomplete_model_directory_is_a_clear_error(tokens_cfg, tmp_path):
    from lmforge.model.directory import load_model_dir, save_model_dir
    from lmforge.model.gpt import GPT, GPTConfig

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


def run_status(cfg, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    from lmforge.tracking.runs import resolve_uri

    return MlflowClient(resolve_uri(cfg.tracking.uri)).get_run(run_id).info.status


def metric_keys(cfg, run_id: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    from lmforge.tracking.runs import resolve_uri

    return set(MlflowClient(resolve_uri(cfg.tracking.uri)).get_run(run_id).data.metrics)




def test_a_nan_loss_stops_training_keeps_the_last_good_checkpoint_and_fails_the_run(tokens_cfg):
    from lmforge.training.stage import train_stage

    tokens_cfg.tracking.log_model = False
    tokens_cfg.optimizer = compose_optimizer("adamw")
    tokens_cfg.train.checkpoint_every = 1
    tokens_cfg.train.log_every = 5
    tokens_cfg.train.grad_clip = 0.0
    tokens_cfg.optimizer.lr = 1e6  # blows up within a few steps
    tokens_cfg.optimizer.warmup_steps = 0
    with pytest.raises(LmforgeError,
                       match=r"loss became NaN or infinite at step (\d+).*FAILED.*last good checkpoint") as err:
        train_stage(tokens_cfg)
    bad_step = int(str(err.value).split("at step ")[1].split(",")[0])
    checkpoint = torch.load(Path(tokens_cfg.paths.checkpoints, "last.ckpt"), weights_only=True)
    assert checkpoint["global_step"] < bad_step
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    assert run_status(tokens_cfg, run_record(tokens_cfg)["run_id"]) == "FAILED"
    assert not Path(tokens_cfg.paths.model).exists()


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12),
     ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA H200", 989e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12),
     ("NVIDIA GeForce RTX 3090", None)],
)
def test_peak_flops_by_device_name(monkeypatch, name, peak):
    from lmforge.training.callbacks import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == peak
    assert peak_flops(torch.device("cpu")) is None  # no MFU on CPUs


@pytest.mark.slow
def test_early_stopping_on_validation_loss(tokens_cfg, monkeypatch):
    from lmforge.model.directory import load_model_dir
    from lmforge.training import callbacks
    from lmforge.training.stage import train_stage

    monkeypatch.setattr(callbacks, "peak_flops", lambda device: 1e9)  # as if the device's peak were known

    tokens_cfg.tracking.log_model = False
    tokens_cfg.optimizer = compose_optimizer("adamw")
    tokens_cfg.train.max_steps = 100
    tokens_cfg.train.eval_interval = 5
    tokens_cfg.train.early_stopping_patience = 2
    tokens_cfg.optimizer.lr = 0.0  # the validation loss never improves after the first evaluation
    out = train_stage(tokens_cfg)
    # Evaluations at 5 (best), 10 and 15 (no better: patience 2 used up).
    assert load_model_dir(out).config["training"]["steps"] == 15
    run_id = run_record(tokens_cfg)["run_id"]
    assert run_status(tokens_cfg, run_id) == "FINISHED"
    expected = {"perf/tokens_per_second", "perf/mfu", "model/parameters", "model/flops_per_token"}
    assert expected <= metric_keys(tokens_cfg, run_id)
    # MFU is the model's FLOPs at the measured rate over the device's peak, step by step.
    from mlflow.tracking import MlflowClient

    from lmforge.tracking.runs import resolve_uri

    client = MlflowClient(resolve_uri(tokens_cfg.tracking.uri))
    history = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
               for k in ("perf/tokens_per_second", "perf/mfu")}
    flops = client.get_metric_history(run_id, "model/flops_per_token")[0].value
    assert history["perf/mfu"] and history["perf/mfu"].keys() == history["perf/tokens_per_second"].keys()
    for step, mfu in history["perf/mfu"].items():
        assert mfu == pytest.approx(flops * history["perf/tokens_per_second"][step] / 1e9, rel=1e-6)
        assert 0 < mfu


# 16-mixed needs CUDA: Lightning makes it bf16 on CPU
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_mixed_and_half_precision_train_on_cpu(tokens_cfg, precision):
    from lmforge.model.directory import load_model_dir
    from lmforge.training.stage import train_stage

    tokens_cfg.tracking.log_model = False
    tokens_cfg.train.max_steps = 20
    tokens_cfg.trainer.precision = precision
    out = train_stage(tokens_cfg)
    loaded = load_model_dir(out)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in loaded.model.parameters())
    # ... and the precision trains: the final validation loss is what 20 steps must reach.
    val = [float(line.split(",")[1]) for line in (out / "curves/val_loss.csv").read_text().splitlines()[1:]]
    assert_learned(val[-1], first_train_loss(out), loaded.model.config.vocab_size)


class SignalAt(L.Callback if (L := __import__("lightning")) else object):
    """Sends this process SIGINT (as Ctrl-C does) at the end of optimizer step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not pl_module.mid_step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_muon_with_accumulation_resumes_exactly_after_ctrl_c(tokens_cfg):
    """In-process twin of tests/test_resume.py for the Muon optimizer and gradient accumulation."""
    from safetensors.torch import load_file

    from lmforge.training.stage import train_stage

    cfg = tokens_cfg
    cfg.tracking.log_model = False
    cfg.optimizer = compose_optimizer("muon")
    cfg.optimizer.warmup_steps = 3
    cfg.model.dropout = 0.1
    cfg.train.update({"max_steps": 16, "eval_interval": 5, "log_every": 2, "checkpoint_every": 4,
                      "global_batch_tokens": 2 * cfg.train.batch_size * cfg.model.block_size})
    cfg.paths.update({"model": "a/gpt", "checkpoints": "a/checkpoints"})
    reference = train_stage(cfg)
    cfg.paths.update({"model": "b/gpt", "checkpoints": "b/checkpoints"})
    cfg.train.resume = "auto"
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, callbacks=[SignalAt(7)])
    assert torch.load("b/checkpoints/last.ckpt", weights_only=True)["global_step"] == 7
    run_id = run_record(cfg)["run_id"]
    assert run_status(cfg, run_id) == "KILLED"
    resumed = train_stage(cfg)
    assert run_record(cfg)["run_id"] == run_id and run_status(cfg, run_id) == "FINISHED"
    a, b = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for curve in ("train_loss.csv", "val_loss.csv"):
        assert (reference / "curves" / curve).read_text() == (resumed / "curves" / curve).read_text()
    assert {"train/loss", "val/loss", "perf/tokens_per_second", "model/parameters"} <= metric_keys(cfg, run_id)


def compose_optimizer(name: str):
    from lmforge.config.compose import compose_config

    return compose_config([f"optimizer={name}"], conf_dir=Path(__file__).parents[2] / "conf").optimizer


def test_resume_auto_continues_only_an_unfinished_run_of_the_same_configuration(tokens_cfg):
    from lmforge.training.stage import train_stage

    cfg = tokens_cfg
    cfg.tracking.log_model = False
    cfg.train.max_steps = 10
    cfg.train.resume = "auto"
    train_stage(cfg)
    first = run_record(cfg)["run_id"]
    assert run_record(cfg)["finished"] and run_status(cfg, first) == "FINISHED"
    # Finished: a rerun of the stage (the code or the hardware settings changed) trains afresh, and
    # the finished run's checkpoints (its result is the model directory) are not kept aside.
    train_stage(cfg)
    second = run_record(cfg)["run_id"]
    assert second != first and run_status(cfg, first) == "FINISHED"
    cfg.seed = 7  # another configuration never continues these checkpoints
    train_stage(cfg)
    third = run_record(cfg)["run_id"]
    assert third not in (first, second)
    assert not list(Path(cfg.paths.checkpoints).parent.glob("checkpoints.*"))


@pytest.mark.parametrize(
    "override, words",
    [
        ("trainer.precision=64", ["trainer.precision", "bf16-mixed"]),
        ("train.resume=always", ["train.resume", "auto"]),
        ("optimizer.name=sgd", ["optimizer.name", "muon"]),
        ("train.global_batch_tokens=100", ["train.global_batch_tokens", "multiple"]),
        ("train.checkpoint_every=0", ["train.checkpoint_every", "positive"]),
    ],
)
def test_bad_training_settings_are_clear_errors(tokens_cfg, override, words):
    from lmforge.stages.check import check_config  # what the stage runner checks before the train stage runs

    key, value = override.split("=")
    OmegaConf.update(tokens_cfg, key, int(value) if value.isdigit() else value)
    with pytest.raises(LmforgeError) as err:
        check_config(tokens_cfg, stage="train")
    assert all(word in str(err.value) for word in words)


def test_gpu_trainer_presets_compose_and_fsdp_shards_by_block(project_root):
    from lightning.pytorch.strategies import FSDPStrategy

    from lmforge.config.compose import compose_config
    from lmforge.training.checks import check_training as check_training_config
    from lmforge.training.stage import _strategy

    for preset in ("gpu", "ddp", "fsdp"):
        # AdamW: the default Muon needs whole matrices, which FSDP shards (checked below)
        cfg = compose_config([f"trainer={preset}", "trainer.num_nodes=2", "optimizer=adamw"],
                             conf_dir=project_root / "conf")
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed" and cfg.trainer.compile
        check_training_config(cfg)
    strategy = _strategy(cfg.trainer)  # FSDP needs a GPU to run; its setup is checked here
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["use_orig_params"]
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    cfg.optimizer = compose_config(["optimizer=muon"], conf_dir=project_root / "conf").optimizer
    with pytest.raises(LmforgeError, match="optimizer=muon .*strategy=fsdp"):
        check_training_config(cfg)
