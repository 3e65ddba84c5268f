"""Records to packed rows: the tokenize stage's part for data.format=chat|prompt_completion, and
the one reading of a packed row into inputs, targets and segments that training and evaluation share.

Each record becomes ids and a loss mask: a conversation through its chat template
(``lmforge.tokenization.chat``: only assistant tokens count), a prompt-completion pair as the
text ``prompt + completion`` and the end-of-text token (only the completion and that token count).
Records are packed in order into rows of ``model.block_size + 1`` tokens: a record that does not
fit in what is left of a row starts a new one, the rest of the row is padding (end-of-text ids
that count for nothing). A record longer than a row is cut to one (``data.overlong=truncate``)
or left out (``drop``); either way it is counted, and one left with no assistant token is dropped.

Beside each split's token shards, ``<split>-flags/`` holds one byte per token: ``LOSS`` (it is a
target that counts) and ``START`` (the first token of a record, or of the padding). From them a
row reads as (x, y, segments): y is -100 where nothing counts and at every segment start (no
record is predicted from the one before), and segments lets attention and positions restart at
each record (``GPT.forward(segments=...)``), so packed records neither see nor score each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import torch

from lmforge.config.paths import SPLITS, records_file
from lmforge.engines.choice import open_engine
from lmforge.errors import LmforgeError
from lmforge.tokenization.chat import ChatEncoder, chatml, load_chat
from lmforge.tokenization.shards import ShardWriter

LOSS, START = 1, 2
OVERLONG = ("truncate", "drop")
FLAGS_DTYPE = np.dtype(np.uint8)
_BATCH_RECORDS = 256  # records per task of the engine
_PARALLEL_MIN_BYTES = 4 << 20  # smaller prepared records are encoded in the stage's own process


def flags_dir(split: str) -> str:
    """The folder of a split's flag shards inside a tokens directory."""
    return f"{split}-flags"


def record_ids(record: dict, fmt: str, tokenizer, chat: ChatEncoder | None, eot_id: int) -> tuple[list, list]:
    """(ids, loss mask) of one prepared record of format ``fmt``."""
    if fmt == "chat":
        return chat.encode(record["messages"])
    prompt = record["prompt"]
    encoding = tokenizer.encode(prompt + record["completion"], add_special_tokens=False)
    mask = [begin >= len(prompt) for begin, _ in encoding.offsets]
    return list(encoding.ids) + [eot_id], mask + [True]


class Packer:
    """Packs (ids, mask) records into rows of ``row_tokens``, writing tokens and flags as it goes."""

    def __init__(self, tokens: ShardWriter, flags: ShardWriter, row_tokens: int, pad_id: int, overlong: str):
        self.tokens, self.flags = tokens, flags
        self.row_tokens, self.pad_id, self.overlong = row_tokens, pad_id, overlong
        self.row_ids: list[int] = []
        self.row_flags: list[int] = []
        self.counts = {"records": 0, "rows": 0, "tokens": 0, "loss_tokens": 0, "padding": 0,
                       "overlong": 0, "truncated": 0, "dropped": 0}

    def add(self, ids: list, mask: list) -> None:
        counts = self.counts
        counts["records"] += 1
        if len(ids) > self.row_tokens:
            counts["overlong"] += 1
            if self.overlong == "drop":
                counts["dropped"] += 1
                return
            ids, mask = ids[: self.row_tokens], mask[: self.row_tokens]
            counts["truncated"] += 1
        flags = [LOSS if m else 0 for m in mask]
        flags[0] = START  # never a target: nothing before it in its segment
        if not any(f & LOSS for f in flags):
            counts["dropped"] += 1
            return
        if len(self.row_ids) + len(ids) > self.row_tokens:
            self._flush()
        self.row_ids.extend(ids)
        self.row_flags.extend(flags)
        counts["tokens"] += len(ids)
        counts["loss_tokens"] += sum(f & LOSS for f in flags)

    def _flush(self) -> None:
        if not self.row_ids:
            return
        padding = self.row_tokens - len(self.row_ids)
        if padding:
            self.row_ids.extend([self.pad_id] * padding)
            self.row_flags.extend([START] + [0] * (padding - 1))
        self.tokens.write(np.asarray(self.row_ids, dtype=np.uint32))
        self.flags.write(np.asarray(self.row_flags, dtype=np.uint8))
        self.counts["rows"] += 1
        self.counts["padding"] += padding
        self.row_ids, self.row_flags = [], []

    def finish(self) -> dict:
        self._flush()
        self.tokens.close()
        self.flags.close()
        return self.counts


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


def rows_to_batch(rows: np.ndarray, flags: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed rows (B, block_size + 1) and their flags to (x, y, segments), each (B, block_size):
    y is -100 where the target does not count; segments numbers each row's records from 0."""
    rows, flags = torch.from_numpy(np.asarray(rows, dtype=np.int64)), torch.from_numpy(np.asarray(flags))
    x, y = rows[:, :-1], rows[:, 1:].clone()
    target_flags = flags[:, 1:]
    y[((target_flags & LOSS) == 0) | ((target_flags & START) != 0)] = -100
    segments = torch.cumsum((flags[:, :-1] & START) != 0, dim=1) - 1
    return x, y, segments
