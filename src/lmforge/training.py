"""Stage 4, train: the GPT as a LightningModule, its optimizers and schedule, and the train stage.

A training step: a batch of windows in, next-token cross-entropy out, gradients accumulated over
micro-batches up to the global batch, clipped, and one optimizer step: AdamW (weight decay on
matrices only), or Muon on the hidden matrices with AdamW on the rest, under linear warmup then
cosine/linear/constant decay to a minimum. Every ``train.eval_interval`` steps a fixed set of
validation batches is scored. Lightning runs it on one CPU or many GPUs and nodes (DDP, FSDP).

Surviving: ``checkpoints/last.ckpt`` is rewritten atomically every ``train.checkpoint_every``
steps, with the optimizer, schedule, random-number and data position in it; ``train.resume=auto``
continues from it bit for bit, in the same MLflow run (``checkpoints/run.json``). A non-finite
loss stops the run (FAILED) before a bad checkpoint is written; Ctrl-C or SIGTERM finishes the
step, saves a checkpoint and stops (KILLED; exit status 130 or 143). A resumed run logs no step
that MLflow already holds. At the end the final weights become a model directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from omegaconf import OmegaConf

from lmforge.errors import LmforgeError
from lmforge.model import GPT, Block, GPTConfig

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed", "bf16-true")  # auto: lmforge.hardware.resolve_precision
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "muon")
RESUME = ("never", "auto")

FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # one kernel for the whole update instead of a dozen per tensor
LAST_CHECKPOINT = "last.ckpt"
RUN_FILE = "run.json"  # in paths.checkpoints: the MLflow run and configuration of the checkpoints

# Dense bf16 tensor-core peak FLOP/s by device name (NVIDIA data sheets); MFU is measured against
# it. The first pattern that matches torch.cuda.get_device_name() wins; unknown devices (and CPUs)
# get no MFU rather than a wrong one.
PEAK_BF16_FLOPS = (
    (r"H100.*PCIe", 756e12),
    (r"H100 NVL", 835e12),
    (r"H100|H200|GH200", 989e12),  # SXM (HBM3 / HBM3e)
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"\bL4\b", 121e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s from ``PEAK_BF16_FLOPS``, or None when unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for pattern, flops in PEAK_BF16_FLOPS if re.search(pattern, name)), None)


# ---------------------------------------------------------------------------------------------
# Schedule and optimizers
# ---------------------------------------------------------------------------------------------


def lr_factor(step: int, opt_cfg, max_steps: int) -> float:
    """The learning rate at optimizer step ``step`` (from 0) as a fraction of the peak rate.

    Linear warmup over ``warmup_steps``, then ``constant``, or a ``linear``/``cosine`` decay that
    reaches ``min_lr / lr`` at ``max_steps``. Every param group (Muon's too) follows this factor.
    """
    lr, warmup = float(opt_cfg.lr), int(opt_cfg.warmup_steps)
    floor = float(opt_cfg.min_lr) / lr if lr > 0 else 0.0
    if step < warmup:
        return (step + 1) / warmup
    if opt_cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if opt_cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    if opt_cfg.schedule == "cosine":
        return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * progress))
    raise LmforgeError(f"optimizer.schedule='{opt_cfg.schedule}' is not one of {', '.join(SCHEDULES)}.")


def lr_at(step: int, opt_cfg, max_steps: int) -> float:
    """The (AdamW) learning rate at optimizer step ``step``: ``lr * lr_factor(step)``."""
    return float(opt_cfg.lr) * lr_factor(step, opt_cfg, max_steps)


def adamw_groups(params: list[torch.nn.Parameter], matrices: set[int], weight_decay: float) -> list[dict]:
    """Two param groups: weight decay on the ``matrices`` (ids), none on biases and gains."""
    return [
        {"params": [p for p in params if id(p) in matrices], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in matrices], "weight_decay": 0.0},
    ]


def build_optimizer(model: GPT, opt_cfg, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``optimizer.name`` names, for ``model``.

    ``adamw``: AdamW over everything (decay on matrices only). ``muon``: Muon (``lmforge.muon``) on the
    2-D weight matrices inside the transformer blocks, AdamW on embeddings, head, gains and biases.
    ``fused``: the fused AdamW kernel (CUDA and CPU). Parameters are told apart by the layer that
    owns them, not by their shape, which FSDP flattens.
    """
    if opt_cfg.name not in OPTIMIZERS:
        raise LmforgeError(f"optimizer.name='{opt_cfg.name}' is not one of {', '.join(OPTIMIZERS)}.")
    adamw = dict(lr=float(opt_cfg.lr), betas=tuple(opt_cfg.betas), eps=float(opt_cfg.eps))
    if fused:
        adamw["fused"] = True
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    if opt_cfg.name == "adamw":
        return torch.optim.AdamW(adamw_groups(params, matrices, float(opt_cfg.weight_decay)), **adamw)
    from lmforge.hardware import muon_dtype
    from lmforge.muon import Muon

    hidden = {id(m.weight) for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear)}
    muon = Muon(  # torch.optim.Muon, orthogonalising in the device's native dtype (lmforge.hardware)
        [p for p in params if id(p) in hidden],
        ns_dtype=muon_dtype(params[0].device),
        lr=float(opt_cfg.muon_lr),
        momentum=float(opt_cfg.muon_momentum),
        weight_decay=float(opt_cfg.muon_weight_decay),
        nesterov=True,
        adjust_lr_fn=opt_cfg.muon_adjust_lr,
    )
    rest = [p for p in params if id(p) not in hidden]
    return MuonWithAdamW(muon, torch.optim.AdamW(adamw_groups(rest, matrices, float(opt_cfg.weight_decay)), **adamw))


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW stepped as one optimizer, so Lightning's automatic optimization (gradient
    accumulation, clipping, mixed precision, schedulers) applies to both unchanged.

    ``param_groups`` are the two optimizers' own group dicts: a scheduler that scales a group's
    ``lr`` scales the optimizer that reads it. The state dict holds both inner state dicts.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        # Optimizer.__init__ adopts these very dicts (add_param_group appends the dict it is given).
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        # Loading replaces the inner group dicts: share the new ones again.
        self.param_groups = self.muon.param_groups + self.adamw.param_groups


def accumulation_steps(global_batch_tokens: int | None, batch_size: int, block_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that a step sees ``global_batch_tokens`` tokens.

    None means one micro-batch per device (no accumulation). LmforgeError when the global batch
    is not a whole number of micro-batches of ``batch_size * block_size`` tokens on every device.
    """
    if global_batch_tokens is None:
        return 1
    per_pass = batch_size * block_size * world_size
    if global_batch_tokens <= 0 or global_batch_tokens % per_pass:
        raise LmforgeError(
            f"train.global_batch_tokens={global_batch_tokens} is not a positive multiple of "
            f"train.batch_size * model.block_size * devices = {batch_size} * {block_size} * {world_size} = {per_pass}; "
            f"set it to a multiple of {per_pass} (or null for no accumulation)."
        )
    return global_batch_tokens // per_pass


# ---------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite at ``step``."""

    def __init__(self, step: int):
        super().__init__(f"the training loss became NaN or infinite at step {step}")
        self.step = step


class LitGPT(L.LightningModule):
    """GPT + optimisation for Lightning. ``model_config`` and ``optimizer`` are plain dicts.

    Metrics are recorded at the optimizer step they belong to (train loss averaged over
    micro-batches and ranks every ``log_every`` steps, validation loss averaged over ranks), for
    MLflow (through MetricsLog) and in ``history``, which checkpoints carry so that a resumed
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
        self.metrics_log = MetricsLog()

    def forward(self, idx, targets=None):
        return self.model(idx, targets)

    @property
    def mid_step(self) -> bool:
        """True between the micro-batches of one optimizer step (gradient accumulation)."""
        return self._micro_batches != 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
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
        x, y = batch
        _, loss = self.model(x, y)
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
        self.metrics_log.add(self.trainer, metrics, step)

    def configure_callbacks(self):
        return [self.metrics_log]

    def configure_optimizers(self):
        # With fp16 loss scaling Lightning unscales the gradients before clipping them, which an
        # optimizer that unscales inside its fused step does not allow.
        fused = self.device.type in FUSED_ADAMW_DEVICES and self.trainer.precision != "16-mixed"
        optimizer = build_optimizer(self.model, self.opt_cfg, fused=fused)
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

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = checkpoint.get("lmforge", {}).get("history", {"train": [], "val": []})


# ---------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------


class MetricsLog(Callback):
    """Metrics on their way to MLflow, written in one batch every ``FLUSH_SECONDS`` rather than one
    write per logged step (a SQLite store spends tens of milliseconds on each: about 5% of a
    baby's training time at two writes every 10 steps). Flushed before every checkpoint is
    written, so a resumed run misses no step, and when training ends or fails. Rank 0 only (the
    others have no logger).
    """

    FLUSH_SECONDS = 10.0

    def __init__(self):
        self.pending: list[tuple[str, float, int, int]] = []  # key, value, step, timestamp (ms)
        self._last_flush = time.monotonic()
        self.logged: set[tuple[str, int]] = set()  # (key, step) already in a resumed run: not logged twice

    def add(self, trainer, metrics: dict[str, float], step: int) -> None:
        if trainer.logger is None:
            return
        now = int(time.time() * 1000)
        self.pending += [(key, float(value), step, now) for key, value in metrics.items() if (key, step) not in self.logged]
        if time.monotonic() - self._last_flush > self.FLUSH_SECONDS:
            self.flush(trainer)

    def flush(self, trainer) -> None:
        self._last_flush = time.monotonic()
        if not self.pending or trainer.logger is None:
            return
        from mlflow.entities import Metric

        pending, self.pending = self.pending, []
        logger = trainer.logger
        for start in range(0, len(pending), 1000):  # MLflow's limit per batch
            logger.experiment.log_batch(logger.run_id, metrics=[Metric(k, v, ts, step) for k, v, step, ts in
                                                                 pending[start : start + 1000]])

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.flush(trainer)

    def on_train_end(self, trainer, pl_module):
        self.flush(trainer)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn != "fit":  # the final validation, after training
            self.flush(trainer)

    def on_exception(self, trainer, pl_module, exception):
        self.flush(trainer)


class Throughput(Callback):
    """Logs ``perf/tokens_per_second`` (and ``perf/mfu`` where the device's peak is known) every
    ``every`` optimizer steps, timing training only (validation and the first step excluded)."""

    def __init__(self, tokens_per_step: int, every: int):
        self.tokens_per_step = tokens_per_step  # over all ranks and micro-batches
        self.every = every
        self.peak = None
        self._t0: float | None = None
        self._step0 = 0
        self.seconds = 0.0  # timed training so far, for the run's mean
        self.steps = 0
        self.last_tokens_per_second = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Mean over all timed steps of this process's run."""
        return self.steps * self.tokens_per_step / self.seconds if self.seconds else 0.0

    def on_train_start(self, trainer, pl_module):
        self.peak = peak_flops(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, now = trainer.global_step, time.perf_counter()
        if self._t0 is None:
            self._t0, self._step0 = now, step
        elif step % self.every == 0 and step > self._step0:
            steps, seconds = step - self._step0, now - self._t0
            self.steps, self.seconds = self.steps + steps, self.seconds + seconds
            tps = steps * self.tokens_per_step / seconds
            self.last_tokens_per_second = tps
            metrics = {"perf/tokens_per_second": tps}
            if self.peak:
                metrics["perf/mfu"] = pl_module.model.flops_per_token() * tps / trainer.world_size / self.peak
            pl_module.record(metrics, step)
            self._t0, self._step0 = now, step

    def on_validation_start(self, trainer, pl_module):
        if self._t0 is not None and trainer.global_step > self._step0:
            self.steps += trainer.global_step - self._step0
            self.seconds += time.perf_counter() - self._t0
        self._t0 = None

    def on_validation_end(self, trainer, pl_module):
        self._t0, self._step0 = time.perf_counter(), trainer.global_step


class ExactResume(Callback):
    """What Lightning does not restore by itself: the random-number generators and the data position.

    The batches are a pure function of the batch index (``lmforge.data``), so continuing at batch
    ``global_step * accumulate_grad_batches`` gives the uninterrupted run's batches. The generator
    states saved at the end of step k are put back just before step k + 1 runs.
    """

    def __init__(self):
        self._pending_rng: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(pl_module.device)
        checkpoint.setdefault("lmforge", {})["rng"] = rng

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        trainer.datamodule.start_batch = int(checkpoint["global_step"]) * trainer.accumulate_grad_batches
        self._pending_rng = checkpoint.get("lmforge", {}).get("rng")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._pending_rng is None:
            return
        rng, self._pending_rng = self._pending_rng, None
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_tuples(rng["python"]))
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], pl_module.device)


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM stopped training at ``step``, after saving a checkpoint."""

    def __init__(self, step: int, signum: int = signal.SIGINT):
        name = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        super().__init__(f"{name} at step {step}")
        self.step = step
        self.signum = signum


class Stopped(KeyboardInterrupt):
    """Training stopped on a signal; the command exits with ``exit_status`` (128 + the signal)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__()
        self.exit_status = 128 + int(signum)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; what schedulers send before a kill


class LastCheckpoint(Checkpoint):
    """Keeps ``last.ckpt``: every ``every`` steps, and at once when Ctrl-C (SIGINT) or SIGTERM
    (SLURM, Kubernetes: pre-emption, the time limit) asks to stop.

    A checkpoint is written at a step boundary, after that step's validation when one is due, so
    that a run resumed from it logs exactly what the uninterrupted run logs. The signal finishes
    the step, saves, and raises TrainingInterrupted; a second one acts at once (the handler before
    ours is back). With several processes the ranks agree (every ``sync_every`` steps) on when to
    stop. Ours replaces Lightning's SIGTERM handler for the fit, which would stop without a save.
    """

    def __init__(self, path: Path, every: int, eval_interval: int, sync_every: int):
        self.path = path
        self.every = every
        self.eval_interval = eval_interval
        self.sync_every = sync_every
        self.requested = False
        self.signum = signal.SIGINT
        self._stop_at: int | None = None
        self._previous: dict = {}

    def _request(self, signum, frame):
        self.requested, self.signum = True, signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def on_train_start(self, trainer, pl_module):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._request) for s in STOP_SIGNALS}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.mid_step:
            return
        step = trainer.global_step
        stop = self.requested
        if trainer.world_size > 1:
            stop = step % self.sync_every == 0 and trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._stop_at = step
        if step % self.eval_interval != 0:  # otherwise on_validation_end saves, after the validation
            self._save(trainer, step)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save(trainer, trainer.global_step)

    def _save(self, trainer, step: int) -> None:
        if step % self.every == 0 or self._stop_at == step:
            trainer.save_checkpoint(self.path, weights_only=False)
        if self._stop_at == step:
            raise TrainingInterrupted(step, self.signum)

    def on_train_end(self, trainer, pl_module):
        self._restore_handler()

    def on_exception(self, trainer, pl_module, exception):
        self._restore_handler()

    def _restore_handler(self):
        if self._previous and threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous = {}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file and renames it into place: a process killed while
    saving leaves the previous checkpoint whole."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        from lmforge.outputs import atomic_path

        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


# ---------------------------------------------------------------------------------------------
# Configuration checks and resuming
# ---------------------------------------------------------------------------------------------


def model_config_for(cfg, vocab_size: int) -> dict:
    """The GPT config dict: ``cfg.model`` plus the vocabulary size of the token files."""
    config = OmegaConf.to_container(cfg.model, resolve=True)
    config["vocab_size"] = int(vocab_size)
    try:
        GPTConfig.from_dict(config).validate()
    except ValueError as err:
        raise LmforgeError(str(err)) from None
    return config


def check_training_config(cfg) -> None:
    """LmforgeError naming the first training setting out of range (before anything is built)."""
    t, opt, trainer = cfg.train, cfg.optimizer, cfg.trainer
    choices = (("trainer.precision", str(trainer.precision), PRECISIONS), ("train.resume", t.resume, RESUME),
               ("optimizer.schedule", opt.schedule, SCHEDULES), ("optimizer.name", opt.name, OPTIMIZERS))
    for key, value, valid in choices:
        if value not in valid:
            raise LmforgeError(f"{key}='{value}' is not one of {', '.join(valid)}; set it in conf/ or override it.")
    for key in ("max_steps", "batch_size", "eval_interval", "eval_iters", "log_every", "checkpoint_every"):
        if not isinstance(t[key], int) or isinstance(t[key], bool) or t[key] < 1:
            raise LmforgeError(f"train.{key}={t[key]!r} must be a positive integer.")
    if t.early_stopping_patience is not None and (not isinstance(t.early_stopping_patience, int) or t.early_stopping_patience < 1):
        raise LmforgeError(f"train.early_stopping_patience={t.early_stopping_patience!r} must be a positive integer or null.")
    if isinstance(trainer.devices, int) and trainer.devices > 0:  # else checked once Lightning knows the devices
        accumulation_steps(t.global_batch_tokens, int(t.batch_size), int(cfg.model.block_size),
                           trainer.devices * int(trainer.num_nodes))
    if opt.name == "muon" and "fsdp" in str(trainer.strategy):
        raise LmforgeError("optimizer=muon needs whole weight matrices, which trainer.strategy=fsdp shards; "
                           "use optimizer=adamw with FSDP, or trainer=ddp.")


def config_fingerprint(cfg, index: dict) -> str:
    """A hash of everything that decides the training trajectory: seed, model, optimizer, training
    settings (but ``train.resume`` and ``checkpoint_every``) and the token files. Checkpoints resume only into a run with
    the same fingerprint; the hardware (``trainer``) may change between the two."""
    train_cfg = {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items()
                 if k not in ("resume", "checkpoint_every")}
    identity = {
        "seed": cfg.seed,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "train": train_cfg,
        "tokens": {"tokenizer_sha256": index.get("tokenizer_sha256"), "vocab_size": index["vocab_size"],
                   "splits": {s: v["tokens"] for s, v in index["splits"].items()}},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def find_resume_point(checkpoints: Path, resume: str, fingerprint: str) -> tuple[Path | None, dict | None]:
    """For ``train.resume=auto``: the checkpoint to continue from and the run record of ``run.json``.

    Returns (None, None) when starting afresh: resume=never, no ``run.json``, or one written by a
    run of another configuration. The run record comes without a checkpoint when a run of this
    configuration was killed before its first save: it restarts from step 0 in the same MLflow run.
    """
    run_file = checkpoints / RUN_FILE
    if resume != "auto" or not run_file.is_file():
        return None, None
    try:
        record = json.loads(run_file.read_text())
    except json.JSONDecodeError:
        return None, None
    if record.get("fingerprint") != fingerprint:
        print(f"resume=auto: {checkpoints} holds a run of another configuration; starting a new run")
        return None, None
    last = checkpoints / LAST_CHECKPOINT
    return (last if last.is_file() else None), record


def logged_metric_steps(logger) -> set[tuple[str, int]]:
    """The (metric, step) pairs a resumed MLflow run already holds. Steps after the last
    checkpoint may have been logged before the interruption (a flush, a kill): the resumed run
    skips them, so MLflow keeps each step once (the first value, on a CPU equal to the new one)."""
    client = logger.experiment
    keys = client.get_run(logger.run_id).data.metrics
    return {(key, m.step) for key in keys for m in client.get_metric_history(logger.run_id, key)}


def clear_checkpoints(checkpoints: Path) -> None:
    """Remove what a previous run left in ``checkpoints`` (ours only: *.ckpt, run.json, temporaries)."""
    if not checkpoints.is_dir():
        return
    for path in checkpoints.iterdir():
        if path.suffix == ".ckpt" or path.name == RUN_FILE or ".tmp-" in path.name:
            path.unlink()


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _curves_writer(history: dict):
    def write(model_dir: Path) -> None:
        import csv

        out = model_dir / "curves"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train_loss.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "train_loss", "lr"])
            w.writerows(history["train"])
        with open(out / "val_loss.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "val_loss"])
            w.writerows(history["val"])

    return write


def _quiet_lightning() -> None:
    import logging
    import warnings

    # Lightning advertises its cloud logger on every run; we log to MLflow.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.getMessage()).startswith("💡 Tip")
    )
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # Our iterable data has no length and infinite epochs, by design.
    warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__` defined.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")


def _strategy(trainer_cfg):
    if trainer_cfg.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        # One FSDP unit per transformer block: parameters are gathered a block at a time.
        return FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy=trainer_cfg.fsdp_sharding,
                            state_dict_type="full")
    return trainer_cfg.strategy


def train(cfg, callbacks: list[Callback] | tuple = ()) -> Path:
    """Run the train stage for config ``cfg``; return the model directory it wrote.

    ``callbacks``: extra Lightning callbacks (tests and experiments hook in here). Raises
    LmforgeError for a bad setting or a non-finite loss (the MLflow run is then FAILED) and
    ``Stopped`` (a KeyboardInterrupt) after Ctrl-C or SIGTERM has saved a checkpoint (the run is
    then KILLED).
    """
    _quiet_lightning()
    from lightning.pytorch.utilities import rank_zero_only

    from lmforge import lineage, tracking
    from lmforge.config import flat_params
    from lmforge.data import TokenDataModule
    from lmforge.modeldir import save_model_dir
    from lmforge.outputs import write_json
    from lmforge.shards import read_index

    t = cfg.train
    check_training_config(cfg)
    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    torch.set_float32_matmul_precision(cfg.trainer.float32_matmul_precision)
    from lmforge.hardware import training_choices  # trainer.precision=auto and Muon's dtype, for this machine

    choices = training_choices(str(cfg.trainer.precision), str(cfg.trainer.accelerator))
    rank_zero_only(print)(", ".join(f"{k.removeprefix('hardware.')} {v}" for k, v in choices.items()))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    index = read_index(cfg.paths.tokens)
    model_config = model_config_for(cfg, index["vocab_size"])
    block_size = int(cfg.model.block_size)
    datamodule = TokenDataModule(cfg.paths.tokens, block_size, int(t.batch_size), int(cfg.seed), int(t.eval_iters))
    datamodule.setup()  # fail on a too-short split before anything is created
    lit = LitGPT(model_config, OmegaConf.to_container(cfg.optimizer, resolve=True), int(t.max_steps), int(t.log_every))
    if t.init_from:  # start from a model directory's weights (issue 5); its architecture must be cfg.model's
        from lmforge.modeldir import init_from_model_dir
        init_from_model_dir(lit.model, t.init_from, Path(cfg.paths.vocab) / "tokenizer.json")
    n_params, flops = lit.model.num_params(), lit.model.flops_per_token()
    rank_zero_only(print)(f"model: {n_params / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOP per token (training)")

    checkpoints = Path(cfg.paths.checkpoints)
    fingerprint = config_fingerprint(cfg, index)
    ckpt_path, record = find_resume_point(checkpoints, t.resume, fingerprint)
    # In a sweep, the DVC experiment name is what `dvc exp show` lists: the same name in the UI.
    run_name = cfg.tracking.run_name or lineage.dvc_experiment() or f"{Path(cfg.paths.model).name}-{cfg.tokenizer.kind}"
    # The interrupted run continues in its MLflow run, unless that run lives in another store now.
    same_store = record is not None and record.get("tracking_uri") == tracking.resolve_uri(cfg.tracking.uri)
    logger = False  # only rank 0 talks to MLflow and writes files
    if rank_zero_only.rank == 0:
        logger = tracking.make_logger(cfg.tracking, run_name, run_id=record["run_id"] if same_store else None,
                                      tags=lineage.run_tags(cfg))
        run = {"tracking_uri": logger._tracking_uri, "experiment_id": logger.experiment_id, "run_id": logger.run_id}
        if not same_store:
            if record is None:
                clear_checkpoints(checkpoints)  # before run.json names the new run: see find_resume_point
            logger.log_hyperparams({**flat_params(cfg), **choices})
            logger.log_metrics({"model/parameters": n_params, "model/flops_per_token": flops}, step=0)
            # Issue 3: the corpus and vocabulary counts (prepare's and vocab's DVC metrics) on this run too.
            from lmforge.corpus import reported_counts
            logger.log_metrics(reported_counts(cfg.paths.reports), step=0)
            write_json(checkpoints / RUN_FILE, {**run, "fingerprint": fingerprint})
        else:
            tracking.set_run_status(run, "RUNNING")
            lit.metrics_log.logged = logged_metric_steps(logger)
        if record is not None:
            print(f"resuming from {ckpt_path or 'step 0'} in MLflow run {run['run_id']}")

    all_callbacks = [ExactResume(), *callbacks]
    if t.early_stopping_patience:
        all_callbacks.append(EarlyStopping(monitor="val/loss", mode="min", patience=int(t.early_stopping_patience)))
    # Checkpoint callbacks run last (Lightning moves them there), in this order: last.ckpt then
    # holds the other callbacks' state after this step.
    all_callbacks += [
        ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                        auto_insert_metric_name=False, enable_version_counter=False),
        LastCheckpoint(checkpoints / LAST_CHECKPOINT, int(t.checkpoint_every), int(t.eval_interval), int(t.log_every)),
    ]
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=int(cfg.trainer.num_nodes),
        strategy=_strategy(cfg.trainer),
        precision=choices["hardware.precision"],
        max_steps=int(t.max_steps),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        gradient_clip_val=float(t.grad_clip) if t.grad_clip else None,
        deterministic=bool(cfg.trainer.deterministic),
        logger=logger,
        callbacks=all_callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=_show_progress(),
        enable_model_summary=False,
        enable_autolog_hparams=False,  # the whole config is logged above, once
    )
    # The world size is known only once Lightning has resolved the devices; both settings are
    # read when fitting starts. val_check_interval counts micro-batches, not optimizer steps.
    accumulate = accumulation_steps(t.global_batch_tokens, int(t.batch_size), block_size, trainer.world_size)
    trainer.accumulate_grad_batches = accumulate
    trainer.val_check_interval = int(t.eval_interval) * accumulate
    tokens_per_step = int(t.batch_size) * block_size * accumulate * trainer.world_size
    throughput = Throughput(tokens_per_step, int(t.log_every))
    trainer.callbacks.append(throughput)
    if not _show_progress():  # no bar: plain progress lines (make run > log, queued experiments, CI)
        from lmforge.progress import ProgressLines
        trainer.callbacks.append(ProgressLines(int(t.max_steps), tokens_per_step))
    if accumulate > 1:
        rank_zero_only(print)(f"global batch: {tokens_per_step} tokens per step ({accumulate} micro-batches per device)")
    if cfg.trainer.compile:
        # In place, so parameter names (and checkpoints) stay the eager model's. Under FSDP each
        # block, a unit of sharding, is compiled on its own (as torchtitan does).
        for module in lit.model.transformer.h if cfg.trainer.strategy == "fsdp" else [lit.model]:
            module.compile()

    try:
        trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except NonFiniteLoss as err:
        last = checkpoints / LAST_CHECKPOINT
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was saved before it"
        raise LmforgeError(f"{err}, so training stopped and the MLflow run is marked FAILED; {kept}. "
                           "Lower optimizer.lr (or raise optimizer.warmup_steps) and train again.") from None
    except TrainingInterrupted as err:
        if rank_zero_only.rank == 0:
            tracking.set_run_status(run, "KILLED")
            print(f"{err}: saved {checkpoints / LAST_CHECKPOINT}; run again with train.resume=auto to continue",
                  flush=True)
        raise Stopped(err.signum) from None
    except (KeyboardInterrupt, SystemExit) as err:  # Lightning: Ctrl-C is sys.exit(1), a 2nd SIGTERM SIGTERMException
        if rank_zero_only.rank == 0:
            tracking.set_run_status(run, "KILLED")
        raise Stopped(signal.SIGTERM if type(err).__name__ == "SIGTERMException" else signal.SIGINT) from None
    trainer.save_checkpoint(checkpoints / LAST_CHECKPOINT, weights_only=False)  # the finished state (resume=auto then only exports)
    # The last validation may fall before the last step: score the final weights too.
    if trainer.global_step % int(t.eval_interval) != 0:
        trainer.validate(lit, datamodule=datamodule, verbose=False)
    state = trainer.strategy.lightning_module_state_dict()  # whole weights, also from FSDP shards (all ranks)

    out = Path(cfg.paths.model)
    if trainer.global_rank == 0:
        model = GPT(GPTConfig.from_dict(model_config))
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})  # as float32
        tokenizer_meta = {"kind": cfg.tokenizer.kind, "eot_token": cfg.tokenizer.eot_token, "eot_id": index["eot_id"],
                          "sha256": index["tokenizer_sha256"]}
        training = {"steps": trainer.global_step, "tokens": trainer.global_step * tokens_per_step,
                    "tokens_per_second": throughput.tokens_per_second}
        save_model_dir(out, model, Path(cfg.paths.vocab) / "tokenizer.json", tokenizer_meta, train_cfg=cfg,
                       run=run, extra={"training": training}, write_more=_curves_writer(lit.history))
        if cfg.tracking.log_model:
            tracking.log_to_run(run, artifact_dirs={"model": out})
            from lmforge.serving import log_pyfunc_model  # servable and registered as an MLflow pyfunc (issue 5)
            log_pyfunc_model(out, run, cfg.tracking.registered_model)
    return out


def _show_progress() -> bool:
    import os
    import sys

    return sys.stderr.isatty() and not os.environ.get("CI")
