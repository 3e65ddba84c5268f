"""The tokenize stage's part for records (data.format=chat|prompt_completion): each prepared record to
ids and a loss mask, on the data engine, then packed in order (``lmforge.tokenization.packing``).

A conversation goes through its chat template (``lmforge.tokenization.chat``: only assistant tokens
count); a prompt-completion pair is the text ``prompt + completion`` and the end-of-text token (only
the completion and that token count).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson

from lmforge.config.paths import SPLITS, records_file
from lmforge.engines.choice import open_engine
from lmforge.errors import LmforgeError
from lmforge.tokenization.chat import ChatEncoder, chatml, load_chat
from lmforge.tokenization.packing import FLAGS_DTYPE, Packer, flags_dir
from lmforge.tokenization.shards import ShardWriter

OVERLONG = ("truncate", "drop")
_BATCH_RECORDS = 256  # records per task of the engine
_PARALLEL_MIN_BYTES = 4 << 20  # smaller prepared records are encoded in the stage's own process


def record_ids(record: dict, fmt: str, tokenizer, chat: ChatEncoder | None, eot_id: int) -> tuple[list, list]:
    """(ids, loss mask) of one prepared record of format ``fmt``."""
    if fmt == "chat":
        return chat.encode(record["messages"])
    prompt = record["prompt"]
    encoding = tokenizer.encode(prompt + record["completion"], add_special_tokens=False)
    mask = [begin >= len(prompt) for begin, _ in encoding.offsets]
    return list(encoding.ids) + [eot_id], mask + [True]


def record_template(vocab_dir: Path, tokenizer) -> object:
    """The chat template of ``paths.vocab`` (``chat_template.jinja``), or ChatML where the tokenizer has its tokens."""
    template = load_chat(vocab_dir)
    if template is None:
        if tokenizer.token_to_id("<|im_end|>") is None:
            raise LmforgeError(f"{vocab_dir} has no chat template and its tokenizer lacks ChatML's tokens; "
                               "rerun the vocab stage with data.format=chat (dvc repro vocab).")
        template = chatml()
    return template


class RecordEncoder:
    """The worker encoder for records, the same on every engine: a batch of prepared JSONL lines to
    their (ids, mask) pairs, packed as bytes (lengths as int64, ids as uint32, mask as uint8).

    It carries the tokenizer as JSON text and the template, and builds its encoders in the worker."""

    def __init__(self, tokenizer_json: str, template, fmt: str, eot_id: int):
        self.tokenizer_json, self.template, self.fmt, self.eot_id = tokenizer_json, template, fmt, eot_id
        self._tokenizer = self._chat = None

    def __call__(self, lines: list[bytes]) -> tuple[bytes, bytes, bytes]:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
            if self.fmt == "chat":
                self._chat = ChatEncoder(self._tokenizer, self.template, self.eot_id)
        lengths, ids, masks = [], [], []
        for line in lines:
            record_ids_, mask = record_ids(orjson.loads(line), self.fmt, self._tokenizer, self._chat, self.eot_id)
            lengths.append(len(record_ids_))
            ids.extend(record_ids_)
            masks.extend(mask)
        return (np.asarray(lengths, dtype=np.int64).tobytes(), np.asarray(ids, dtype=np.uint32).tobytes(),
                np.asarray(masks, dtype=np.uint8).tobytes())

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None, "_chat": None}  # a worker builds its own


def _line_batches(path: Path, bar) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                batch.append(line)
            if len(batch) == _BATCH_RECORDS:
                bar.update(len(batch))
                yield batch
                batch = []
    if batch:
        bar.update(len(batch))
        yield batch


def tokenize_records(cfg, fmt: str, tokenizer, vocab_dir: Path, eot_id: int, dtype: np.dtype, out: Path,
                     bar) -> dict:
    """Encode both prepared record splits on the data engine (``data.engine``, ``data.workers``: a
    pool when a split is large enough) and pack them here, in order, into ``out``; return the
    index's split entries. The bytes are the same on every engine."""
    overlong = str(cfg.data.get("overlong", "truncate"))
    if overlong not in OVERLONG:
        raise LmforgeError(f"data.overlong='{overlong}' is not one of {', '.join(OVERLONG)}.")
    row_tokens = int(cfg.model.block_size) + 1
    template = record_template(vocab_dir, tokenizer) if fmt == "chat" else None
    encoder = RecordEncoder(tokenizer.to_str(), template, fmt, eot_id)
    paths = {split: Path(cfg.paths.prepared) / records_file(split) for split in SPLITS}
    for path in paths.values():
        if not path.is_file():
            raise LmforgeError(f"{path} not found; run the prepare stage first (dvc repro prepare).")
    big = sum(p.stat().st_size for p in paths.values()) >= _PARALLEL_MIN_BYTES
    splits = {}
    with open_engine(cfg.data, encoder, "tokenize", pool=big) as engine:
        for split, path in paths.items():
            splits[split] = _pack_split(cfg, engine, path, out, split, dtype, row_tokens, eot_id, overlong, bar)
    return splits


def _pack_split(cfg, engine, path: Path, out: Path, split: str, dtype, row_tokens: int, eot_id: int,
                overlong: str, bar) -> dict:
    shard_bytes = int(cfg.data.shard_size)
    packer = Packer(ShardWriter(out / split, dtype, shard_bytes),
                    ShardWriter(out / flags_dir(split), FLAGS_DTYPE, shard_bytes), row_tokens, eot_id, overlong)
    for lengths, ids, masks in engine.map(_line_batches(path, bar)):
        ids, masks = np.frombuffer(ids, dtype=np.uint32), np.frombuffer(masks, dtype=np.uint8)
        start = 0
        for length in np.frombuffer(lengths, dtype=np.int64).tolist():
            packer.add(ids[start : start + length].tolist(), masks[start : start + length].tolist())
            start += length
    counts = packer.finish()
    if counts["rows"] == 0:
        raise LmforgeError(f"no {split} record is left: all {counts['records']} were dropped ({counts['overlong']} "
                           f"longer than model.block_size+1={row_tokens} tokens, with data.overlong={overlong}, "
                           "and those cut to a row keep no assistant token); raise model.block_size.")
    return {**counts, "shards": packer.tokens.shards, "flag_shards": packer.flags.shards}
