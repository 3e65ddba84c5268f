"""``lmforge evaluate --model DIR --data FILE...``: any text scored by a model directory.

The text is read and cleaned as the model's training corpus was (``lmforge.corpus``), encoded with
the model's tokenizer, and scored as the evaluate stage scores its validation split. Bits per byte
divide by the UTF-8 bytes of the text after cleaning (CRLF and CR -> LF, no byte-order mark or
control characters, Unicode normal form), which ``describe_metrics`` says beside the bytes before
cleaning and the files' own size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.evaluation.metrics import score_tokens, summarise


def evaluate_text(loaded, sources: list[str], data_cfg=None, batch_size: int | None = None,
                  max_batches: int | None = None) -> dict:
    """Loss, perplexity and bits per byte of a loaded model on the text of ``sources``.

    sources: files, directories or globs (any format the prepare stage reads: text, JSONL,
    Parquet, compressed or not), read and cleaned as ``lmforge.corpus`` reads a corpus, with the
    ``data`` settings ``data_cfg``; None takes those the model was trained with
    (``train_config.yaml``), else ``PLAIN_TEXT`` (UTF-8 text). Documents are joined with the
    end-of-text token, as the tokenize stage does, and scored by ``score_tokens`` and
    ``summarise``, the code of the evaluate stage. Returns ``summarise``'s metrics (``bytes``: after
    cleaning) plus ``bytes_before_cleaning`` (the text as read), ``file_bytes`` (the files' size),
    ``files``, ``documents`` and ``unknown_tokens`` (text the tokenizer mapped to ``<unk>``).
    """
    from lmforge.corpus.cleaning import check_normal_form
    from lmforge.corpus.documents import CorpusStats, read_sources, warn
    from lmforge.corpus.reading import ReadOptions
    from lmforge.corpus.sources import file_format, resolve_sources
    from lmforge.tokenization.tokenizer import UNK_TOKEN, Encoder

    data_cfg = data_cfg if data_cfg is not None else _data_settings(loaded)
    try:
        files = resolve_sources(sources)
    except LmforgeError as err:  # its sentences name the entries' origin data.sources: here it is --data
        raise LmforgeError(str(err).replace("data.sources", "--data")) from None
    formats = [file_format(path, str(data_cfg.format)) for path in files]
    sink = _EncodedDocuments(Encoder(loaded.tokenizer), loaded.eot_id, check_normal_form(data_cfg.normalize))
    read_sources(sink, files, formats, ReadOptions(data_cfg, warn), CorpusStats(files=len(files)), lambda n: None)
    arrays = sink.arrays
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    if len(ids) < 2:
        raise LmforgeError(f"{', '.join(map(str, sources))} holds fewer than 2 tokens of text; "
                           "give the evaluation more text.")
    block_size = loaded.model.config.block_size
    batching = {"batch_size": batch_size} if batch_size else {}
    score = score_tokens(loaded.model, ids, block_size, max_batches=max_batches, **batching)
    unk = loaded.tokenizer.token_to_id(UNK_TOKEN)
    metrics = summarise(score, sink.bytes)
    metrics.update(bytes_before_cleaning=sink.bytes_read, file_bytes=sum(path.stat().st_size for path in files),
                   files=len(files), documents=sink.documents,
                   unknown_tokens=int((ids == unk).sum()) if unk is not None else 0)
    return metrics


def describe_metrics(model: str, metrics: dict) -> str:
    """``evaluate_text``'s metrics as the lines ``lmforge evaluate --data`` prints."""
    scored, total = metrics["tokens_scored"], metrics["tokens"]
    # Every token but the first (context only) is scored, unless --max-batches stopped earlier.
    tokens = f"{total:,} (all scored)" if scored >= total - 1 else f"{scored:,} scored of {total:,} (--max-batches)"
    lines = [f"{model} on {metrics['files']} file(s), {metrics['documents']} document(s):",
             f"  {'loss':15} {metrics['loss']:.4f}",
             f"  {'perplexity':15} {metrics['perplexity']:.4f}",
             f"  {'bits_per_byte':15} {metrics['bits_per_byte']:.4f}  (per byte of the text after cleaning)",
             f"  {'tokens':15} {tokens}",
             f"  {'bytes':15} {metrics['bytes']:,} after cleaning (CRLF -> LF, no BOM or control characters, "
             f"normal form); {metrics['bytes_before_cleaning']:,} before; the files hold {metrics['file_bytes']:,}",
             f"  {'unknown_tokens':15} {metrics['unknown_tokens']}"]
    return "\n".join(lines)


class _EncodedDocuments:
    """The sink of ``corpus.read_sources`` for ``evaluate_text``: each cleaned, non-empty document
    encoded, documents joined with the end-of-text id as the tokenize stage joins them."""

    def __init__(self, encoder, eot_id: int, form: str | None):
        from lmforge.corpus.documents import clean_pieces

        self.encoder, self.form, self.clean_pieces = encoder, form, clean_pieces
        self.eot = np.array([eot_id], dtype=np.int64)
        self.arrays: list[np.ndarray] = []
        self.documents = self.bytes = self.bytes_read = 0

    def take(self, document) -> None:
        ids, size, read = [], 0, 0
        for text, data, size_in in self.clean_pieces(document, self.form):  # a long one comes in pieces
            read += size_in
            if text:
                ids.append(self.encoder.encode(text))
                size += len(data)
        self.bytes_read += read
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
    from lmforge.tracking import runs as tracking

    run = loaded.run()
    if run is None:
        from lmforge.tracking.runs import default_tracking_uri

        uri = tracking.resolve_uri(tracking_uri) if tracking_uri else default_tracking_uri()
        if experiment is None:
            if not Path("params.yaml").is_file():
                raise LmforgeError("the model has no MLflow run (no run.json); pass --experiment NAME for a new run.")
            from lmforge.config.compose import load_config

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
