"""Stage 5, evaluate: the validation split's loss, perplexity and bits per byte, samples, plots, report.

The loss is over the whole validation split, cut into consecutive windows of ``block_size``
tokens (each token predicted once); for chat / prompt_completion records, over the assistant
(completion) tokens of every packed row, and the samples are chat replies. Bits per byte divides
the total nats by ln 2 and by the UTF-8 bytes of the text those tokens encode (after the prepare
stage's cleaning: CRLF -> LF, ...), so models with different tokenizers compare.
The samples start from ``evaluation.prompts``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.evaluation.metrics import score_packed, score_tokens, summarise
from lmforge.evaluation.prompts import stage_prompts
from lmforge.interop.base import base_network
from lmforge.outputs import atomic_path, check_writable, write_json, write_text


def write_plots(curves_dir: Path, plots_dir: Path) -> Path:
    """Copy the training curves to ``plots_dir`` as CSV (DVC plots) and draw ``loss.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = _read_csv(curves_dir / "train_loss.csv")
    val = _read_csv(curves_dir / "val_loss.csv")
    plots_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train_loss.csv", "val_loss.csv"):
        src = curves_dir / name
        if src.is_file():
            write_text(plots_dir / name, src.read_text())
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train", alpha=0.7)
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    if train or val:
        ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    png = plots_dir / "loss.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _sample(loaded, prompt: str, sampling) -> str:
    from lmforge.inference.generation import complete

    try:
        return complete(loaded, prompt, sampling)
    except LmforgeError as err:  # a prompt this corpus cannot encode should not fail the stage
        return f"\n[no sample: {err}]"


def evaluate_stage(cfg) -> dict:
    """Run the evaluate stage for ``cfg``: metrics.json, plots, samples, report.md; logged to the training run."""
    from lmforge.inference.sampling import evaluate_sampling
    from lmforge.model.directory import load_model_dir
    from lmforge.tokenization.shards import TokenStream

    check_writable(("paths.reports", Path(cfg.paths.reports) / "metrics.json"),
                   ("paths.reports", Path(cfg.paths.reports) / "plots" / "loss.png"))
    loaded = load_model_dir(cfg.paths.model)
    ev = cfg.evaluate
    block_size = loaded.model.config.block_size
    val = TokenStream(cfg.paths.tokens, "val")
    if "row_tokens" in val.index:  # chat / prompt_completion records: assistant tokens only
        return _evaluate_records(cfg, loaded, val)
    if len(val) <= block_size:
        raise LmforgeError(
            f"the validation split has {len(val)} tokens, not more than model.block_size={block_size}; "
            "lower model.block_size or raise data.val_fraction."
        )
    def scored(model) -> dict:  # the one scoring of the validation split: the tuned model's and its base's
        score = score_tokens(model, val, block_size, int(ev.batch_size), ev.max_batches)
        return summarise(score, val.index["splits"]["val"]["bytes"])

    summary = scored(loaded.model)
    metrics = {"val_loss": summary["loss"], "val_perplexity": summary["perplexity"],
               "val_bits_per_byte": summary["bits_per_byte"], "val_tokens": summary["tokens"],
               "val_tokens_scored": summary["tokens_scored"], "val_bytes": summary["bytes"]}
    base = base_network(loaded.path, loaded.model.config)  # a fine-tune: its base, on the same tokens beside it
    if base is not None:
        summary = scored(base)
        metrics.update({"base_val_loss": summary["loss"], "base_val_perplexity": summary["perplexity"],
                        "base_val_bits_per_byte": summary["bits_per_byte"]})
    training = loaded.config.get("training", {})
    if training.get("tokens_per_second"):
        metrics["train_tokens_per_second"] = training["tokens_per_second"]

    sampling = evaluate_sampling(cfg)
    samples = [(p, _sample(loaded, p, sampling)) for p in stage_prompts(cfg)]

    return _write_outputs(cfg, loaded, metrics, samples)


def _evaluate_records(cfg, loaded, val) -> dict:
    """The evaluate stage on packed records: the loss over the assistant (completion) tokens of every
    validation row, and samples that are replies to ``evaluate.chat_prompts`` (or the first user turns)."""
    from lmforge.evaluation.prompts import record_prompts
    from lmforge.inference.chat import reply
    from lmforge.inference.sampling import evaluate_sampling
    from lmforge.tokenization.shards import TokenStream

    block_size, row_tokens = loaded.model.config.block_size, int(val.index["row_tokens"])
    if row_tokens - 1 > block_size:  # a fine-tune's rows (model.block_size) may be shorter than its base's context
        raise LmforgeError(f"{cfg.paths.tokens} holds rows of {row_tokens} tokens but {cfg.paths.model} "
                           f"has block_size {block_size}; rerun the tokenize stage (dvc repro tokenize).")
    flags = TokenStream(cfg.paths.tokens, "val", "flag_shards", "uint8")
    ev = cfg.evaluate

    def loss_of(model) -> tuple[float, int]:  # over the assistant tokens: the tuned model's and its base's
        score = score_packed(model, val, flags, row_tokens, int(ev.batch_size), ev.max_batches)
        return score["nats"] / score["predicted"], score["predicted"]

    loss, predicted = loss_of(loaded.model)
    metrics = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)),
               "val_tokens": val.index["splits"]["val"]["loss_tokens"], "val_tokens_scored": predicted}
    base = base_network(loaded.path, loaded.model.config)
    if base is not None:
        base_loss, _ = loss_of(base)
        metrics.update({"base_val_loss": base_loss, "base_val_perplexity": math.exp(min(base_loss, 700.0))})
    sampling = evaluate_sampling(cfg)
    samples = []
    for prompt in record_prompts(cfg, val.index.get("format", "chat")):
        if isinstance(prompt, str):  # prompt_completion: a continuation
            samples.append((prompt, _sample(loaded, prompt, sampling)))
            continue
        try:
            answer = reply(loaded, prompt, sampling)
        except LmforgeError as err:
            answer = f"[no reply: {err}]"
        samples.append((f"user: {prompt[-1]['content']}\nassistant: ", answer))
    return _write_outputs(cfg, loaded, metrics, samples)


def _write_outputs(cfg, loaded, metrics: dict, samples: list) -> dict:
    """samples.md, metrics.json, the plots and report.md; logged to the training run."""
    from lmforge.evaluation.report import write_report
    from lmforge.tracking import runs as tracking

    reports = Path(cfg.paths.reports)
    png = write_plots(loaded.path / "curves", reports / "plots")
    samples_md = "# Samples\n\n" + "".join(
        f"## Prompt {i + 1}: `{p!r}`\n\n```text\n{p}{s}\n```\n\n" for i, (p, s) in enumerate(samples)
    )
    write_text(reports / "samples.md", samples_md)
    write_json(reports / "metrics.json", metrics)
    report = write_report(reports / "report.md", loaded, metrics, [png], samples)

    run = loaded.run()
    if run is not None:
        tracking.log_to_run(run, metrics={f"eval/{k}": v for k, v in metrics.items()},
                            artifacts=[reports / "metrics.json", reports / "samples.md", png, report])
    return metrics
