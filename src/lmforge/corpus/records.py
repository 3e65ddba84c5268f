"""Conversation records: ``data.format=chat`` and ``data.format=prompt_completion`` JSONL read,
checked, cleaned, deduplicated and split into ``train.jsonl`` and ``val.jsonl``.

A ``chat`` line is ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
(the OpenAI/Hugging Face convention), with at least one assistant message whose content is not
blank; a ``prompt_completion`` line is ``{"prompt": "...", "completion": "..."}`` with a
non-blank completion. Other keys are ignored. A line that is not such a record stops the stage
with one sentence naming its file and line, or, with ``data.skip_bad_records=true``, is skipped
and counted (``bad_records`` in ``reports/prepare.json``). Contents are cleaned as documents are
(``lmforge.corpus.cleaning``: LF line ends, no control characters, ``data.normalize``).

The prepared files hold one canonical record per line (``messages`` with only role and content,
or prompt and completion) and ``records.json`` names the format; the chat template, the loss
mask and the packing into blocks are the tokenize stage's (``lmforge.tokenization.packing``).
The split is by record: ``data.split=position`` puts the last ``val_fraction`` of the records
(in reading order) in val, ``document`` each record by the hash of its content.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from lmforge.config.paths import RECORD_FORMATS, RECORDS_META, SPLITS, records_file
from lmforge.corpus.cleaning import clean
from lmforge.corpus.documents import warn
from lmforge.corpus.reading import BLOCK_BYTES, UTF8_BOM, BadSource, _Source
from lmforge.errors import LmforgeError
from lmforge.outputs import write_json

ROLES = ("system", "user", "assistant")
# A line longer than this is refused rather than held in memory (no real conversation is this long).
MAX_RECORD_BYTES = 64 << 20
_SKIP_ADVICE = " (or set data.skip_bad_records=true to skip such lines)"


class BadRecord(BadSource):
    """One line of a records file that is not a record of the configured format."""


@dataclass
class RecordStats:
    """The prepare stage's counts for records (``reports/prepare.json``)."""

    format: str = ""
    files: int = 0
    records_in: int = 0
    bad_records: int = 0
    duplicates: int = 0
    records_out: int = 0
    bytes_in: int = 0
    train_records: int = 0
    val_records: int = 0
    train_bytes: int = 0
    val_bytes: int = 0
    assistant_messages: int = 0


def parse_record(line: bytes | str, fmt: str, where: str, form: str | None = "NFC") -> dict:
    """The canonical record of one JSONL ``line`` of format ``fmt``; BadRecord naming ``where``
    (``<file> line <n>``) when it is not one. Contents are cleaned (``lmforge.corpus.cleaning``)."""
    line = line.removeprefix(UTF8_BOM) if isinstance(line, bytes) else line.removeprefix("\ufeff")
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as err:
        reason = str(err).splitlines()[0]
        raise BadRecord(f"{where} is not valid JSON ({reason}); fix the line{_SKIP_ADVICE}.") from None
    if not isinstance(record, dict):
        raise BadRecord(f"{where} is a JSON {type(record).__name__}, not an object; "
                        f"{_expected(fmt)}{_SKIP_ADVICE}.")
    if fmt == "chat":
        return {"messages": _messages(record, where, form)}
    prompt, completion = record.get("prompt"), record.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
            held = "nothing" if value is None else type(value).__name__
            raise BadRecord(f"{where} field '{name}' holds {held}, not text; {_expected(fmt)}{_SKIP_ADVICE}.")
    prompt, completion = _clean(prompt, form), _clean(completion, form)
    if not completion.strip():
        raise BadRecord(f"{where} has a blank completion, so nothing to learn; give it text{_SKIP_ADVICE}.")
    return {"prompt": prompt, "completion": completion}


def _messages(record: dict, where: str, form: str | None) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"{where} has no 'messages' list; {_expected('chat')}{_SKIP_ADVICE}.")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecord(f"{where} messages[{i}] is not an object; {_expected('chat')}{_SKIP_ADVICE}.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRecord(f"{where} messages[{i}] has role {role!r}, not one of {', '.join(ROLES)}; "
                            f"fix the role{_SKIP_ADVICE}.")
        if not isinstance(content, str):
            held = "nothing" if content is None else type(content).__name__
            raise BadRecord(f"{where} messages[{i}].content holds {held}, not text; "
                            f"give each message a string 'content'{_SKIP_ADVICE}.")
        out.append({"role": role, "content": _clean(content, form)})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise BadRecord(f"{where} has no assistant message with text, so nothing to learn; "
                        f"add the assistant's reply{_SKIP_ADVICE}.")
    return out


def _expected(fmt: str) -> str:
    if fmt == "chat":
        return 'data.format=chat expects {"messages": [{"role": ..., "content": ...}, ...]} per line'
    return 'data.format=prompt_completion expects {"prompt": ..., "completion": ...} per line'


def _clean(text: str, form: str | None) -> str:
    return clean(text, None, form)[0]


def read_records(path, compression: str | None, fmt: str, form: str | None, skip_bad: bool,
                 stats: RecordStats, advance) -> Iterator[dict]:
    """The records of one JSONL file (compressed or not), in order; a bad line raises BadRecord,
    or with ``skip_bad`` is counted in ``stats.bad_records`` (one warning per file)."""
    skipped: list[str] = []
    with _Source(path, compression, advance) as source:
        for number, line in _lines(path, source):
            if not line.strip():
                continue
            stats.records_in += 1
            stats.bytes_in += len(line)
            try:
                yield parse_record(line, fmt, f"{path} line {number}", form)
            except BadRecord as err:
                if not skip_bad:
                    raise
                stats.bad_records += 1
                skipped.append(str(err).replace(_SKIP_ADVICE, ""))
    if skipped:
        warn(f"skipped {len(skipped)} bad record(s) of {path}; the first: {skipped[0]}")


def _lines(path, source) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line, CRLF taken as LF; a line over MAX_RECORD_BYTES is refused."""
    pending = b""
    number = 0
    first = True
    while True:
        block = source.read(BLOCK_BYTES)
        if first and block.startswith(UTF8_BOM):
            block = block[len(UTF8_BOM):]
        first = False
        lines = (pending + block).split(b"\n")
        pending = lines.pop()
        if len(pending) > MAX_RECORD_BYTES:
            raise BadSource(f"{path} line {number + len(lines) + 1} is longer than {MAX_RECORD_BYTES >> 20} MiB; "
                            "split the conversation or remove the line from the file.")
        for line in lines:
            number += 1
            yield number, line.removesuffix(b"\r")
        if not block:
            if pending:
                yield number + 1, pending.removesuffix(b"\r")
            return


# --- the prepare stage's part for records ---------------------------------------------------


def prepare_records(data, files: list, formats: list, out_dir: Path, val_fraction: float, form: str | None,
                    bar) -> RecordStats:
    """Read every record of ``files``, dedupe, split and write ``train.jsonl``, ``val.jsonl`` and
    ``records.json`` into ``out_dir``; return the counts. ``formats``: (file format, compression)."""
    fmt = str(data.format)
    stats = RecordStats(format=fmt, files=len(files))
    split = str(data.split)
    seen: set[bytes] = set()
    kept: list[tuple[bytes, bytes]] = []  # (line, digest): the position split needs the count first
    for path, (file_fmt, compression) in zip(files, formats):
        if file_fmt == "parquet":
            raise LmforgeError(f"{path} is Parquet, but data.format={fmt} reads JSONL records; "
                               "convert it to JSONL (one record per line) or remove it from data.sources.")
        for record in read_records(path, compression, fmt, form, bool(data.get("skip_bad_records", False)),
                                   stats, bar.update):
            line = orjson.dumps(record)
            digest = hashlib.blake2b(line, digest_size=16).digest()
            if bool(data.dedupe) and digest in seen:
                stats.duplicates += 1
                continue
            seen.add(digest)
            turns = record.get("messages", [{"role": "assistant"}])  # a completion is one
            stats.assistant_messages += sum(m["role"] == "assistant" for m in turns)
            kept.append((line, digest))
    stats.records_out = len(kept)
    if not kept:
        raise LmforgeError(f"no records were kept ({stats.records_in} read from {len(files)} files of data.sources, "
                           f"{stats.bad_records} bad, {stats.duplicates} duplicates); point data.sources at "
                           f"{fmt} JSONL files.")
    if split == "position":
        cut = len(kept) - max(1, math.ceil(len(kept) * val_fraction))
        choose = [("train" if i < cut else "val") for i in range(len(kept))]
    else:
        choose = ["val" if int.from_bytes(d[:8], "big") / 2**64 < val_fraction else "train" for _, d in kept]
    for name in SPLITS:
        lines = [line for (line, _), which in zip(kept, choose) if which == name]
        if not lines:
            raise LmforgeError(f"the {name} split has no records ({len(kept)} kept); add records or change "
                               "data.val_fraction (data.split=position always gives val at least one).")
        payload = b"\n".join(lines) + b"\n"
        (out_dir / records_file(name)).write_bytes(payload)
        setattr(stats, f"{name}_records", len(lines))
        setattr(stats, f"{name}_bytes", len(payload))
    write_json(out_dir / RECORDS_META, {"format": fmt, "records": asdict(stats)})
    return stats


def is_record_format(fmt: str) -> bool:
    """Whether ``data.format`` names records (chat, prompt_completion) rather than a file format."""
    return str(fmt) in RECORD_FORMATS
