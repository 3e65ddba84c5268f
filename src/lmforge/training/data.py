"""The training data: random windows of ``block_size + 1`` tokens from the memory-mapped shards.

Batch ``i`` is drawn from a generator seeded with ``(seed, i, rank)``, so the stream of batches
is a pure function of the step: a resumed run sees exactly the batches it would have seen, and
each distributed rank sees different ones.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from lmforge.errors import LmforgeError
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
        for split, stream in (("train", self.train_stream), ("validation", self.val_stream)):
            if len(stream) <= self.block_size:
                raise LmforgeError(
                    f"the {split} split has {len(stream)} tokens, not more than model.block_size={self.block_size}; "
                    "lower model.block_size or give the split more text (data.val_fraction, data.sources)."
                )

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        data = RandomWindows(self.train_stream, self.block_size, self.batch_size, self.seed,
                             start_batch=self.start_batch, rank=self._rank())
        return DataLoader(data, batch_size=None, num_workers=0, generator=_own_generator())

    def val_dataloader(self) -> DataLoader:
        # The same batches at every validation, so the estimates are comparable step to step.
        data = RandomWindows(self.val_stream, self.block_size, self.batch_size, self.seed + 1,
                             num_batches=self.eval_iters, rank=self._rank())
        return DataLoader(data, batch_size=None, num_workers=0, generator=_own_generator())


def _own_generator() -> torch.Generator:
    # A DataLoader draws a seed from the global torch generator each time it is iterated unless
    # it has its own; with its own, validation leaves the RNG that dropout uses untouched, which
    # keeps a resumed run bit-identical to an uninterrupted one.
    return torch.Generator()
