"""The evaluate stage's report: one short Markdown page per model (``reports/report.md``).

What the model is, its metrics as a table, the loss and learning-rate plots as images, and the
samples. It is also logged to the training run in MLflow, so the run carries its own summary.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from lmforge.outputs import write_text

# How each metric reads in the table; a metric not listed keeps its key.
METRIC_LABELS = {
    "val_loss": "validation loss (nats/token)",
    "val_perplexity": "validation perplexity",
    "val_bits_per_byte": "validation bits per byte",
    "val_tokens": "validation tokens",
    "val_tokens_scored": "validation tokens scored",
    "val_bytes": "validation bytes (UTF-8, after cleaning)",
    "train_tokens_per_second": "training tokens per second",
}


# Beside the figure: which bytes bits per byte count.
BYTES_NOTE = ("Bits per byte divide by the UTF-8 bytes of the validation text after the prepare stage's cleaning "
              "(CRLF and CR line ends become LF; byte-order marks and control characters are removed; Unicode "
              "is normalised as data.normalize says), not by the bytes of the corpus files.")


def render_report(model, metrics: dict, plots: Sequence[Path], samples: Sequence[tuple[str, str]],
                  report_dir: Path) -> str:
    """The report as Markdown.

    model: the loaded model directory (``lmforge.model.directory.ModelDir``); metrics: the evaluate
    stage's ``metrics.json``; plots: PNG files, linked relative to ``report_dir``; samples:
    ``(prompt, continuation)`` pairs.
    """
    arch = model.model.config
    training = model.config.get("training", {})
    run = model.run()
    lines = [f"# {model.path.name}: evaluation report", ""]
    about = [f"{arch.n_layer} layers, {arch.n_head} heads, {arch.n_embd} wide, context {arch.block_size}",
             f"{model.model.num_params() / 1e6:.2f}M parameters",
             f"{model.config['tokenizer']['kind']} tokenizer of {arch.vocab_size} tokens"]
    if training.get("steps"):
        about.append(f"trained {training['steps']} steps on {training.get('tokens', 0):,} tokens")
    lines += ["; ".join(about) + ".", ""]
    if run is not None:
        lines += [f"MLflow run `{run['run_id']}` (lineage: `lmforge runs show {run['run_id']}`).", ""]

    lines += ["## Metrics", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {METRIC_LABELS.get(key, key)} | {_number(value)} |" for key, value in metrics.items()]
    lines.append("")
    if "val_bits_per_byte" in metrics:
        lines += [BYTES_NOTE, ""]

    if plots:
        lines += ["## Curves", ""]
        lines += [f"![{plot.stem}]({Path(os.path.relpath(plot, report_dir)).as_posix()})" for plot in plots]
        lines.append("")

    if samples:
        lines += ["## Samples", ""]
        for prompt, continuation in samples:
            fence = _fence(prompt + continuation)
            lines += [f"Prompt `{prompt!r}`:", "", f"{fence}text", f"{prompt}{continuation}", fence, ""]
    return "\n".join(lines)


def write_report(path: str | Path, model, metrics: dict, plots: Sequence[Path],
                 samples: Sequence[tuple[str, str]]) -> Path:
    """Write ``render_report(...)`` to ``path`` atomically; return ``path``."""
    path = Path(path)
    write_text(path, render_report(model, metrics, plots, samples, path.parent))
    return path


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1e6 else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _fence(text: str) -> str:
    # A fence longer than any run of backticks in the sample, so generated text cannot close it.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)
