"""The prepare stage's reading handed to an engine's workers: source files in batches, read, cleaned and
hashed there, then deduplicated and split here, file by file in ``data.sources`` order.

The rules are ``documents``' own (``read_file``, ``Documents``), run inside each task with the
deduplication left out; the stage's process keeps the one hash set for the whole corpus, so exact
dedup stays exact and the splits get the same bytes as when this process reads everything itself.
A task holds one batch of files' cleaned documents: at most ``BATCH_BYTES`` of files, or one larger
file whole (a long document is then held whole, where the in-process reading streams it in pieces).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace

from lmforge.corpus.cleaning import check_normal_form
from lmforge.corpus.documents import CorpusStats, Documents, read_file, skip_or_raise, warn
from lmforge.corpus.reading import ReadOptions

# Source files are handed out in batches of about this many bytes (a larger file goes alone).
BATCH_BYTES = 8 << 20
# The data.* keys a task reads files by (ReadOptions).
_READ_KEYS = ("decode_errors", "text_field", "column", "skip_bad_files")


def read_function(data_cfg) -> Callable[[list], list[tuple]]:
    """What a task runs on one batch of ``(path, format, compression)``: ``read_batch`` with the
    stage's reading rules (plain values, so it pickles to any worker)."""
    read_keys = {key: data_cfg[key] for key in _READ_KEYS}
    return functools.partial(read_batch, read_keys, check_normal_form(data_cfg.normalize), int(data_cfg.min_chars))


def read_batch(read_keys: dict, form: str | None, min_chars: int, batch: list) -> list[tuple]:
    """(In a worker.) For each (path, format, compression): its kept documents as (chars, bytes, digest),
    its counts (documents in, bytes in, too short), its error and its warnings."""
    results = []
    for path, fmt, compression in batch:
        warnings: list[str] = []
        recorder, stats = _Recorder(), CorpusStats()
        # Duplicates are the stage process's to find, across all files; here only the local rules.
        documents = Documents(recorder, stats, form, min_chars, dedupe=False)
        bad = read_file(documents, path, fmt, compression, ReadOptions(SimpleNamespace(**read_keys), warnings.append),
                        lambda n: None)
        results.append((recorder.kept, stats.documents_in, stats.bytes_in, stats.dropped_short, bad, warnings))
    return results


def read_on_engine(engine, data_cfg, files: list, formats: list, documents: Documents,
                   advance: Callable[[int], None]) -> None:
    """Every file's documents read by ``engine``'s workers, passed to ``documents.keep`` in file order.

    ``documents`` is the stage's ``Documents`` (its splits, counts and the one dedup set).
    """
    options = ReadOptions(data_cfg, warn)
    batches = _batches([(path, *fmt, path.stat().st_size) for path, fmt in zip(files, formats)])
    stats = documents.stats
    results = engine.map([(path, fmt, compression) for path, fmt, compression, _ in batch] for batch in batches)
    for batch, batch_results in zip(batches, results):
        for (path, _, _, size), (kept, documents_in, bytes_in, short, bad, warnings) in zip(batch, batch_results):
            for message in warnings:
                warn(message)
            stats.documents_in += documents_in
            stats.bytes_in += bytes_in
            stats.dropped_short += short
            for chars, data, digest in kept:
                documents.keep(chars, data, digest)
            skip_or_raise(bad, path, options, stats)
            advance(size)


def _batches(files: list[tuple]) -> list[list[tuple]]:
    """Consecutive files (each ending with its size) grouped up to ``BATCH_BYTES`` each (a larger file alone)."""
    batches, current, size = [], [], 0
    for entry in files:
        if current and size + entry[-1] > BATCH_BYTES:
            batches.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry[-1]
    if current:
        batches.append(current)
    return batches


class _Recorder:
    """Stands in for the splits inside a task: keeps each cleaned document as (chars, bytes, digest)."""

    def __init__(self):
        self.kept: list[tuple[int, bytes, bytes]] = []
        self._pieces: list[tuple[int, bytes]] | None = None

    def add(self, chars: int, data: bytes, digest: bytes) -> None:
        self.kept.append((chars, data, digest))

    def begin(self) -> None:
        self._pieces = []

    def write(self, chars: int, data: bytes) -> None:
        self._pieces.append((chars, data))

    def commit(self, digest: bytes) -> None:
        self.kept.append((sum(c for c, _ in self._pieces), b"".join(d for _, d in self._pieces), digest))
        self._pieces = None

    def abort(self) -> None:
        self._pieces = None
