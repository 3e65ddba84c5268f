"""The GPT as a LightningModule: a training step (loss averaged over micro-batches), validation,
gradient clipping under every precision, and the metrics of each optimizer step.

It owns no I/O: metrics go out through ``lmforge.tracking.runs.MetricsLog`` and the loss history rides
in the checkpoints, so that a resumed run's curves are complete.
"""

from __future__ import annotations

import lightning as L
import torch
from omegaconf import OmegaConf

from lmforge.model.gpt import GPT, GPTConfig
from lmforge.training.lora import trainable_names
from lmforge.training.optim import FUSED_ADAMW_DEVICES, build_optimizer, lr_at, lr_factor


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite at ``step``."""

    def __init__(self, step: int):
        super().__init__(f"the training loss became NaN or infinite at step {step}")
        self.step = step


class LitGPT(L.LightningModule):
    """GPT + optimisation for Lightning. ``model_config`` and ``optimizer`` are plain dicts.

    Metrics are recorded at the optimizer step they belong to (train loss averaged over
    micro-batches and ranks every ``log_every`` steps, validation loss averaged over ranks), for
    MLflow (through ``metrics_log``, a ``tracking.MetricsLog``) and in ``history``, which
    checkpoints carry so that a resumed
    run's curves are complete.
    """

    def __init__(self, model_config: dict, optimizer: dict, max_steps: int, log_every: int):
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(GPTConfig.from_dict(model_config))
        self.opt_cfg = OmegaConf.create(optimizer)
        self.max_steps = max_steps
        self.log_every = log_every
        self.history: dict[str, list] = {"train": [], "val": []}  # [step, loss, lr] and [step, loss]
        self._loss_sum: torch.Tensor | None = None  # over this step's micro-batches so far
        self._micro_batches = 0
        self._first_nonfinite: torch.Tensor | None = None  # step of the first NaN/inf loss, or -1
        self._val_sum: torch.Tensor | None = None
        self._val_batches = 0
        self.metrics_log = None  # a tracking.MetricsLog on rank 0 (set by the stage), else None
        self.base = None  # a fine-tune's base (lmforge.interop.base.Base), set by the stage
        self.lora_lr = None  # LoRA: AdamW's peak rate for the adapters (training.optim), set by the stage

    def forward(self, idx, targets=None, segments=None):
        return self.model(idx, targets, segments=segments)

    @property
    def mid_step(self) -> bool:
        """True between the micro-batches of one optimizer step (gradient accumulation)."""
        return self._micro_batches != 0

    def training_step(self, batch, batch_idx):
        _, loss = self.model(*batch[:2], segments=batch[2] if len(batch) > 2 else None)
        detached = loss.detach()
        self._loss_sum = detached if self._micro_batches == 0 else self._loss_sum + detached
        self._micro_batches += 1
        if self._micro_batches == self.trainer.accumulate_grad_batches:
            self._end_of_step(self._loss_sum / self._micro_batches, self.global_step + 1)
            self._micro_batches = 0
        return loss

    def _end_of_step(self, loss: torch.Tensor, step: int) -> None:
        # No host sync here: NaN/inf is recorded on the device and looked at only when the loss is
        # logged and before a checkpoint is written, so a bad step is never saved.
        if self._first_nonfinite is None:
            self._first_nonfinite = torch.tensor(-1, device=loss.device)
        self._first_nonfinite = torch.where(
            (self._first_nonfinite < 0) & ~torch.isfinite(loss), step, self._first_nonfinite
        )
        if step % self.log_every == 0 or step == 1:
            self.check_finite()  # before this step's optimizer update is applied
            loss = float(self.trainer.strategy.reduce(loss, reduce_op="mean"))
            lr = lr_at(step - 1, self.opt_cfg, self.max_steps)
            self.history["train"].append([step, loss, lr])
            self.record({"train/loss": loss, "train/lr": lr}, step)

    def check_finite(self) -> None:
        """Raise NonFiniteLoss if any rank's loss has been NaN/inf (a collective call)."""
        if self._first_nonfinite is None:
            return
        first = int(self.trainer.strategy.reduce(self._first_nonfinite, reduce_op="max"))
        if first >= 0:
            raise NonFiniteLoss(first)

    def on_validation_epoch_start(self):
        self._val_sum, self._val_batches = None, 0

    def validation_step(self, batch, batch_idx):
        # Packed records (x, y, segments): y is -100 but for assistant tokens, so only they count.
        _, loss = self.model(*batch[:2], segments=batch[2] if len(batch) > 2 else None)
        self._val_sum = loss.detach() if self._val_sum is None else self._val_sum + loss.detach()
        self._val_batches += 1

    def on_validation_epoch_end(self):
        if self._val_batches == 0:
            return
        loss = self.trainer.strategy.reduce(self._val_sum / self._val_batches, reduce_op="mean")
        # For ModelCheckpoint(monitor=...) and EarlyStopping only; MLflow gets it from record().
        self.log("val/loss", loss, logger=False, sync_dist=False)
        self.history["val"].append([self.global_step, float(loss)])
        self.record({"val/loss": float(loss)}, self.global_step)

    def record(self, metrics: dict[str, float], step: int) -> None:
        """Send ``metrics`` of optimizer step ``step`` to the logger (batched: see MetricsLog)."""
        if self.metrics_log is not None:
            self.metrics_log.add(metrics, step)

    def configure_optimizers(self):
        # With fp16 loss scaling Lightning unscales the gradients before clipping them, which an
        # optimizer that unscales inside its fused step does not allow.
        fused = self.device.type in FUSED_ADAMW_DEVICES and self.trainer.precision != "16-mixed"
        optimizer = build_optimizer(self.model, self.opt_cfg, fused=fused, lora_lr=self.lora_lr)
        # A plain function, not a callable object: LambdaLR then saves no pickled code in checkpoints.
        schedule = lambda step: lr_factor(step, self.opt_cfg, self.max_steps)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision

        plugin = self.trainer.precision_plugin
        if not gradient_clip_val:
            return
        if isinstance(plugin, FSDPPrecision):
            # Sharded gradients: only the root FSDP module can compute the global norm (Lightning
            # refuses to clip by norm under FSDP for that reason).
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
        elif type(plugin) is MixedPrecision and plugin.scaler is None:
            # bf16 autocast scales no loss, so these are the true gradients; Lightning's plugin
            # refuses to clip them for any fused optimizer, so clip as it does without one.
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # raises before a NaN-poisoned state is written
        checkpoint.setdefault("lmforge", {})["history"] = self.history
        if self.frozen_base:  # LoRA: the adapters (and what else trains); the base is rebuilt from its files
            keep = trainable_names(self.model, "model.")
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    @property
    def frozen_base(self) -> bool:
        """Whether part of the model does not train (LoRA): checkpoints then hold only what trains."""
        return any(not p.requires_grad for p in self.model.parameters())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = checkpoint.get("lmforge", {}).get("history", {"train": [], "val": []})
