"""The prepare stage: every source document read, cleaned, deduplicated and written to its split.

It streams: documents go to the split files as they are read, and what stays in memory is one
document (a long one only a piece at a time), the 16-byte digests of the documents kept (for
deduplication) and a few counters. With ``data.engine=ray`` the files are read on Ray workers in
batches (``lmforge.corpus.batches``) and their documents split here in the same order, so the
bytes written are the same.
"""

from __future__ import annotations

import bisect
import codecs
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from lmforge.config.paths import DOC_SEPARATOR, SPLITS
from lmforge.config.rules import checked
from lmforge.corpus.batches import read_function, read_on_engine
from lmforge.corpus.cleaning import check_normal_form
from lmforge.corpus.documents import CorpusStats, Documents, read_sources, warn
from lmforge.corpus.reading import ReadOptions
from lmforge.corpus.records import RecordStats, is_record_format, prepare_records
from lmforge.corpus.sources import file_format, resolve_sources
from lmforge.engines.choice import engine_of, open_engine
from lmforge.errors import LmforgeError
from lmforge.outputs import atomic_path, check_writable, progress_bar, write_json

# A long document is held in memory up to this size, then spooled to a temporary file until it
# is known whether (and to which split) it goes.
SPOOL_BYTES = 64 << 20
# The position split notes (characters, bytes) this often, to find its cut without a reread.
_MARK_BYTES = 16 << 20
_WRITE_BUFFER = 1 << 20


def prepare_stage(cfg) -> CorpusStats | RecordStats:
    """Run the prepare stage for config ``cfg``; write ``paths.prepared`` and return the counts.

    Writes ``train.txt`` and ``val.txt`` (see ``lmforge.tokenization.chunks``), or for
    ``data.format=chat|prompt_completion`` ``train.jsonl`` and ``val.jsonl`` (``lmforge.corpus.records``), into
    ``paths.prepared`` and the counts into ``paths.reports/prepare.json``. On any error nothing
    is written and the previous output stays as it was.
    """
    report = Path(cfg.paths.reports) / "prepare.json"
    check_writable(("paths.prepared", cfg.paths.prepared), ("paths.reports", report))
    data = cfg.data
    val_fraction = float(checked(cfg, "data.val_fraction"))
    if data.split not in ("position", "document"):
        raise LmforgeError(f"data.split='{data.split}' is not one of position, document.")
    form = check_normal_form(data.normalize)
    engine_of(data)
    min_chars = int(data.min_chars)
    files = resolve_sources(data.sources)
    if is_record_format(data.format):
        return _prepare_records(cfg, files, report, val_fraction, form)
    formats = [file_format(path, str(data.format)) for path in files]
    options = ReadOptions(data, warn)
    stats = CorpusStats(files=len(files))

    with progress_bar(sum(f.stat().st_size for f in files), "prepare") as bar, \
            atomic_path(cfg.paths.prepared, directory=True) as out_dir:
        if data.split == "position":
            splits = PositionSplit(out_dir, str(data.join), val_fraction)
        else:
            splits = DocumentSplit(out_dir, val_fraction)
        try:
            documents = Documents(splits, stats, form, min_chars, bool(data.dedupe))
            # Read here, streaming, unless the engine is Ray (corpus.batches): a task holds whole documents,
            # where this process streams a long one in pieces, so the local engine reads here, not in a pool.
            with open_engine(data, read_function(data), "prepare", pool=False) as engine:
                if engine.in_process:
                    read_sources(documents, files, formats, options, stats, bar.update)
                else:
                    read_on_engine(engine, data, files, formats, documents, bar.update)
            if stats.documents_out == 0:
                raise LmforgeError(
                    f"the corpus is empty after cleaning ({stats.documents_in} documents read from {len(files)} "
                    f"files of data.sources, {stats.dropped_short} too short, {stats.duplicates} duplicates); "
                    "point data.sources at non-empty text or lower data.min_chars."
                )
            splits.finish(stats)
        finally:
            splits.close()
    write_json(report, asdict(stats))
    print(f"prepare: {stats.documents_in:,} documents in ({stats.bytes_in / 1e6:,.1f} MB), "
          f"{stats.duplicates:,} duplicates, {stats.dropped_short:,} too short; "
          f"train {stats.train_chars:,} chars, val {stats.val_chars:,} chars")
    return stats


def _prepare_records(cfg, files: list, report: Path, val_fraction: float, form: str | None) -> RecordStats:
    """data.format=chat|prompt_completion: the records of ``files`` to ``train.jsonl``/``val.jsonl``
    (``lmforge.corpus.records``), read in this process whatever data.engine says."""
    formats = [file_format(path, "auto") for path in files]
    with progress_bar(sum(f.stat().st_size for f in files), "prepare") as bar, \
            atomic_path(cfg.paths.prepared, directory=True) as out_dir:
        stats = prepare_records(cfg.data, files, formats, out_dir, val_fraction, form, bar)
    write_json(report, asdict(stats))
    print(f"prepare: {stats.records_in:,} {stats.format} records in, {stats.bad_records:,} bad, "
          f"{stats.duplicates:,} duplicates; train {stats.train_records:,}, val {stats.val_records:,} records")
    return stats


def _empty_split(name: str, stats: CorpusStats) -> LmforgeError:
    return LmforgeError(
        f"the {name} split is empty ({stats.documents_out} documents kept); "
        "add documents or change data.val_fraction (or use data.split=position)."
    )


class PositionSplit:
    """nanoGPT's split: the documents joined by ``data.join`` into one text, whose first
    ``1 - val_fraction`` of the characters are train and the rest val.

    The joined text is written once to a temporary file; at the end the val part is copied out and
    the file, truncated at the cut, becomes ``train.txt``. Each split is then one document.
    """

    def __init__(self, directory: Path, join: str, val_fraction: float):
        self.directory = directory
        self.path = directory / "joined.tmp"
        self.file = open(self.path, "wb", buffering=_WRITE_BUFFER)
        self.join, self.join_data = join, join.encode("utf-8")
        self.val_fraction = val_fraction
        self.chars = self.bytes = self.documents = 0
        self.marks = [(0, 0)]  # (characters, bytes) at points spread through the file
        self._undo = None

    def add(self, chars: int, data: bytes, digest: bytes) -> None:
        if self.documents:
            self.file.write(self.join_data)
            self.chars += len(self.join)
            self.bytes += len(self.join_data)
        self.file.write(data)
        self.chars += chars
        self.bytes += len(data)
        self.documents += 1
        if self.bytes - self.marks[-1][1] >= _MARK_BYTES:
            self.marks.append((self.chars, self.bytes))

    def begin(self) -> None:
        self._undo = (self.chars, self.bytes, len(self.marks))
        if self.documents:
            self.file.write(self.join_data)
            self.chars += len(self.join)
            self.bytes += len(self.join_data)

    def write(self, chars: int, data: bytes) -> None:
        self.file.write(data)
        self.chars += chars
        self.bytes += len(data)
        if self.bytes - self.marks[-1][1] >= _MARK_BYTES:
            self.marks.append((self.chars, self.bytes))

    def commit(self, digest: bytes) -> None:
        self.documents += 1
        self._undo = None

    def abort(self) -> None:
        if self._undo is None:
            return
        self.chars, self.bytes, marks = self._undo
        del self.marks[marks:]
        self.file.seek(self.bytes)
        self.file.truncate()
        self._undo = None

    def close(self) -> None:
        self.file.close()

    def finish(self, stats: CorpusStats) -> None:
        self.file.close()
        # The same arithmetic as nanoGPT's prepare.py, so the default corpus splits identically.
        cut = int(self.chars * (1.0 - self.val_fraction))
        cut_byte = self._byte_offset(cut)
        for name, chars, size in (("train", cut, cut_byte), ("val", self.chars - cut, self.bytes - cut_byte)):
            if chars == 0:
                raise _empty_split(name, stats)
            setattr(stats, f"{name}_documents", 1)
            setattr(stats, f"{name}_chars", chars)
            setattr(stats, f"{name}_bytes", size)
        with open(self.path, "r+b") as joined, open(self.directory / "val.txt", "wb") as val:
            joined.seek(cut_byte)
            shutil.copyfileobj(joined, val, _WRITE_BUFFER)
            joined.truncate(cut_byte)
        os.replace(self.path, self.directory / "train.txt")

    def _byte_offset(self, chars: int) -> int:
        """The byte offset in the joined file of character number ``chars``."""
        mark_chars, offset = self.marks[bisect.bisect_right(self.marks, (chars, float("inf"))) - 1]
        need = chars - mark_chars
        decoder = codecs.getincrementaldecoder("utf-8")()
        with open(self.path, "rb") as f:
            f.seek(offset)
            while need > 0:
                text = decoder.decode(f.read(1 << 20))
                if len(text) >= need:
                    return offset + len(text[:need].encode("utf-8"))
                offset += len(text.encode("utf-8"))
                need -= len(text)
        return offset


class DocumentSplit:
    """Each document wholly to val when its content digest falls below ``val_fraction``, else to train.

    A document's split depends on its text alone, so adding documents never moves existing ones.
    """

    def __init__(self, directory: Path, val_fraction: float):
        self.directory = directory
        self.val_fraction = val_fraction
        self.files = {name: open(directory / f"{name}.txt", "wb", buffering=_WRITE_BUFFER) for name in SPLITS}
        self.counts = {name: [0, 0, 0] for name in SPLITS}  # documents, chars, bytes
        self._spool = None
        self._spool_chars = 0

    def _split_of(self, digest: bytes) -> str:
        return "val" if int.from_bytes(digest[:8], "big") / 2**64 < self.val_fraction else "train"

    def add(self, chars: int, data: bytes, digest: bytes) -> None:
        name = self._split_of(digest)
        counts = self.counts[name]
        if counts[0]:
            self.files[name].write(_SEPARATOR_DATA)
        self.files[name].write(data)
        counts[0] += 1
        counts[1] += chars
        counts[2] += len(data)

    def begin(self) -> None:
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, dir=self.directory)
        self._spool_chars = 0

    def write(self, chars: int, data: bytes) -> None:
        self._spool.write(data)
        self._spool_chars += chars

    def commit(self, digest: bytes) -> None:
        name = self._split_of(digest)
        counts = self.counts[name]
        if counts[0]:
            self.files[name].write(_SEPARATOR_DATA)
        counts[0] += 1
        counts[1] += self._spool_chars
        counts[2] += self._spool.tell()
        self._spool.seek(0)
        shutil.copyfileobj(self._spool, self.files[name], _WRITE_BUFFER)
        self.abort()

    def abort(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def close(self) -> None:
        self.abort()
        for file in self.files.values():
            file.close()

    def finish(self, stats: CorpusStats) -> None:
        for name in SPLITS:
            self.files[name].close()
            documents, chars, size = self.counts[name]
            if documents == 0:
                raise _empty_split(name, stats)
            setattr(stats, f"{name}_documents", documents)
            setattr(stats, f"{name}_chars", chars)
            setattr(stats, f"{name}_bytes", size)


_SEPARATOR_DATA = DOC_SEPARATOR.encode("ascii")
