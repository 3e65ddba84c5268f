"""Lightning callbacks of the train stage: throughput and MFU, exact resume (random generators
and data position), ``last.ckpt`` with Ctrl-C/SIGTERM handling, and atomic checkpoint writes.

They decide when to save and what goes into a checkpoint; which checkpoint a run resumes from is
``lmforge.training.resume``'s concern.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.plugins import TorchCheckpointIO

from lmforge.outputs import duration
from lmforge.training.hardware import peak_flops


class FlushMetrics(Callback):
    """Sends the batched metrics (``tracking.MetricsLog``) before every checkpoint is written, so
    a resumed run misses no step, after the final validation, and when training ends or fails."""

    def __init__(self, metrics_log):
        self.metrics_log = metrics_log

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.metrics_log.flush()

    def on_train_end(self, trainer, pl_module):
        self.metrics_log.flush()

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn != "fit":  # the final validation, after training
            self.metrics_log.flush()

    def on_exception(self, trainer, pl_module, exception):
        self.metrics_log.flush()


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
                metrics["perf/mfu"] = pl_module.model.estimate_mfu(tps / trainer.world_size, self.peak)
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

    The batches are a pure function of the batch index (``lmforge.training.data``), so continuing at batch
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


class ProgressLines(Callback):
    """A progress line on ``stream`` (stderr) every ``every_seconds`` and after each validation:
    step/max_steps, last train and val loss, tokens/s (and the torch threads making them, when
    ``threads`` is given), elapsed time and ETA, for runs nobody watches
    on a terminal (``lmforge.outputs``). The rate and ETA count wall time since training started
    (validation included). Rank 0 only."""

    EVERY_SECONDS = 30.0

    def __init__(self, max_steps: int, tokens_per_step: int, every_seconds: float | None = None, stream=None,
                 threads: int | None = None):
        self.max_steps = max_steps
        self.threads = threads
        self.tokens_per_step = tokens_per_step
        self.every_seconds = self.EVERY_SECONDS if every_seconds is None else every_seconds
        self.stream = stream
        self._start: float | None = None
        self._start_step = 0
        self._last_line = 0.0

    def on_train_start(self, trainer, pl_module):
        self._start = self._last_line = time.monotonic()
        self._start_step = trainer.global_step  # a resumed run counts its rate from here

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if time.monotonic() - self._last_line >= self.every_seconds and not pl_module.mid_step:
            self.write(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and self._start is not None:
            self.write(trainer, pl_module)

    def line(self, step: int, train_loss: float | None, val_loss: float | None, elapsed: float) -> str:
        """The progress line at optimizer step ``step``, ``elapsed`` seconds after training started."""
        done = step - self._start_step
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        parts = [f"step {step}/{self.max_steps} ({100 * step / self.max_steps:.0f}%)",
                 f"train loss {train_loss:.4f}" if train_loss is not None else "train loss -",
                 f"val loss {val_loss:.4f}" if val_loss is not None else "val loss -",
                 f"{rate * self.tokens_per_step:,.0f} tokens/s"
                 + (f" ({self.threads} thread{'s' if self.threads != 1 else ''})" if self.threads else ""),
                 f"elapsed {duration(elapsed)}",
                 f"ETA {duration((self.max_steps - step) / rate)}" if rate else "ETA -"]
        return "  ".join(parts)

    def write(self, trainer, pl_module) -> None:
        """Write the current progress line (rank 0 only)."""
        self._last_line = time.monotonic()
        if not trainer.is_global_zero:
            return
        history = pl_module.history
        train_loss = history["train"][-1][1] if history["train"] else None
        val_loss = history["val"][-1][1] if history["val"] else None
        stream = self.stream or sys.stderr
        print(self.line(trainer.global_step, train_loss, val_loss, self._last_line - self._start), file=stream,
              flush=True)
