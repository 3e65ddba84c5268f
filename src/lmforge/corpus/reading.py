"""Reading documents out of source files: plain text, JSONL and Parquet, compressed or not.

A document comes out as a sequence of *pieces* ``(text, data)``: ``text`` decoded from UTF-8
(byte-order mark dropped) and ``data`` its exact UTF-8 bytes when the reader has them for free
(else None). A small document is a one-piece tuple; a plain-text file larger than one read block
is a generator of pieces cut after line ends, so a 100 GB file never sits in memory.

Errors name the file and the line or byte offset. Problems with one file or record raise
``BadSource``, which the prepare stage turns into a warning and a skip when
``data.skip_bad_files=true``.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import orjson

from lmforge.errors import LmforgeError

# Bytes read at a time; a plain-text file that does not fit in one block is streamed in pieces.
BLOCK_BYTES = 16 << 20
UTF8_BOM = b"\xef\xbb\xbf"
# Binary files are told from text by a NUL byte near the start (text never has one).
_SNIFF_BYTES = 8192
_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
          b"%PDF": "a PDF document", b"PK\x03\x04": "a ZIP archive", b"\x7fELF": "an executable"}

Piece = tuple[str, "bytes | None"]
Document = Sequence[Piece] | Iterator[Piece]


class BadSource(LmforgeError):
    """A source file (or one record of it) that cannot be read as configured."""


def skipped(bad: BadSource | str) -> str:
    """``bad``'s sentence for the warning of a file or line that ``data.skip_bad_files=true`` skipped:
    without its advice to set what is already set."""
    return re.sub(r",? ?\(?or (set )?data\.skip_bad_files=true to skip [^.)]*\)?", "", str(bad))


class ReadOptions:
    """The ``data.*`` keys that decide how files are read."""

    def __init__(self, data_cfg, warn: Callable[[str], None]):
        self.decode_errors = str(data_cfg.decode_errors)
        if self.decode_errors not in ("strict", "replace"):
            raise LmforgeError(f"data.decode_errors='{self.decode_errors}' is not one of strict, replace.")
        self.text_field = str(data_cfg.text_field)
        self.column = str(data_cfg.column)
        self.skip_bad_files = bool(data_cfg.skip_bad_files)
        self.warn = warn


def read_documents(path: Path, fmt: str, compression: str | None, options: ReadOptions,
                   advance: Callable[[int], None]) -> Iterator[Document]:
    """Yield the documents of one source file; ``advance(n)`` reports ``n`` more bytes of the file read.

    Text files are one document each; JSONL files one per line; Parquet files one per row.
    """
    if fmt == "parquet":
        yield from _parquet_documents(path, options, advance)
        return
    with _Source(path, compression, advance) as source:
        first = source.read(BLOCK_BYTES)
        if not first or first == UTF8_BOM:
            raise BadSource(f"{path} is empty; add text to it or remove it from data.sources.")
        offset = 0
        if first.startswith(UTF8_BOM):
            first, offset = first[len(UTF8_BOM):], len(UTF8_BOM)
        _refuse_binary(path, first)
        if fmt == "jsonl":
            yield from _jsonl_documents(path, source, first, offset, options)
        else:
            rest = source.read(BLOCK_BYTES)
            if not rest:
                yield (_decode(first, path, offset, options.decode_errors),)
            else:
                yield _text_pieces(path, source, first + rest, offset, options.decode_errors)


def _refuse_binary(path: Path, head: bytes) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise BadSource(
            f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark); convert it to UTF-8 "
            "(e.g. iconv -f UTF-16 -t UTF-8) or set data.skip_bad_files=true to skip it."
        )
    nul = head.find(b"\x00", 0, _SNIFF_BYTES)
    if nul >= 0:
        kind = next((name for magic, name in _MAGIC.items() if head.startswith(magic)), "a binary file")
        raise BadSource(
            f"{path} is {kind}, not text (NUL byte at offset {nul}); remove it from data.sources "
            "or set data.skip_bad_files=true to skip such files."
        )


def _decode(data: bytes, path: Path, offset: int, errors: str, where: str = "") -> Piece:
    """UTF-8 ``data`` (found at byte ``offset`` of ``path``) as a piece; BadSource naming the offset."""
    try:
        return data.decode("utf-8"), data
    except UnicodeDecodeError as err:
        if errors == "replace":
            return data.decode("utf-8", "replace"), None
        raise BadSource(
            f"{path} is not valid UTF-8 at byte offset {offset + err.start}{where}; convert it to UTF-8, "
            "or set data.decode_errors=replace (or data.skip_bad_files=true to skip it)."
        ) from None


def _text_pieces(path: Path, source: _Source, buffer: bytes, offset: int, errors: str) -> Iterator[Piece]:
    """The pieces of a large text file, each cut after a line end so cleaning never sees half a line."""
    while True:
        block = source.read(BLOCK_BYTES)
        if not block:
            yield _decode(buffer, path, offset, errors)
            return
        cut = _line_cut(buffer)
        yield _decode(buffer[:cut], path, offset, errors)
        offset += cut
        buffer = buffer[cut:] + block


def _line_cut(data: bytes) -> int:
    """Where to cut ``data`` (more follows it): after its last line end, else before its last character."""
    cut = data.rfind(b"\n") + 1
    if cut > 0:
        return cut
    # One line longer than a block: cut between characters (never inside one), and not between
    # the \r and \n of a line end.
    cut = len(data) - 1
    while cut > 1 and (0x80 <= data[cut] < 0xC0 or data[cut - 1] == 0x0D):
        cut -= 1
    return cut


def _jsonl_documents(path: Path, source: _Source, block: bytes, offset: int,
                     options: ReadOptions) -> Iterator[Document]:
    field = options.text_field
    pending = b""
    line_number = 0
    bad: list[str] = []
    while block:
        lines = (pending + block).split(b"\n")
        pending = lines.pop()
        for line in lines:
            line_number += 1
            start, offset = offset, offset + len(line) + 1
            if not line or line.isspace():
                continue
            try:
                text = _json_text(line, field, path, line_number, start, options.decode_errors)
            except BadSource as err:
                if not options.skip_bad_files:
                    raise
                bad.append(str(err))
                continue
            yield ((text, None),)
        block = source.read(BLOCK_BYTES)
        if not block and pending:
            block, pending = pending + b"\n", b""
    if bad:
        options.warn(f"skipped {len(bad)} bad line(s) of {path}; the first: {skipped(bad[0])}")


def _json_text(line: bytes, field: str, path: Path, line_number: int, offset: int, errors: str) -> str:
    where = f"{path} line {line_number}"
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as err:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as bad_utf8:
            if errors != "replace":
                raise BadSource(
                    f"{where} is not valid UTF-8 at byte offset {offset + bad_utf8.start}; convert the file to UTF-8, "
                    "or set data.decode_errors=replace (or data.skip_bad_files=true to skip bad lines)."
                ) from None
            return _json_text(line.decode("utf-8", "replace").encode("utf-8"), field, path, line_number, offset, errors)
        raise BadSource(
            f"{where} is not valid JSON ({str(err).splitlines()[0]}); fix the line, "
            "or set data.skip_bad_files=true to skip bad lines."
        ) from None
    text = record.get(field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        if isinstance(record, dict) and field in record:
            problem = f"field '{field}' holds {type(text).__name__}, not text"
        elif isinstance(record, dict):
            problem = f"has no field '{field}' (its fields: {', '.join(map(str, record)) or 'none'})"
        else:
            problem = f"is a JSON {type(record).__name__}, not an object with a '{field}' field"
        raise BadSource(f"{where} {problem}; set data.text_field to the field that holds the text.")
    return text


def _parquet_documents(path: Path, options: ReadOptions, advance: Callable[[int], None]) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path if isinstance(path, Path) else path.open("rb"))
    except (pa.ArrowException, OSError) as err:
        raise BadSource(
            f"{path} is not a readable Parquet file ({str(err).splitlines()[0]}); "
            "check the file or set data.skip_bad_files=true to skip it."
        ) from None
    schema = parquet.schema_arrow
    column = options.column
    if column not in schema.names:
        raise BadSource(
            f"{path} has no column '{column}' (its columns: {', '.join(schema.names)}); "
            "set data.column to the column that holds the text."
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise BadSource(f"{path} column '{column}' holds {kind}, not text; set data.column to a text column.")
    total_rows = max(1, parquet.metadata.num_rows)
    size = path.stat().st_size
    as_bytes = pa.large_binary() if pa.types.is_large_string(kind) or pa.types.is_large_binary(kind) else pa.binary()
    row = 0
    # Batches of rows, never the whole file: one batch of text is all that is held at a time.
    # Viewed as bytes, so invalid UTF-8 is reported by row like everywhere else.
    for batch in parquet.iter_batches(batch_size=1024, columns=[column]):
        values = batch.column(0).view(as_bytes).to_pylist()
        for value in values:
            row += 1
            if value is None:
                yield (("", None),)
            else:
                yield (_decode(value, path, 0, options.decode_errors, where=f" (row {row}, column '{column}')"),)
        advance(size * len(values) // total_rows)
    if row == 0:
        raise BadSource(f"{path} has no rows; add data to it or remove it from data.sources.")


class _Source:
    """A source file opened for binary reading, decompressed; reports progress in file bytes."""

    def __init__(self, path: Path, compression: str | None, advance: Callable[[int], None]):
        self.path = path
        self.compression = compression
        self.advance = advance
        self.raw = path.open("rb")  # a Path, or a RemoteFile of lmforge.corpus.sources
        self._position = 0
        if compression == ".gz":
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif compression == ".bz2":
            self.stream = bz2.BZ2File(self.raw, mode="rb")
        elif compression == ".xz":
            self.stream = lzma.LZMAFile(self.raw, mode="rb")
        elif compression == ".zst":
            import zstandard

            self.stream = zstandard.ZstdDecompressor().stream_reader(self.raw, read_across_frames=True)
        else:
            self.stream = self.raw

    def read(self, size: int) -> bytes:
        try:
            data = self.stream.read(size)
        except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as err:
            raise BadSource(
                f"{self.path} is not a valid {self.compression or 'readable'} file ({err}); "
                "fix or remove it, or set data.skip_bad_files=true to skip it."
            ) from None
        except Exception as err:  # zstandard.ZstdError is not an OSError
            if type(err).__name__ != "ZstdError":
                raise
            raise BadSource(f"{self.path} is not a valid .zst file ({err}); fix or remove it.") from None
        position = self.raw.tell()
        self.advance(position - self._position)
        self._position = position
        return data

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc) -> None:
        if self.stream is not self.raw:
            self.stream.close()
        self.raw.close()
