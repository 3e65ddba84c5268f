"""The train stage's checks of a configuration: choices, micro-batches per step, optimizer and strategy.

The range of each number (positive counts, ...) is ``lmforge.config.rules``'s, checked before these."""

from __future__ import annotations

from omegaconf import DictConfig

from lmforge.config.checks import PRECISIONS
from lmforge.errors import LmforgeError
from lmforge.training.hardware import MATMUL_PRECISIONS
from lmforge.training.muon import ADJUST_LR, NS_SCHEMES
from lmforge.training.optim import OPTIMIZERS, SCHEDULES, accumulation_steps
from lmforge.training.resume import RESUME


def check_training(cfg: DictConfig) -> None:
    """The train stage's own checks, the first problem only: choices, micro-batches per step for the
    given devices and nodes, optimizer and strategy."""
    t, opt, trainer = cfg.train, cfg.optimizer, cfg.trainer
    choices = (("trainer.precision", str(trainer.precision), PRECISIONS), ("train.resume", t.resume, RESUME),
               ("trainer.float32_matmul_precision", str(trainer.get("float32_matmul_precision", "highest")),
                MATMUL_PRECISIONS),
               ("optimizer.schedule", opt.schedule, SCHEDULES), ("optimizer.name", opt.name, OPTIMIZERS))
    if opt.name == "muon":
        choices += (("optimizer.muon_adjust_lr", opt.get("muon_adjust_lr") or "original", ADJUST_LR),
                    ("optimizer.muon_ns_scheme", opt.get("muon_ns_scheme", "torch"), NS_SCHEMES))
    for key, value, valid in choices:
        if value not in valid:
            raise LmforgeError(f"{key}='{value}' is not one of {', '.join(valid)}; set it in conf/ or override it.")
    if isinstance(trainer.devices, int) and trainer.devices > 0:  # else checked once Lightning knows the devices
        accumulation_steps(t.global_batch_tokens, int(t.batch_size), int(cfg.model.block_size),
                           trainer.devices * int(trainer.num_nodes))
    if opt.name == "muon" and "fsdp" in str(trainer.strategy):
        raise LmforgeError("optimizer=muon needs whole weight matrices, which trainer.strategy=fsdp shards; "
                           "use optimizer=adamw with FSDP, or trainer=ddp.")


def check_global_batch(cfg: DictConfig) -> None:
    """With ``trainer.devices=auto`` the world size is known only at run time; the global batch
    must still be a whole number of one device's micro-batches."""
    t = cfg.train
    if not isinstance(cfg.trainer.devices, int):
        accumulation_steps(t.global_batch_tokens, int(t.batch_size), int(cfg.model.block_size), 1)


def check_finetune(cfg: DictConfig) -> None:
    """``finetune.*``: a method, embeddings setting and LoRA targets of ours; LoRA with FSDP is refused
    (the adapters are injected into whole layers, which FSDP shards)."""
    from lmforge.training.lora import check_lora_settings

    finetune = cfg.get("finetune")
    if finetune is None:
        return
    check_lora_settings(finetune)
    if finetune.get("base") and finetune.method == "lora" and "fsdp" in str(cfg.trainer.strategy):
        raise LmforgeError("finetune.method=lora is not supported with trainer.strategy=fsdp; use trainer=ddp "
                           "(the frozen base is replicated, only the adapters' gradients are exchanged).")
    from pathlib import Path

    from lmforge.training.finetune import base_summary

    if finetune.get("base") and Path(str(finetune.base)).expanduser().resolve() in (
            Path(str(cfg.paths.model)).resolve(), Path(str(cfg.paths.checkpoints)).resolve()):
        raise LmforgeError(f"finetune.base={finetune.base} is where the train stage writes its model, which the "
                           "pipeline replaces; copy it elsewhere first (cp -r models/gpt bases/mine) and name "
                           "that copy.")

    base = base_summary(cfg)  # a local base: its context bounds the training window now, not at train time
    if base is not None and int(cfg.model.block_size) > base[0].block_size:
        raise LmforgeError(f"model.block_size={cfg.model.block_size} is longer than the context of finetune.base="
                           f"{finetune.base} ({base[0].block_size} tokens); set model.block_size to at most "
                           f"{base[0].block_size}.")
    if finetune.get("base") and cfg.train.get("init_from"):
        raise LmforgeError(f"train.init_from={cfg.train.init_from} and finetune.base={finetune.base} both name weights "
                           "to start from; keep finetune.base (it also brings the tokenizer and architecture) and "
                           "set train.init_from=null.")
    if not finetune.get("base") and finetune.method == "lora":
        raise LmforgeError("finetune.method=lora needs a base to adapt; set finetune.base (a model directory, "
                           "a transformers directory or a Hub id), or finetune.method=full.")
