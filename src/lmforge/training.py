"""Stage 4, train: the GPT as a LightningModule, its optimizer and schedule, and the train stage.

A training step: a batch of windows in, next-token cross-entropy out, AdamW (weight decay on
matrices only) under linear warmup then cosine decay, gradients clipped. Every
``train.eval_interval`` steps a fixed set of validation batches is scored. At the end the final
weights become a model directory (``lmforge.modeldir``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import OmegaConf

from lmforge.errors import LmforgeError
from lmforge.model import GPT, GPTConfig


def lr_at(step: int, opt_cfg, max_steps: int) -> float:
    """Learning rate at ``step``: linear warmup to ``lr``, then cosine/linear/constant to ``min_lr``."""
    lr, min_lr, warmup = float(opt_cfg.lr), float(opt_cfg.min_lr), int(opt_cfg.warmup_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    if opt_cfg.schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if opt_cfg.schedule == "linear":
        return lr - (lr - min_lr) * progress
    if opt_cfg.schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise LmforgeError(f"optimizer.schedule='{opt_cfg.schedule}' is not one of cosine, linear, constant.")


def build_optimizer(model: GPT, opt_cfg, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW with weight decay on 2-D weight matrices and none on biases, norms and gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": float(opt_cfg.weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if opt_cfg.name != "adamw":
        raise LmforgeError(f"optimizer.name='{opt_cfg.name}' is not one of adamw.")
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=float(opt_cfg.lr), betas=tuple(opt_cfg.betas), eps=float(opt_cfg.eps), **kwargs)


class LitGPT(L.LightningModule):
    """GPT + optimisation for Lightning. ``model_config`` and ``optimizer`` are plain dicts."""

    def __init__(self, model_config: dict, optimizer: dict, max_steps: int):
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(GPTConfig.from_dict(model_config))
        self.opt_cfg = OmegaConf.create(optimizer)
        self.max_steps = max_steps

    def forward(self, idx, targets=None):
        return self.model(idx, targets)

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        fused = self.device.type == "cuda"
        optimizer = build_optimizer(self.model, self.opt_cfg, fused=fused)
        base = float(self.opt_cfg.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, self.opt_cfg, self.max_steps) / base
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Throughput(Callback):
    """Logs tokens per second (and MFU where the device's peak is known) every ``every`` steps."""

    def __init__(self, tokens_per_step: int, every: int, peak_flops: float | None = None):
        self.tokens_per_step = tokens_per_step
        self.every = every
        self.peak_flops = peak_flops
        self._t0 = None
        self._step0 = 0
        self.last_tokens_per_second = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._step0 = now, step  # the first step includes warm-up; measure from here
            return
        if step - self._step0 >= self.every:
            tps = (step - self._step0) * self.tokens_per_step * trainer.world_size / (now - self._t0)
            self.last_tokens_per_second = tps
            metrics = {"perf/tokens_per_second": tps}
            if self.peak_flops:
                flops = pl_module.model.flops_per_token() * tps / trainer.world_size
                metrics["perf/mfu"] = flops / self.peak_flops
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
            self._t0, self._step0 = now, step

    def on_validation_start(self, trainer, pl_module):
        self._t0 = None  # validation time is not training throughput


class History(Callback):
    """Keeps the loss curves in memory (rank 0) for the CSV/PNG plots."""

    def __init__(self):
        self.train: list[tuple[int, float, float]] = []  # step, loss, lr
        self.val: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % trainer.log_every_n_steps == 0 or step == 1:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.train.append((step, float(loss.detach()), trainer.optimizers[0].param_groups[0]["lr"]))

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.val.append((trainer.global_step, float(loss)))


def model_config_for(cfg, vocab_size: int) -> dict:
    """The GPT config dict: ``cfg.model`` plus the vocabulary size of the token files."""
    config = OmegaConf.to_container(cfg.model, resolve=True)
    config["vocab_size"] = int(vocab_size)
    try:
        GPTConfig.from_dict(config).validate()
    except ValueError as err:
        raise LmforgeError(str(err)) from None
    return config


def _write_curves(history: History, out_dir: Path) -> None:
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "train_loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "train_loss", "lr"])
        w.writerows(history.train)
    with open(out_dir / "val_loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "val_loss"])
        w.writerows(history.val)


def _quiet_lightning() -> None:
    import logging
    import warnings

    # Lightning advertises its cloud logger on every run; we log to MLflow.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.getMessage()).startswith("💡 Tip")
    )
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def train(cfg) -> Path:
    """Run the train stage for config ``cfg``; return the model directory it wrote."""
    _quiet_lightning()
    from lmforge import tracking
    from lmforge.config import flat_params
    from lmforge.data import TokenDataModule
    from lmforge.modeldir import save_model_dir
    from lmforge.tokens import read_index

    t = cfg.train
    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    index = read_index(cfg.paths.tokens)
    model_config = model_config_for(cfg, index["vocab_size"])
    datamodule = TokenDataModule(cfg.paths.tokens, int(cfg.model.block_size), int(t.batch_size),
                                 int(cfg.seed), int(t.eval_iters))
    datamodule.setup()  # fail on a too-short split before anything is created
    lit = LitGPT(model_config, OmegaConf.to_container(cfg.optimizer, resolve=True), int(t.max_steps))
    n_params = lit.model.num_params()
    print(f"model: {n_params / 1e6:.2f}M parameters, {lit.model.flops_per_token() / 1e6:.1f} MFLOP per token")

    run_name = cfg.tracking.run_name or f"{Path(cfg.paths.model).name}-{cfg.tokenizer.kind}"
    logger = tracking.make_logger(cfg.tracking, run_name)
    logger.log_hyperparams(flat_params(cfg))
    logger.log_metrics({"model/parameters": n_params, "model/flops_per_token": lit.model.flops_per_token()}, step=0)

    checkpoints = Path(cfg.paths.checkpoints)
    history = History()
    throughput = Throughput(int(t.batch_size) * int(cfg.model.block_size), int(t.log_every))
    callbacks = [
        ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/loss", mode="min",
                        save_top_k=1, save_last=True, auto_insert_metric_name=False),
        throughput,
        history,
    ]
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=int(cfg.trainer.num_nodes),
        strategy=cfg.trainer.strategy,
        precision=str(cfg.trainer.precision),
        max_steps=int(t.max_steps),
        val_check_interval=int(t.eval_interval),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=int(t.log_every),
        gradient_clip_val=float(t.grad_clip) if t.grad_clip else None,
        deterministic=bool(cfg.trainer.deterministic),
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=_show_progress(),
        enable_model_summary=False,
    )
    if cfg.trainer.compile:
        lit.model = torch.compile(lit.model)
    trainer.fit(lit, datamodule=datamodule)
    # The last validation may fall before max_steps: score the final weights too.
    if trainer.global_step % int(t.eval_interval) != 0:
        trainer.validate(lit, datamodule=datamodule, verbose=False)
        history.val.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))

    out = Path(cfg.paths.model)
    if trainer.global_rank == 0:
        model = getattr(lit.model, "_orig_mod", lit.model)
        run = {"tracking_uri": logger._tracking_uri, "experiment_id": logger.experiment_id, "run_id": logger.run_id}
        tokenizer_meta = {"kind": cfg.tokenizer.kind, "eot_token": cfg.tokenizer.eot_token, "eot_id": index["eot_id"],
                          "sha256": index["tokenizer_sha256"]}
        save_model_dir(out, model.cpu(), Path(cfg.paths.vocab) / "tokenizer.json", tokenizer_meta, train_cfg=cfg,
                       run=run, extra={"training": {"steps": trainer.global_step,
                                                     "tokens": trainer.global_step * int(t.batch_size) * int(cfg.model.block_size) * trainer.world_size,
                                                     "tokens_per_second": throughput.last_tokens_per_second}},
                       write_more=lambda tmp: _write_curves(history, tmp / "curves"))
        if cfg.tracking.log_model:
            tracking.log_to_run(run, artifact_dirs={"model": out})
    return out


def _show_progress() -> bool:
    import os
    import sys

    return sys.stderr.isatty() and not os.environ.get("CI")
