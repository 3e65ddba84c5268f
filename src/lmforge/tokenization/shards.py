"""The token shards on disk: dtype, ``index.json``, writing and reading them back; not how text is encoded.

Layout of a tokens directory (``paths.tokens``), written by the tokenize stage (``lmforge.tokenization.encode``)::

    index.json               dtype, vocab size, end-of-text id, tokenizer hash, per-split counts
    train/shard_000000.bin   raw little-endian token ids (uint16 when the vocabulary fits)
    val/shard_000000.bin

Training, evaluation and anything else that reads tokens read them through ``TokenStream``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError

INDEX_FILE = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token ids to ``<dir>/shard_NNNNNN.bin`` files of at most ``shard_bytes`` each."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_bytes: int):
        self.directory = directory
        self.dtype = dtype
        self.shard_tokens = max(1, int(shard_bytes) // dtype.itemsize)
        self.shards: list[dict] = []
        self._file = None
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._open_next()
            take = min(len(ids), self.shard_tokens - self._in_shard)
            self._file.write(ids[:take].tobytes())
            self._in_shard += take
            self.shards[-1]["tokens"] += take
            ids = ids[take:]

    def _open_next(self) -> None:
        self.close()
        name = f"shard_{len(self.shards):06d}.bin"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file = open(self.directory / name, "wb", buffering=1 << 20)
        self.shards.append({"file": f"{self.directory.name}/{name}", "tokens": 0})
        self._in_shard = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None



def read_index(tokens_dir: str | Path) -> dict:
    """Load ``index.json`` of a tokens directory; LmforgeError naming it when missing or corrupt."""
    path = Path(tokens_dir) / INDEX_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{path} not found; run the tokenize stage first (dvc repro tokenize).") from None
    except json.JSONDecodeError:
        raise LmforgeError(f"{path} is corrupt; delete {tokens_dir} and rerun the tokenize stage.") from None


class TokenStream:
    """The tokens of one split, read through memory maps across shard boundaries.

    ``read(start, length)`` returns ``length`` consecutive ids as int64. ``part="flag_shards"`` (with
    ``dtype="uint8"``) reads a packed split's flags instead (``lmforge.tokenization.packing``). The maps are opened per
    read, not held: a long-lived np.memmap lets resident memory grow with every page touched.
    """

    def __init__(self, tokens_dir: str | Path, split: str, part: str = "shards", dtype: str | None = None):
        self.tokens_dir = Path(tokens_dir)
        index = read_index(self.tokens_dir)
        if split not in index["splits"] or part not in index["splits"][split]:
            raise LmforgeError(f"{self.tokens_dir / INDEX_FILE} has no '{split}' {part}; rerun the tokenize stage.")
        self.index = index
        self.dtype = np.dtype(dtype or index["dtype"])
        self.shards = [(self.tokens_dir / s["file"], int(s["tokens"])) for s in index["splits"][split][part]]
        self.shards = [(path, n) for path, n in self.shards if n > 0]
        self.offsets = np.cumsum([0] + [n for _, n in self.shards])
        for path, n in self.shards:
            if not path.is_file() or path.stat().st_size != n * self.dtype.itemsize:
                raise LmforgeError(
                    f"token shard {path} is missing or truncated; rerun the tokenize stage (dvc repro tokenize).")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            path, n = self.shards[shard]
            begin = start + filled - int(self.offsets[shard])
            take = min(length - filled, n - begin)
            data = np.memmap(path, dtype=self.dtype, mode="r", offset=begin * self.dtype.itemsize, shape=(take,))
            out[filled : filled + take] = data
            del data
            filled += take
            shard += 1
        return out
