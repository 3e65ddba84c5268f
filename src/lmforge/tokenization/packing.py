"""Packed rows: records' ids and loss masks packed into rows of ``model.block_size + 1`` tokens, their
flags on disk, and the one reading of a row into inputs, targets and segments that training and
evaluation share. How records become ids is ``lmforge.tokenization.records``'.

Records are packed in order: a record that does not fit in what is left of a row starts a new one,
the rest of the row is padding (end-of-text ids that count for nothing). A record longer than a
row is cut to one (``data.overlong=truncate``) or left out (``drop``); either way it is counted, and
one left with no assistant token is dropped.

Beside each split's token shards, ``<split>-flags/`` holds one byte per token: ``LOSS`` (it is a
target that counts) and ``START`` (the first token of a record, or of the padding). From them a
row reads as (x, y, segments): y is -100 where nothing counts and at every segment start (no
record is predicted from the one before), and segments lets attention and positions restart at
each record (``GPT.forward(segments=...)``), so packed records neither see nor score each other.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.tokenization.shards import ShardWriter

LOSS, START = 1, 2
FLAGS_DTYPE = np.dtype(np.uint8)


def flags_dir(split: str) -> str:
    """The folder of a split's flag shards inside a tokens directory."""
    return f"{split}-flags"


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


def rows_to_batch(rows: np.ndarray, flags: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed rows (B, block_size + 1) and their flags to (x, y, segments), each (B, block_size):
    y is -100 where the target does not count; segments numbers each row's records from 0."""
    rows, flags = torch.from_numpy(np.asarray(rows, dtype=np.int64)), torch.from_numpy(np.asarray(flags))
    x, y = rows[:, :-1], rows[:, 1:].clone()
    target_flags = flags[:, 1:]
    y[((target_flags & LOSS) == 0) | ((target_flags & START) != 0)] = -100
    segments = torch.cumsum((flags[:, :-1] & START) != 0, dim=1) - 1
    return x, y, segments
