"""The prepared splits read back for tokenization: chunks of about a megabyte, never whole, cut
only where no tokenizer of ours splits the text differently on either side.

The files themselves (``train.txt``, ``val.txt``, documents separated by ``DOC_SEPARATOR``; or
``train.jsonl``, ``val.jsonl`` of records for data.format=chat|prompt_completion, read back whole by
``iter_records``) are written by the prepare stage (``lmforge.corpus``); their names are ``config.paths``'.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path

import orjson

from lmforge.config.paths import DOC_SEPARATOR, RECORDS_META, records_file
from lmforge.errors import LmforgeError

# Characters per chunk handed to a tokenizer (and per piece of a long document).
CHUNK_CHARS = 1 << 20
_READ_BYTES = 4 << 20


def iter_chunks(path: str | Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Stream a prepared split as text chunks of at most about ``chunk_chars`` characters.

    Chunks may hold several documents (with their separators). Each chunk ends just after a
    separator or at a cut ``is_safe_cut`` allows, where no tokenizer of ours (byte-level BPE's
    pre-tokenizer included) splits the text differently on either side: encoding the chunks one
    by one gives the ids of encoding each document whole. Only where a whole chunk's worth of
    text offers no such place (e.g. one line longer than ``chunk_chars``) is it cut elsewhere,
    which may change how the text around that one cut is tokenized but never the text itself.
    """
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path} not found; run the prepare stage first (dvc repro prepare).")
    decoder = codecs.getincrementaldecoder("utf-8")()
    buffer = ""
    with open(path, "rb") as f:
        while True:
            block = f.read(_READ_BYTES)
            buffer += decoder.decode(block, final=not block)
            start = 0
            while len(buffer) - start > chunk_chars:
                cut = safe_cut(buffer, start, start + chunk_chars)
                yield buffer[start:cut]
                start = cut
            buffer = buffer[start:]
            if not block:
                break
    if buffer:
        yield buffer


def is_safe_cut(text: str, position: int) -> bool:
    """Whether ``text`` may be cut before ``position`` without changing how any of our tokenizers
    splits it: just after a lone newline (no whitespace right before it) and before a character
    that is not whitespace.

    (Byte-level BPE's pre-tokenizer keeps the last character of a whitespace run apart when a
    non-space follows, "\n\nA" is "\n" "\n" "A", so a longer run must not end a chunk.)
    """
    return (1 < position < len(text) and text[position - 1] == "\n"
            and not text[position].isspace() and not text[position - 2].isspace())


def safe_cut(text: str, start: int, end: int) -> int:
    """A cut position in ``text[start + 1 : end + 1]`` (see ``iter_chunks``), as late as possible."""
    separator = text.rfind(DOC_SEPARATOR, start, end)
    if separator >= 0:
        return separator + 1
    newline = text.rfind("\n", start, end)
    while newline >= 0 and not is_safe_cut(text, newline + 1):
        newline = text.rfind("\n", start, newline)
    if newline >= 0:
        return newline + 1
    newline = text.rfind("\n", start, end)
    return newline + 1 if newline >= 0 else end


def iter_pieces(path: str | Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Stream the text of a prepared split in pieces of at most ``chunk_chars``, no separators.

    A long document comes as several pieces (cut as in ``iter_chunks``): what tokenizer
    training and measuring need, in bounded memory.
    """
    for chunk in iter_chunks(path, chunk_chars):
        for piece in chunk.split(DOC_SEPARATOR):
            if piece:
                yield piece


def iter_split(path: str | Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Stream the documents of a prepared split file (``train.txt``/``val.txt``), each whole."""
    parts: list[str] = []
    for chunk in iter_chunks(path, chunk_chars):
        *complete, last = chunk.split(DOC_SEPARATOR)
        for part in complete:
            parts.append(part)
            yield "".join(parts)
            parts = []
        parts.append(last)
    if any(parts):
        yield "".join(parts)


def prepared_format(prepared: str | Path) -> str:
    """``text`` for plain-text splits, or the records format (``chat``, ``prompt_completion``) that
    ``records.json`` names (data.format=chat|prompt_completion, ``lmforge.corpus.records``)."""
    meta = Path(prepared) / RECORDS_META
    if not meta.is_file():
        return "text"
    try:
        return str(json.loads(meta.read_text(encoding="utf-8"))["format"])
    except (ValueError, KeyError, TypeError):
        raise LmforgeError(f"{meta} is corrupt; rerun the prepare stage (dvc repro prepare).") from None


def iter_records(prepared: str | Path, split: str) -> Iterator[dict]:
    """The records of a prepared split (``train.jsonl``/``val.jsonl``), in order."""
    path = Path(prepared) / records_file(split)
    if not path.is_file():
        raise LmforgeError(f"{path} not found; run the prepare stage first (dvc repro prepare).")
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)
