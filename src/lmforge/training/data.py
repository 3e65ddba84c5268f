"""The training data: random windows of ``block_size + 1`` tokens from the memory-mapped shards.

Batch ``i`` is drawn from a generator seeded with ``(seed, i, rank)``, so the stream of batches
is a pure function of the step: a resumed run sees exactly the batches it would have seen, and
each distributed rank sees different ones. Records (data.format=chat|prompt_completion) are read as
whole packed rows with their loss mask and segments instead (``PackedRows``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from lmforge.errors import LmforgeError
from lmforge.tokenization.packing import rows_to_batch
from lmforge.tokenization.shards import TokenStream


class RandomWindows(IterableDataset):
    """Yields ``(x, y)`` batches: ``x`` windows of ``block_size`` ids, ``y`` the same shifted by one."""

    def __init__(self, stream: TokenStream, block_size: int, batch_size: int, seed: int,
                 num_batches: int | None = None, start_batch: int = 0, rank: int = 0):
        self.stream = stream
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.num_batches = num_batches
        self.start_batch = start_batch
        self.rank = rank

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, i, self.rank])
        starts = rng.integers(0, len(self.stream) - self.block_size, size=self.batch_size)
        windows = np.stack([self.stream.read(int(s), self.block_size + 1) for s in starts])
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self):
        i = self.start_batch
        while self.num_batches is None or i < self.start_batch + self.num_batches:
            yield self.batch(i)
            i += 1


class PackedRows(RandomWindows):
    """For records (data.format=chat|prompt_completion): yields ``(x, y, segments)`` batches of whole
    packed rows (``lmforge.tokenization.packing.rows_to_batch``), drawn as ``RandomWindows`` draws."""

    def __init__(self, stream: TokenStream, flags: TokenStream, row_tokens: int, batch_size: int, seed: int,
                 num_batches: int | None = None, start_batch: int = 0, rank: int = 0):
        super().__init__(stream, row_tokens - 1, batch_size, seed, num_batches, start_batch, rank)
        self.flags, self.row_tokens = flags, row_tokens

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, i, self.rank])
        rows = rng.integers(0, len(self.stream) // self.row_tokens, size=self.batch_size) * self.row_tokens
        return rows_to_batch(np.stack([self.stream.read(int(s), self.row_tokens) for s in rows]),
                             np.stack([self.flags.read(int(s), self.row_tokens) for s in rows]))


def packed_streams(tokens_dir: str | Path, split: str, block_size: int) -> tuple[TokenStream, TokenStream] | None:
    """A packed split's tokens and flags, or None for plain text; LmforgeError when its rows are
    not ``block_size + 1`` long (the records were packed for another model.block_size)."""
    stream = TokenStream(tokens_dir, split)
    if "row_tokens" not in stream.index:
        return None
    if int(stream.index["row_tokens"]) != block_size + 1:
        raise LmforgeError(f"{Path(tokens_dir)} holds records packed into rows of {stream.index['row_tokens']} tokens, "
                           f"not model.block_size+1={block_size + 1}; rerun the tokenize stage (dvc repro tokenize).")
    return stream, TokenStream(tokens_dir, split, "flag_shards", "uint8")


class TokenDataModule(L.LightningDataModule):
    """Train batches forever (the trainer stops at ``max_steps``); a fixed set of validation batches."""

    def __init__(self, tokens_dir: str | Path, block_size: int, batch_size: int, seed: int, eval_iters: int):
        super().__init__()
        self.tokens_dir = Path(tokens_dir)
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.eval_iters = eval_iters
        self.start_batch = 0  # set by the trainer when resuming

    def setup(self, stage: str | None = None) -> None:
        self.train_stream = TokenStream(self.tokens_dir, "train")
        self.val_stream = TokenStream(self.tokens_dir, "val")
        self.packed = {split: packed_streams(self.tokens_dir, split, self.block_size) for split in ("train", "val")}
        if self.packed["train"] is not None:
            return  # whole rows of block_size + 1: never shorter than a window
        for split, stream in (("train", self.train_stream), ("validation", self.val_stream)):
            if len(stream) <= self.block_size:
                raise LmforgeError(
                    f"the {split} split has {len(stream)} tokens, not more than model.block_size={self.block_size}; "
                    "lower model.block_size or give the split more text (data.val_fraction, data.sources)."
                )

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        data = self._batches("train", self.seed, start_batch=self.start_batch, rank=self._rank())
        return DataLoader(data, batch_size=None, num_workers=0, generator=_own_generator())

    def val_dataloader(self) -> DataLoader:
        # The same batches at every validation, so the estimates are comparable step to step.
        data = self._batches("val", self.seed + 1, num_batches=self.eval_iters, rank=self._rank())
        return DataLoader(data, batch_size=None, num_workers=0, generator=_own_generator())

    def _batches(self, split: str, seed: int, **kwargs) -> RandomWindows:
        if self.packed[split] is not None:
            return PackedRows(*self.packed[split], self.block_size + 1, self.batch_size, seed, **kwargs)
        stream = self.train_stream if split == "train" else self.val_stream
        return RandomWindows(stream, self.block_size, self.batch_size, seed, **kwargs)


def _own_generator() -> torch.Generator:
    # A DataLoader draws a seed from the global torch generator each time it is iterated unless
    # it has its own; with its own, validation leaves the RNG that dropout uses untouched, which
    # keeps a resumed run bit-identical to an uninterrupted one.
    return torch.Generator()
