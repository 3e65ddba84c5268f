"""Stage 5, evaluate: loss, perplexity and bits per byte on held-out text, samples, and plots.

The loss is over the whole validation split, cut into consecutive windows of ``block_size``
tokens (each token predicted once). Bits per byte divides the total nats by ln 2 and by the
UTF-8 bytes of the text those tokens encode, so models with different tokenizers compare.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.outputs import atomic_path, write_json, write_text


@torch.no_grad()
def score_tokens(model, ids: np.ndarray | object, block_size: int, batch_size: int = 64,
                 max_batches: int | None = None, device: str | torch.device = "cpu") -> dict:
    """Sum the next-token loss over ``ids`` (an array or a TokenStream) in non-overlapping windows.

    Returns ``{"nats": total, "predicted": tokens scored, "tokens": len(ids)}``.
    """
    n = len(ids)
    if n < 2:
        raise LmforgeError("the evaluation text has fewer than 2 tokens; give it more text.")
    read = ids.read if hasattr(ids, "read") else (
        lambda start, length: np.asarray(ids[start : start + length], dtype=np.int64))
    starts = list(range(0, n - 1, block_size))
    if max_batches:
        starts = starts[: max_batches * batch_size]
    total, predicted = 0.0, 0
    model.eval()
    for b in range(0, len(starts), batch_size):
        chunk = starts[b : b + batch_size]
        lengths = [min(block_size, n - 1 - s) for s in chunk]
        x = torch.full((len(chunk), block_size), 0, dtype=torch.long)
        y = torch.full((len(chunk), block_size), -100, dtype=torch.long)
        for row, (s, length) in enumerate(zip(chunk, lengths)):
            window = torch.from_numpy(read(s, length + 1))
            x[row, :length] = window[:-1]
            y[row, :length] = window[1:]
        logits, _ = model(x.to(device))
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.to(device).view(-1),
                               ignore_index=-100, reduction="sum")
        total += float(loss)
        predicted += sum(lengths)
    return {"nats": total, "predicted": predicted, "tokens": n}


def summarise(score: dict, text_bytes: int) -> dict:
    """Loss, perplexity and bits per byte from a ``score_tokens`` result and the text's byte count."""
    loss = score["nats"] / score["predicted"]
    # Scale the bytes to the tokens actually predicted (all but the first, or a capped subset).
    covered_bytes = text_bytes * score["predicted"] / max(1, score["tokens"] - 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": score["nats"] / math.log(2) / covered_bytes,
        "tokens": score["tokens"],
        "bytes": text_bytes,
    }


def evaluate_text(loaded, sources: list[str], data_cfg=None, batch_size: int | None = None,
                  max_batches: int | None = None) -> dict:
    """Loss, perplexity and bits per byte of a loaded model on the text of ``sources``.

    sources: files, directories or globs (any format the prepare stage reads: text, JSONL,
    Parquet, compressed or not), read and cleaned as ``lmforge.corpus`` reads a corpus, with the
    ``data`` settings ``data_cfg``; None takes those the model was trained with
    (``train_config.yaml``), else ``PLAIN_TEXT`` (UTF-8 text). Documents are joined with the
    end-of-text token, as the tokenize stage does, and scored by ``score_tokens`` and
    ``summarise``, the code of the evaluate stage. Returns ``summarise``'s metrics plus
    ``files``, ``documents`` and ``unknown_tokens`` (text the tokenizer mapped to ``<unk>``).
    """
    from lmforge.corpus import CorpusStats, file_format, read_sources, resolve_sources, warn
    from lmforge.corpus.cleaning import check_normal_form
    from lmforge.corpus.reading import ReadOptions
    from lmforge.tokenizer import UNK_TOKEN, Encoder

    data_cfg = data_cfg if data_cfg is not None else _data_settings(loaded)
    files = resolve_sources(sources)
    formats = [file_format(path, str(data_cfg.format)) for path in files]
    sink = _EncodedDocuments(Encoder(loaded.tokenizer), loaded.eot_id, check_normal_form(data_cfg.normalize))
    read_sources(sink, files, formats, ReadOptions(data_cfg, warn), CorpusStats(files=len(files)), lambda n: None)
    arrays, counts = sink.arrays, {"documents": sink.documents, "bytes": sink.bytes}
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    if len(ids) < 2:
        raise LmforgeError(f"{', '.join(map(str, sources))} holds fewer than 2 tokens of text; "
                           "give the evaluation more text.")
    block_size = loaded.model.config.block_size
    batching = {"batch_size": batch_size} if batch_size else {}
    score = score_tokens(loaded.model, ids, block_size, max_batches=max_batches, **batching)
    unk = loaded.tokenizer.token_to_id(UNK_TOKEN)
    metrics = summarise(score, counts["bytes"])
    metrics.update(files=len(files), documents=counts["documents"],
                   unknown_tokens=int((ids == unk).sum()) if unk is not None else 0)
    return metrics


class _EncodedDocuments:
    """The sink of ``corpus.read_sources`` for ``evaluate_text``: each cleaned, non-empty document
    encoded, documents joined with the end-of-text id as the tokenize stage joins them."""

    def __init__(self, encoder, eot_id: int, form: str | None):
        from lmforge.corpus import clean_pieces

        self.encoder, self.form, self.clean_pieces = encoder, form, clean_pieces
        self.eot = np.array([eot_id], dtype=np.int64)
        self.arrays: list[np.ndarray] = []
        self.documents = self.bytes = 0

    def take(self, document) -> None:
        ids, size = [], 0
        for text, data, _ in self.clean_pieces(document, self.form):  # a long one comes in pieces cut after line ends
            if text:
                ids.append(self.encoder.encode(text))
                size += len(data)
        if size:
            self.arrays.extend([self.eot, *ids] if self.documents else ids)
            self.documents += 1
            self.bytes += size

    def abort(self) -> None:
        """Nothing to undo: a document is kept only once it has been read whole."""


# How text is read for a model that carries no training config (an imported one): plain UTF-8,
# the format by extension, NFC as the prepare stage's default, nothing skipped.
PLAIN_TEXT = {"format": "auto", "text_field": "text", "column": "text", "decode_errors": "strict",
              "skip_bad_files": False, "normalize": "NFC"}


def _data_settings(loaded):
    # How the text is read and cleaned: as the model's training corpus was, else as plain UTF-8 text.
    train_cfg = loaded.train_config()
    if train_cfg is not None and "data" in train_cfg:
        return train_cfg.data
    from omegaconf import OmegaConf

    return OmegaConf.create(PLAIN_TEXT)


def log_text_metrics(loaded, metrics: dict, name: str, tracking_uri: str | None = None,
                     experiment: str | None = None) -> dict:
    """Log ``evaluate_text`` metrics to MLflow as ``eval/<name>/<metric>``; return the run.

    Onto the model's training run (its ``run.json``) when it has one, else onto a new run named
    ``evaluate-<model directory>`` in ``experiment`` on ``tracking_uri``.
    """
    from lmforge import tracking

    run = loaded.run()
    if run is None:
        from lmforge.modeldir import default_tracking_uri

        uri = tracking.resolve_uri(tracking_uri) if tracking_uri else default_tracking_uri()
        if experiment is None:
            if not Path("params.yaml").is_file():
                raise LmforgeError("the model has no MLflow run (no run.json); pass --experiment NAME for a new run.")
            from lmforge.config import load_config

            experiment = load_config().tracking.experiment
        tracking.check_reachable(uri)
        tracking.quiet_mlflow_env()
        from mlflow.tracking import MlflowClient

        experiment_id = tracking.ensure_experiment(uri, experiment)
        created = MlflowClient(tracking_uri=uri).create_run(experiment_id, run_name=f"evaluate-{loaded.path.name}")
        MlflowClient(tracking_uri=uri).set_terminated(created.info.run_id)
        run = {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": created.info.run_id}
    tracking.log_to_run(run, metrics={f"eval/{name}/{k}": v for k, v in metrics.items()})
    return run


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
    from lmforge.generation import complete

    try:
        return complete(loaded, prompt, sampling)
    except LmforgeError as err:  # a prompt this corpus cannot encode should not fail the stage
        return f"\n[no sample: {err}]"


def evaluate(cfg) -> dict:
    """Run the evaluate stage for ``cfg``: metrics.json, plots, samples, report.md; logged to the training run."""
    from lmforge import tracking
    from lmforge.generation import SamplingConfig
    from lmforge.modeldir import load_model_dir
    from lmforge.report import write_report
    from lmforge.shards import TokenStream

    loaded = load_model_dir(cfg.paths.model)
    ev = cfg.evaluate
    block_size = loaded.model.config.block_size
    val = TokenStream(cfg.paths.tokens, "val")
    if len(val) <= block_size:
        raise LmforgeError(
            f"the validation split has {len(val)} tokens, not more than model.block_size={block_size}; "
            "lower model.block_size or raise data.val_fraction."
        )
    score = score_tokens(loaded.model, val, block_size, int(ev.batch_size), ev.max_batches)
    metrics = {f"val_{k}" if k in ("loss", "perplexity") else k: v
               for k, v in summarise(score, val.index["splits"]["val"]["bytes"]).items()}
    metrics = {"val_loss": metrics["val_loss"], "val_perplexity": metrics["val_perplexity"],
               "val_bits_per_byte": metrics["bits_per_byte"], "val_tokens": metrics["tokens"],
               "val_bytes": metrics["bytes"]}
    training = loaded.config.get("training", {})
    if training.get("tokens_per_second"):
        metrics["train_tokens_per_second"] = training["tokens_per_second"]

    sampling = SamplingConfig(max_new_tokens=int(ev.max_new_tokens), temperature=float(ev.temperature),
                              top_k=ev.top_k, top_p=ev.top_p, seed=int(ev.seed))
    samples = [(p, _sample(loaded, p, sampling)) for p in ev.prompts]

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
