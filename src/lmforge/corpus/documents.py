"""One document's journey through the prepare stage's rules: read, cleaned, too short or kept, duplicate or not.

``Documents`` applies the rules and passes each kept document to a split writer (``add``, or
``begin``/``write``/``commit``/``abort`` for a long one in pieces); ``read_file`` feeds it one source
file, ``read_sources`` all of them (the loop ``lmforge evaluate --data`` shares). Both engines use
them: the local one in the stage's process, the Ray one inside its tasks (``lmforge.corpus.batches``),
where the deduplication is left to the stage's process.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from lmforge.corpus.cleaning import clean
from lmforge.corpus.reading import BadSource, ReadOptions, read_documents, skipped


@dataclass
class CorpusStats:
    """The prepare stage's counts (``reports/prepare.json``)."""

    files: int = 0
    skipped_files: int = 0
    documents_in: int = 0
    bytes_in: int = 0
    documents_out: int = 0
    bytes_out: int = 0
    duplicates: int = 0
    dropped_short: int = 0
    train_documents: int = 0
    train_bytes: int = 0
    train_chars: int = 0
    val_documents: int = 0
    val_bytes: int = 0
    val_chars: int = 0


def warn(message: str) -> None:
    """A warning line on stderr that does not break a progress bar."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def read_file(documents: Documents, path, fmt: str, compression: str | None, options: ReadOptions,
              advance) -> BadSource | None:
    """Pass the documents of one source file to ``documents``; return the file's error, if any.

    On an error the document being read is dropped (those before it stay, as they were taken).
    Both engines call this: the local one here, the Ray one inside its tasks.
    """
    try:
        for document in read_documents(path, fmt, compression, options, advance):
            documents.take(document)
    except BadSource as err:
        documents.abort()
        return err
    return None


def read_sources(sink, files: list, formats: list, options: ReadOptions, stats: CorpusStats, advance) -> None:
    """The one reading loop, for the prepare stage's local engine and for ``lmforge evaluate
    --data``: every document of ``files`` (with their ``formats``), in order, to ``sink.take``
    (``sink.abort`` drops a document a bad file cut short); a bad file is raised, or warned about
    and counted in ``stats`` when ``data.skip_bad_files`` is set."""
    for path, (fmt, compression) in zip(files, formats):
        skip_or_raise(read_file(sink, path, fmt, compression, options, advance), path, options, stats)


def clean_pieces(document, form: str | None) -> Iterator[tuple[str, bytes, int]]:
    """A document's pieces through ``cleaning.clean``: (text, UTF-8 bytes, bytes read) each."""
    for piece in document:
        yield clean(*piece, form)


def skip_or_raise(bad: BadSource | None, path, options: ReadOptions, stats: CorpusStats) -> None:
    """A file's error raised, or (``data.skip_bad_files=true``) warned about and counted as skipped."""
    if bad is None:
        return
    if not options.skip_bad_files:
        raise bad
    warn(f"skipped {path}: {skipped(bad)}")
    stats.skipped_files += 1


class Documents:
    """Cleans, filters and deduplicates documents, passing the kept ones to the splits."""

    def __init__(self, splits, stats: CorpusStats, form: str | None, min_chars: int, dedupe: bool):
        self.splits = splits
        self.stats = stats
        self.form = form
        self.min_chars = min_chars
        self.dedupe = dedupe
        self.seen: set[bytes] = set()

    def take(self, document) -> None:
        stats = self.stats
        stats.documents_in += 1
        if type(document) is tuple and len(document) == 1:  # the common case: a document in one piece
            text, data, size_in = clean(*document[0], self.form)
            stats.bytes_in += size_in
            if self._too_short(len(text), text.isspace() or not text):
                return
            self.keep(len(text), data, hashlib.blake2b(data, digest_size=16).digest())
        else:
            self._take_long(document)

    def abort(self) -> None:
        """Drop the document being read (its file turned out bad)."""
        self.splits.abort()

    def keep(self, chars: int, data: bytes, digest: bytes) -> None:
        """A cleaned document long enough to keep: to its split unless it is a duplicate."""
        if self._duplicate(digest):
            return
        self.splits.add(chars, data, digest)
        self.stats.documents_out += 1
        self.stats.bytes_out += len(data)

    def _take_long(self, pieces) -> None:
        stats = self.stats
        digest = hashlib.blake2b(digest_size=16)
        chars = size_out = 0
        blank = True
        self.splits.begin()
        for text, data, size_in in clean_pieces(pieces, self.form):
            stats.bytes_in += size_in
            chars += len(text)
            size_out += len(data)
            blank = blank and (text.isspace() or not text)
            digest.update(data)
            self.splits.write(len(text), data)
        if self._too_short(chars, blank) or self._duplicate(digest.digest()):
            self.splits.abort()
            return
        self.splits.commit(digest.digest())
        stats.documents_out += 1
        stats.bytes_out += size_out

    def _too_short(self, chars: int, blank: bool) -> bool:
        if chars < self.min_chars or blank:
            self.stats.dropped_short += 1
            return True
        return False

    def _duplicate(self, digest: bytes) -> bool:
        if not self.dedupe:
            return False
        if digest in self.seen:
            self.stats.duplicates += 1
            return True
        self.seen.add(digest)
        return False
