"""Stage 3, tokenize: encode each prepared split into binary token shards that training memory-maps.

Writes ``paths.tokens`` in the format of ``lmforge.tokenization.shards`` (which owns it, and the reader);
the encoding itself is ``lmforge.tokenization.tokenizer.Encoder``'s. Documents are separated by the
tokenizer's end-of-text token. The stage streams: this process reads a split in chunks of about a
megabyte (``lmforge.tokenization.chunks.iter_chunks``), an engine (``lmforge.engines``: a pool of one
worker process per core, Ray tasks with ``data.engine=ray``, or this process for a small corpus) runs
``ChunkEncoder`` on each, and this process writes the ids in chunk order, so memory stays flat
whatever the corpus size and the bytes are the same on every engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lmforge.config.paths import DOC_SEPARATOR, SPLITS, TOKENIZER_FILE
from lmforge.engines.choice import open_engine
from lmforge.errors import LmforgeError
from lmforge.outputs import atomic_path, check_writable, progress_bar, write_json
from lmforge.tokenization.chunks import iter_chunks, prepared_format
from lmforge.tokenization.shards import INDEX_FILE, ShardWriter, token_dtype
from lmforge.tokenization.tokenizer import (
    Encoder,
    eot_token_id,
    join_ids,
    load_tokenizer,
    tokenizer_sha256,
    vocab_eot_token,
)

# A split smaller than this is encoded in the stage's own process: starting workers costs more.
_PARALLEL_MIN_BYTES = 4 << 20


def encode_chunk(encoder: Encoder, chunk: str, eot_id: int) -> np.ndarray:
    """Ids of a chunk of a prepared split, with ``eot_id`` where a document separator was."""
    arrays = []
    for i, part in enumerate(chunk.split(DOC_SEPARATOR)):
        if i:
            arrays.append(np.array([eot_id], dtype=np.uint32))
        if part:
            arrays.append(encoder.encode(part))
    return join_ids(arrays)


class ChunkEncoder:
    """The worker encoder, the same on every engine: a chunk of a prepared split to its ids, as ``dtype`` bytes.

    It carries the tokenizer as its JSON text (so a Ray worker on another machine needs no file) and
    builds the ``Encoder`` on its first chunk in a process; an engine sends it to each worker once,
    so that happens once per worker.
    """

    def __init__(self, tokenizer_json: str, eot_id: int, dtype: np.dtype):
        self.tokenizer_json, self.eot_id, self.dtype = tokenizer_json, eot_id, np.dtype(dtype)
        self._encoder: Encoder | None = None

    def __call__(self, chunk: str) -> bytes:
        if self._encoder is None:
            self._encoder = Encoder(Tokenizer.from_str(self.tokenizer_json))
        return encode_chunk(self._encoder, chunk, self.eot_id).astype(self.dtype).tobytes()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_encoder": None}  # a worker builds its own


def tokenize_stage(cfg) -> dict:
    """Run the tokenize stage for config ``cfg``; write ``paths.tokens`` and return its index.

    Reads ``paths.prepared/{train,val}.txt`` and ``paths.vocab/tokenizer.json``; writes the
    shards and ``index.json`` into ``paths.tokens`` atomically (all or nothing).
    """
    check_writable(("paths.tokens", cfg.paths.tokens), ("paths.reports", Path(cfg.paths.reports) / "tokenize.json"))
    tokenizer_path = Path(cfg.paths.vocab) / TOKENIZER_FILE
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    eot_id = eot_token_id(tokenizer, vocab_eot_token(cfg))  # a fine-tune's: its base's
    dtype = token_dtype(vocab_size)
    fmt = prepared_format(cfg.paths.prepared)
    if fmt != "text":
        return _tokenize_records(cfg, fmt, tokenizer, tokenizer_path, eot_id, dtype)
    files = _prepared_files(Path(cfg.paths.prepared))
    total_bytes = sum(path.stat().st_size for path in files.values())
    index = {"dtype": dtype.name, "vocab_size": vocab_size, "eot_id": eot_id,
             "tokenizer_sha256": tokenizer_sha256(tokenizer_path), "splits": {}}
    encoder = ChunkEncoder(tokenizer_path.read_text(encoding="utf-8"), eot_id, dtype)
    with open_engine(cfg.data, encoder, "tokenize", pool=total_bytes >= _PARALLEL_MIN_BYTES) as engine, \
            progress_bar(total_bytes, "tokenize") as bar, atomic_path(cfg.paths.tokens, directory=True) as tmp:
        for split, path in files.items():
            writer = ShardWriter(tmp / split, dtype, int(cfg.data.shard_size))
            index["splits"][split] = _write_split(path, writer, engine, bar)
        write_json(tmp / INDEX_FILE, index)
    write_json(Path(cfg.paths.reports) / "tokenize.json",
               {"format": "text", **{f"{split}_tokens": entry["tokens"] for split, entry in index["splits"].items()}})
    print(f"tokenize: {index['splits']['train']['tokens']:,} train and {index['splits']['val']['tokens']:,} "
          f"val tokens ({dtype.name}, vocabulary {vocab_size:,})")
    return index


def _tokenize_records(cfg, fmt: str, tokenizer, tokenizer_path: Path, eot_id: int, dtype) -> dict:
    """data.format=chat|prompt_completion: packed rows and their flags (``lmforge.tokenization.packing``);
    the counts (records cut or dropped for length among them) also go to ``reports/tokenize.json``."""
    from lmforge.tokenization.records import tokenize_records

    report = Path(cfg.paths.reports) / "tokenize.json"
    index = {"dtype": dtype.name, "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True), "eot_id": eot_id,
             "tokenizer_sha256": tokenizer_sha256(tokenizer_path), "format": fmt,
             "row_tokens": int(cfg.model.block_size) + 1, "splits": {}}
    with progress_bar(None, "tokenize", unit="records") as bar, \
            atomic_path(cfg.paths.tokens, directory=True) as tmp:
        index["splits"] = tokenize_records(cfg, fmt, tokenizer, tokenizer_path.parent, eot_id, dtype, tmp, bar)
        write_json(tmp / INDEX_FILE, index)
    counts = {f"{split}_{k}": v for split, entry in index["splits"].items() for k, v in entry.items()
              if not k.endswith("shards")}
    write_json(report, {"format": fmt, "row_tokens": index["row_tokens"], **counts})
    train = index["splits"]["train"]
    print(f"tokenize: {train['records']:,} train records in {train['rows']:,} rows of {index['row_tokens']} tokens "
          f"({train['loss_tokens']:,} counted in the loss); {train['truncated']:,} truncated, "
          f"{train['dropped']:,} dropped for length or no assistant token")
    return index


def _prepared_files(prepared: Path) -> dict[str, Path]:
    """``train.txt`` and ``val.txt`` of the prepare stage, or one sentence saying to run it."""
    files = {split: prepared / f"{split}.txt" for split in SPLITS}
    for path in files.values():
        if not path.is_file():
            raise LmforgeError(f"{path} not found; run the prepare stage first (dvc repro prepare).")
    return files


def _write_split(path: Path, writer: ShardWriter, engine, bar) -> dict:
    """Encode one prepared split on ``engine`` into ``writer``'s shards; return its entry of ``index.json``."""
    counts = {"documents": 0, "bytes": 0}

    def counted(chunks: Iterable[str]) -> Iterator[str]:
        for chunk in chunks:
            size = len(chunk.encode("utf-8"))
            separators = chunk.count(DOC_SEPARATOR)
            counts["documents"] += separators
            counts["bytes"] += size - separators
            bar.update(size)
            yield chunk

    try:
        for data in engine.map(counted(iter_chunks(path))):
            writer.write(np.frombuffer(data, dtype=writer.dtype))
    finally:
        writer.close()
    if counts["bytes"]:
        counts["documents"] += 1  # n separators between n + 1 documents
    return {"tokens": sum(s["tokens"] for s in writer.shards), **counts, "shards": writer.shards}
