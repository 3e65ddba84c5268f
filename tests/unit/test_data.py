"""The training data: windows across memory-mapped shards, reproducible sampling, flat memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psutil
import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenization.shards import TokenStream
from lmforge.training.data import RandomWindows


def write_tokens(directory: Path, shard_sizes: list[int], dtype=np.uint16, start: int = 0) -> np.ndarray:
    """A tokens directory with one train split in shards of the given sizes; returns all its ids."""
    ids = (np.arange(start, start + sum(shard_sizes)) % np.iinfo(dtype).max).astype(dtype)
    (directory / "train").mkdir(parents=True, exist_ok=True)
    shards, offset = [], 0
    for i, n in enumerate(shard_sizes):
        ids[offset:offset + n].tofile(directory / "train" / f"shard_{i:06d}.bin")
        shards.append({"file": f"train/shard_{i:06d}.bin", "tokens": n})
        offset += n
    index = {"dtype": np.dtype(dtype).name, "vocab_size": int(np.iinfo(dtype).max) + 1, "eot_id": 0,
             "tokenizer_sha256": "0" * 64, "splits": {"train": {"tokens": len(ids), "documents": 1, "bytes": len(ids),
                                                                "shards": shards}}}
    (directory / "index.json").write_text(json.dumps(index))
    return ids


def test_windows_cross_shard_boundaries(tmp_path):
    ids = write_tokens(tmp_path, [100, 7, 1, 250])
    stream = TokenStream(tmp_path, "train")
    assert len(stream) == 358
    for start, length in [(0, 358), (95, 20), (106, 3), (107, 1), (99, 200), (357, 1)]:
        assert np.array_equal(stream.read(start, length), ids[start:start + length].astype(np.int64))


def test_batches_are_a_pure_function_of_seed_step_and_rank(tmp_path):
    write_tokens(tmp_path, [500, 500])
    stream = TokenStream(tmp_path, "train")
    windows = RandomWindows(stream, block_size=16, batch_size=4, seed=7)
    x, y = windows.batch(3)
    assert x.shape == (4, 16) and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())
    again = RandomWindows(TokenStream(tmp_path, "train"), block_size=16, batch_size=4, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(windows.batch(3), again.batch(3)))
    # A run resumed at batch 5 sees exactly what the uninterrupted run saw from batch 5 on.
    resumed = RandomWindows(stream, block_size=16, batch_size=4, seed=7, start_batch=5, num_batches=3)
    uninterrupted = list(RandomWindows(stream, block_size=16, batch_size=4, seed=7, num_batches=8))[5:]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(resumed, uninterrupted))
    # Other ranks, seeds and steps draw other windows.
    other_rank = RandomWindows(stream, block_size=16, batch_size=4, seed=7, rank=1).batch(3)[0]
    other_seed = RandomWindows(stream, block_size=16, batch_size=4, seed=8).batch(3)[0]
    assert not np.array_equal(x, other_rank) and not np.array_equal(x, other_seed)
    assert not np.array_equal(x, windows.batch(4)[0])


def test_a_truncated_shard_is_a_clear_error(tmp_path):
    write_tokens(tmp_path, [100, 100])
    (tmp_path / "train" / "shard_000001.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(LmforgeError, match=r"shard_000001\.bin is missing or truncated.*dvc repro tokenize"):
        TokenStream(tmp_path, "train")


@pytest.mark.slow
def test_resident_memory_stays_flat_over_a_long_run(tmp_path):
    # nanoGPT's issue #287: a memory map held open keeps every page it touched resident, so
    # memory grows toward the size of the data. 64 MB of tokens, read all over, must not do that.
    n = 32 << 20
    write_tokens(tmp_path, [n // 2, n // 2])
    stream = TokenStream(tmp_path, "train")
    windows = RandomWindows(stream, block_size=256, batch_size=32, seed=0)
    process = psutil.Process()
    windows.batch(0)
    before = process.memory_info().rss
    for i in range(1, 1500):  # 48,000 windows over 16,384 pages of 4 KB: nearly every page touched
        windows.batch(i)
    grown = process.memory_info().rss - before
    assert grown < 16 << 20, f"resident memory grew by {grown / 1e6:.0f} MB"

    # The measurement can fail: one map held open over the same reads grows by tens of MB.
    held = np.memmap(tmp_path / "train" / "shard_000000.bin", dtype=np.uint16, mode="r")
    before = process.memory_info().rss
    rng = np.random.default_rng(0)
    for start in rng.integers(0, len(held) - 257, size=24_000):
        held[start:start + 257].sum()
    assert process.memory_info().rss - before > 16 << 20
    del held
