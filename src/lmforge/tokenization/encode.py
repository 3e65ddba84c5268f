"""Stage 3, tokenize: encode each prepared split into binary token shards that training memory-maps.

Writes ``paths.tokens`` in the format of ``lmforge.tokenization.shards`` (which owns it, and the reader);
the encoding itself is ``lmforge.tokenization.tokenizer.Encoder``'s. Documents are separated by the
tokenizer's end-of-text token. The stage streams: the main process reads a split in chunks of
about a megabyte (``lmforge.corpus.iter_chunks``), worker processes (one per core, each loading
the tokenizer once) encode them, and the main process writes the ids in order, so memory stays
flat whatever the corpus size. With ``data.engine=ray`` Ray tasks encode the chunks instead of the
process pool (``lmforge.engines.ray``), with the same ``encode_chunk``, and the writing is the same.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmforge.engines.ray import RayEncoding, engine_of  # Ray itself is imported only when used
from lmforge.errors import LmforgeError
from lmforge.outputs import atomic_path, write_json
from lmforge.tokenization.shards import INDEX_FILE, ShardWriter, token_dtype
from lmforge.tokenization.tokenizer import Encoder, eot_token_id, join_ids, load_tokenizer, tokenizer_sha256

# A split smaller than this is encoded in the stage's own process: starting workers costs more.
_PARALLEL_MIN_BYTES = 4 << 20


def encode_chunk(encoder: Encoder, chunk: str, eot_id: int) -> np.ndarray:
    """Ids of a chunk of a prepared split, with ``eot_id`` where a document separator was."""
    from lmforge.config.paths import DOC_SEPARATOR

    arrays = []
    for i, part in enumerate(chunk.split(DOC_SEPARATOR)):
        if i:
            arrays.append(np.array([eot_id], dtype=np.uint32))
        if part:
            arrays.append(encoder.encode(part))
    return join_ids(arrays)


# The encoder of a worker process, loaded once by _start_worker.
_worker: dict = {}


def _start_worker(tokenizer_path: str, eot_id: int, dtype: str) -> None:
    # One process per core already: the tokenizer's own thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(encoder=Encoder(load_tokenizer(Path(tokenizer_path))), eot_id=eot_id, dtype=np.dtype(dtype))


# Megabyte chunks between two release_freed_memory calls.
_TRIM_EVERY = 16


def release_freed_memory() -> None:
    """Give the C heap's free memory back to the system (glibc only; elsewhere nothing).

    Chunk after chunk of megabyte strings and arrays, glibc keeps what Python frees and resident
    memory creeps up by about 10% of the text tokenized; trimming keeps it flat.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _encode_in_worker(chunk: str) -> bytes:
    _worker["chunks"] = _worker.get("chunks", 0) + 1
    if _worker["chunks"] % _TRIM_EVERY == 0:
        release_freed_memory()
    return encode_chunk(_worker["encoder"], chunk, _worker["eot_id"]).astype(_worker["dtype"]).tobytes()


def _in_order(pool, chunks: Iterable[str], ahead: int) -> Iterator[bytes]:
    """``pool`` applied to ``chunks`` in order, with at most ``ahead`` chunks in flight.

    (``Pool.imap`` would read the whole input ahead of the workers, i.e. the corpus into memory.)
    """
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def tokenize_stage(cfg) -> dict:
    """Run the tokenize stage for config ``cfg``; write ``paths.tokens`` and return its index.

    Reads ``paths.prepared/{train,val}.txt`` and ``paths.vocab/tokenizer.json``; writes the
    shards and ``index.json`` into ``paths.tokens`` atomically (all or nothing).
    """
    from lmforge.outputs import progress_bar

    tokenizer_path = Path(cfg.paths.vocab) / "tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    eot_id = eot_token_id(tokenizer, cfg.tokenizer.eot_token)
    dtype = token_dtype(vocab_size)
    files = _prepared_files(Path(cfg.paths.prepared))
    total_bytes = sum(path.stat().st_size for path in files.values())
    index = {"dtype": dtype.name, "vocab_size": vocab_size, "eot_id": eot_id,
             "tokenizer_sha256": tokenizer_sha256(tokenizer_path), "splits": {}}
    with _Encoding(cfg.data, tokenizer_path, tokenizer, eot_id, dtype, total_bytes) as encoding, \
            progress_bar(total_bytes, "tokenize") as bar, atomic_path(cfg.paths.tokens, directory=True) as tmp:
        for split, path in files.items():
            writer = ShardWriter(tmp / split, dtype, int(cfg.data.shard_size))
            index["splits"][split] = _write_split(path, writer, encoding, bar)
        write_json(tmp / INDEX_FILE, index)
    print(f"tokenize: {index['splits']['train']['tokens']:,} train and {index['splits']['val']['tokens']:,} "
          f"val tokens ({dtype.name}, vocabulary {vocab_size:,})")
    return index


def _prepared_files(prepared: Path) -> dict[str, Path]:
    """``train.txt`` and ``val.txt`` of the prepare stage, or one sentence saying to run it."""
    from lmforge.config.paths import SPLITS

    files = {split: prepared / f"{split}.txt" for split in SPLITS}
    for path in files.values():
        if not path.is_file():
            raise LmforgeError(f"{path} not found; run the prepare stage first (dvc repro prepare).")
    return files


class _Encoding:
    """Where chunks are encoded: on Ray (``data.engine=ray``), in a pool of one worker process per
    core (a big enough corpus), or in this process; ``encoded`` gives the ids in input order."""

    def __init__(self, data_cfg, tokenizer_path: Path, tokenizer, eot_id: int, dtype: np.dtype, total_bytes: int):
        self.eot_id, self.dtype = eot_id, dtype
        self.workers = int(data_cfg.get("workers") or default_workers())
        self.pool = self.encoder = self.on_ray = None
        if engine_of(data_cfg) == "ray":
            self.on_ray = RayEncoding(data_cfg, encode_chunk, tokenizer_path, eot_id, dtype)
        elif self.workers > 1 and total_bytes >= _PARALLEL_MIN_BYTES:
            # spawn, not fork: the parent has the tokenizer's thread pool running already.
            self.pool = multiprocessing.get_context("spawn").Pool(
                self.workers, initializer=_start_worker, initargs=(str(tokenizer_path), eot_id, dtype.name))
        else:
            self.encoder = Encoder(tokenizer)

    def encoded(self, chunks: Iterable[str]) -> Iterator[bytes]:
        if self.on_ray is not None:
            return self.on_ray.encoded(chunks)
        if self.pool is not None:
            return _in_order(self.pool, chunks, ahead=2 * self.workers + 2)
        return (encode_chunk(self.encoder, chunk, self.eot_id).astype(self.dtype).tobytes() for chunk in chunks)

    def __enter__(self) -> _Encoding:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        if self.on_ray is not None:
            self.on_ray.close()


def _write_split(path: Path, writer: ShardWriter, encoding: _Encoding, bar) -> dict:
    """Encode one prepared split into ``writer``'s shards; return its entry of ``index.json``."""
    from lmforge.config.paths import DOC_SEPARATOR
    from lmforge.tokenization.chunks import iter_chunks

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
        for number, data in enumerate(encoding.encoded(counted(iter_chunks(path))), 1):
            writer.write(np.frombuffer(data, dtype=encoding.dtype))
            if number % _TRIM_EVERY == 0:
                release_freed_memory()
    finally:
        writer.close()
    if counts["bytes"]:
        counts["documents"] += 1  # n separators between n + 1 documents
    return {"tokens": sum(s["tokens"] for s in writer.shards), **counts, "shards": writer.shards}
