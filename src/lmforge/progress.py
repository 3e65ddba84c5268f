"""Training progress as plain lines, for when nobody watches a terminal.

``make run > log``, a queued ``dvc exp`` and CI get no progress bar (Lightning's bar is for
terminals: ``lmforge.training`` keeps it there). ``ProgressLines`` writes one line to stderr every
``every_seconds`` and after each validation instead:

    step 750/2000 (38%)  train loss 1.6012  val loss 1.6403  14,210 tokens/s  elapsed 1m02s  ETA 1m43s

The rate and the ETA count wall time since training started (validation included), so the ETA
is when the run will end. The train loss is the last one the module logged (no extra host sync).
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import Callback


def duration(seconds: float) -> str:
    """``seconds`` as ``45s``, ``3m07s`` or ``1h02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLines(Callback):
    """A progress line on ``stream`` (stderr) every ``every_seconds`` and after each validation:
    step/max_steps, last train and val loss, tokens/s, elapsed time and ETA. Rank 0 only."""

    EVERY_SECONDS = 30.0

    def __init__(self, max_steps: int, tokens_per_step: int, every_seconds: float | None = None, stream=None):
        self.max_steps = max_steps
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
                 f"{rate * self.tokens_per_step:,.0f} tokens/s",
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
