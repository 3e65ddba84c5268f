"""Stage 3, tokenize: encode each prepared split into binary token shards that training memory-maps.

Layout of ``paths.tokens``::

    index.json               dtype, vocab size, end-of-text id, tokenizer hash, per-split counts
    train/shard_000000.bin   raw little-endian token ids (uint16 when the vocabulary fits)
    val/shard_000000.bin

Documents are separated by the tokenizer's end-of-text token. The stage streams: the main
process reads a split in chunks of about a megabyte (``lmforge.corpus.iter_chunks``), worker
processes (one per core, each loading the tokenizer once) encode them, and the main process
writes the ids in order, so memory stays flat whatever the corpus size.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import re
import string
import unicodedata
from collections import Counter, deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.outputs import atomic_path, write_json

INDEX_FILE = "index.json"
# A split smaller than this is encoded in the stage's own process: starting workers costs more.
_PARALLEL_MIN_BYTES = 4 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --- encoding --------------------------------------------------------------------------------

# The fast encoder splits text into pre-tokens with Python's `re`, using character classes built
# from unicodedata for the "checked" characters: U+0000-U+052F (Latin, IPA, Greek, Cyrillic) and
# U+2000-U+206F (General Punctuation: dashes, curly quotes, spaces), where the classes agree with
# the tokenizers' own Oniguruma regexes character by character (tests/test_tokens.py checks each).
# Other scripts may differ between the two libraries' Unicode versions, so a line holding any
# other character is encoded by the tokenizer itself.
CHECKED_RANGES = ((0x0000, 0x0530), (0x2000, 0x2070))
_BEYOND_CHECKED = re.compile(
    "[^" + "".join(f"{re.escape(chr(low))}-{re.escape(chr(high - 1))}" for low, high in CHECKED_RANGES) + "]")
# Distinct pre-tokens remembered per process before the memory is cleared and refilled.
_MAX_REMEMBERED = 1 << 20


def checked_characters() -> Iterator[str]:
    """Every character the fast path classifies itself (see CHECKED_RANGES)."""
    for low, high in CHECKED_RANGES:
        yield from map(chr, range(low, high))


def _char_class(predicate: Callable[[str], bool]) -> str:
    """The body of a regex character class: the checked characters for which ``predicate`` holds."""
    return "".join(re.escape(c) for c in checked_characters() if predicate(c))


_LETTER = _char_class(lambda c: unicodedata.category(c).startswith("L"))
_NUMBER = _char_class(lambda c: unicodedata.category(c).startswith("N"))
# Unicode's White_Space (what `\s` means to Oniguruma; Python's isspace adds \x1c-\x1f).
_SPACE = _char_class(lambda c: c in "\t\n\x0b\x0c\r \x85\xa0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                                    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f")
# HuggingFace's Punctuation pre-tokenizer: ASCII punctuation or a Unicode punctuation category.
_PUNCTUATION = _char_class(lambda c: c in string.punctuation or unicodedata.category(c).startswith("P"))
# GPT-2's pre-tokenizer pattern (HuggingFace's ByteLevel), with those classes for \s, \p{L}, \p{N}.
_BYTE_LEVEL_PATTERN = re.compile(
    rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{_LETTER}]+| ?[{_NUMBER}]+| ?[^{_SPACE}{_LETTER}{_NUMBER}]+"""
    rf"""|[{_SPACE}]+(?![^{_SPACE}])|[{_SPACE}]+"""
)
# The word tokenizer's pre-tokenizer (lmforge.vocab): newlines and punctuation marks are tokens,
# other whitespace only separates.
_WORD_PATTERN = re.compile(rf"\n|[{_PUNCTUATION}]|[^{_SPACE}{_PUNCTUATION}]+")


def _byte_level_alphabet() -> list[str]:
    """GPT-2's map from byte values to the printable characters byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


class _Remembered(dict):
    """Pre-token → its ids as uint32 bytes, computed by ``compute`` on first sight."""

    def __init__(self, compute: Callable[[str], list[int]]):
        super().__init__()
        self.compute = compute

    def __missing__(self, piece: str) -> bytes:
        ids = self[piece] = np.array(self.compute(piece), dtype=np.uint32).tobytes()
        return ids


_NO_ID = np.iinfo(np.uint32).max


class Encoder:
    """Text to token ids, exactly ``tokenizer.encode(text, add_special_tokens=False).ids``, faster.

    HuggingFace's pre-tokenizers are the slow part of encoding (byte-level BPE: 2-4 MB/s a core).
    For the three kinds of tokenizer our vocab stage builds, this encoder splits the text into
    pre-tokens with an equivalent Python regex and remembers the ids of each distinct pre-token,
    asking the tokenizer's own model only for new ones; a char tokenizer is a table lookup.
    Special tokens in the text are matched first, as the tokenizer does. Any other tokenizer.json
    is encoded by the tokenizer itself. tests/test_tokens.py checks equality with the tokenizer
    on arbitrary strings (hypothesis) for each kind.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        spec = json.loads(tokenizer.to_str())
        added = list(tokenizer.get_added_tokens_decoder().values())
        simple_added = all(not (t.lstrip or t.rstrip or t.single_word or t.normalized) for t in added)
        self.kind = _fast_kind(spec) if simple_added else "tokenizer"
        self._specials = None
        if added:
            contents = sorted((t.content for t in added), key=len, reverse=True)
            # Longest first: at one position the longest special token wins, as in the tokenizer.
            self._specials = re.compile("(" + "|".join(re.escape(c) for c in contents) + ")")
            self._special_ids = {t.content: tokenizer.token_to_id(t.content) for t in added}
        model = tokenizer.model
        if self.kind == "char":
            vocab = tokenizer.get_vocab(with_added_tokens=False)
            unk = spec["model"].get("unk_token")
            # Characters outside the vocabulary become <unk>, or are dropped when there is none.
            self._table = np.full(0x110000, vocab.get(unk, _NO_ID) if unk else _NO_ID, dtype=np.uint32)
            for token, token_id in vocab.items():
                if len(token) == 1:
                    self._table[ord(token)] = token_id
        elif self.kind == "byte_level":
            self._pattern = _BYTE_LEVEL_PATTERN
            alphabet = _byte_level_alphabet()
            self._ids = _Remembered(lambda piece: [
                token.id for token in model.tokenize("".join([alphabet[b] for b in piece.encode("utf-8")]))])
        elif self.kind == "word":
            self._pattern = _WORD_PATTERN
            vocab = tokenizer.get_vocab(with_added_tokens=False)
            unk_id = vocab[spec["model"]["unk_token"]]
            self._ids = _Remembered(lambda piece: [vocab.get(piece, unk_id)])
            self._normalizer = tokenizer.normalizer

    def encode(self, text: str) -> np.ndarray:
        """The ids of ``text`` as a uint32 array."""
        if self.kind == "tokenizer":
            return self._encode_by_tokenizer(text)
        if self._specials is None or not any(s in text for s in self._special_ids):
            return self._encode_plain(text)
        arrays = []
        for i, part in enumerate(self._specials.split(text)):
            if i % 2:
                arrays.append(np.array([self._special_ids[part]], dtype=np.uint32))
            elif part:
                arrays.append(self._encode_plain(part))
        return _joined(arrays)

    def _encode_plain(self, text: str) -> np.ndarray:
        """Ids of text without special tokens."""
        if self.kind == "char":
            ids = self._table[np.frombuffer(text.encode("utf-32-le"), dtype="<u4")]
            return ids[ids != _NO_ID]
        if self.kind == "word" and self._normalizer is not None:
            text = self._normalizer.normalize_str(text)
        if len(self._ids) > _MAX_REMEMBERED:
            self._ids.clear()
        arrays = [self._encode_checked(run) if checked else self._encode_by_tokenizer(run)
                  for checked, run in _runs(text)]
        return arrays[0] if len(arrays) == 1 else _joined(arrays)

    def _encode_checked(self, text: str) -> np.ndarray:
        return np.frombuffer(b"".join(map(self._ids.__getitem__, self._pattern.findall(text))), dtype=np.uint32)

    def _encode_by_tokenizer(self, text: str) -> np.ndarray:
        # For word, the text is normalised already: the tokenizer's Lowercase leaves it unchanged.
        return np.array(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.uint32)


def _runs(text: str) -> Iterator[tuple[bool, str]]:
    """``text`` as consecutive runs ``(checked, run)``: runs of checked characters only, and lines
    with characters beyond them (which the tokenizer itself must handle).

    The text is cut only where no pre-token can span the cut (see lmforge.corpus.iter_chunks).
    """
    if _BEYOND_CHECKED.search(text) is None:
        yield True, text
        return
    done = 0
    while (match := _BEYOND_CHECKED.search(text, done)) is not None:
        start, end = _line_around(text, match.start())
        while (following := _BEYOND_CHECKED.search(text, end)) is not None:
            next_start, next_end = _line_around(text, following.start())
            if next_start > end:
                break
            end = next_end
        if start > done:
            yield True, text[done:start]
        yield False, text[start:end]
        done = end
    if done < len(text):
        yield True, text[done:]


def count_byte_level_pre_tokens(texts: Iterable[str], pre_tokenizer) -> Counter:
    """How often each pre-token of byte-level BPE occurs in ``texts``, as BPE training counts them.

    The keys are in the byte-level alphabet (``Ġthe`` for `` the``), what the tokenizers
    library's ``pre_tokenizer`` (a ByteLevel one) yields; the same fast path as ``Encoder``, about
    ten times quicker than the library. No special tokens are split out, as in training.
    """
    raw: Counter = Counter()
    counts: Counter = Counter()
    for text in texts:
        for checked, run in _runs(text):
            if checked:
                raw.update(_BYTE_LEVEL_PATTERN.findall(run))
            else:
                counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(run))
    alphabet = _byte_level_alphabet()
    for piece, count in raw.items():
        counts["".join([alphabet[b] for b in piece.encode("utf-8")])] += count
    return counts


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=np.uint32)


def _fast_kind(spec: dict) -> str:
    """Which fast path fits a tokenizer.json: ``char``, ``byte_level``, ``word`` or ``tokenizer`` (none)."""
    from lmforge.vocab import word_pre_tokenizer_spec

    model, normalizer, pre = spec["model"], spec.get("normalizer"), spec.get("pre_tokenizer")
    plain_bpe = model["type"] == "BPE" and not model.get("dropout") and not model.get("byte_fallback") \
        and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
    if plain_bpe and not model["merges"] and normalizer is None and pre is None:
        return "char"
    if plain_bpe and normalizer is None and pre is not None and pre.get("type") == "ByteLevel" \
            and not pre.get("add_prefix_space") and pre.get("use_regex", True):
        return "byte_level"
    if model["type"] == "WordLevel" and pre == word_pre_tokenizer_spec() \
            and (normalizer is None or normalizer == {"type": "Lowercase"}):
        return "word"
    return "tokenizer"


def _line_around(text: str, index: int) -> tuple[int, int]:
    """The span between the safe cuts (``lmforge.corpus.is_safe_cut``) around ``text[index]``."""
    from lmforge.corpus.prepared import is_safe_cut

    start = text.rfind("\n", 0, index)
    while start >= 0 and not is_safe_cut(text, start + 1):
        start = text.rfind("\n", 0, start)
    end = text.find("\n", index)
    while end >= 0 and not is_safe_cut(text, end + 1):
        end = text.find("\n", end + 1)
    return start + 1, (end + 1 if end >= 0 else len(text))


def encode_chunk(encoder: Encoder, chunk: str, eot_id: int) -> np.ndarray:
    """Ids of a chunk of a prepared split, with ``eot_id`` where a document separator was."""
    from lmforge.corpus import DOC_SEPARATOR

    arrays = []
    for i, part in enumerate(chunk.split(DOC_SEPARATOR)):
        if i:
            arrays.append(np.array([eot_id], dtype=np.uint32))
        if part:
            arrays.append(encoder.encode(part))
    return _joined(arrays)


# The encoder of a worker process, loaded once by _start_worker.
_worker: dict = {}


def _start_worker(tokenizer_path: str, eot_id: int, dtype: str) -> None:
    # One process per core already: the tokenizer's own thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from lmforge.vocab import load_tokenizer

    _worker.update(encoder=Encoder(load_tokenizer(Path(tokenizer_path))), eot_id=eot_id, dtype=np.dtype(dtype))


# Megabyte chunks between two release_freed_memory calls.
_TRIM_EVERY = 16


def release_freed_memory() -> None:
    """Give the C heap's free memory back to the system (glibc only; elsewhere nothing).

    Chunk after chunk of megabyte strings and arrays, glibc keeps what Python frees and resident
    memory creeps up by about 10% of the text tokenized; trimming keeps it flat.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _encode_in_worker(chunk: str) -> bytes:
    _worker["chunks"] = _worker.get("chunks", 0) + 1
    if _worker["chunks"] % _TRIM_EVERY == 0:
        release_freed_memory()
    return encode_chunk(_worker["encoder"], chunk, _worker["eot_id"]).astype(_worker["dtype"]).tobytes()


def _in_order(pool, chunks: Iterable[str], ahead: int) -> Iterator[bytes]:
    """``pool`` applied to ``chunks`` in order, with at most ``ahead`` chunks in flight.

    (``Pool.imap`` would read the whole input ahead of the workers, i.e. the corpus into memory.)
    """
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --- shards ----------------------------------------------------------------------------------


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


def tokenize(cfg) -> dict:
    """Run the tokenize stage for config ``cfg``; write ``paths.tokens`` and return its index.

    Reads ``paths.prepared/{train,val}.txt`` and ``paths.vocab/tokenizer.json``; writes the
    shards and ``index.json`` into ``paths.tokens`` atomically (all or nothing).
    """
    from lmforge.corpus import DOC_SEPARATOR, SPLITS, iter_chunks, progress_bar
    from lmforge.vocab import eot_token_id, load_tokenizer, tokenizer_sha256

    tokenizer_path = Path(cfg.paths.vocab) / "tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    eot_id = eot_token_id(tokenizer, cfg.tokenizer.eot_token)
    dtype = token_dtype(vocab_size)
    prepared = Path(cfg.paths.prepared)
    files = {split: prepared / f"{split}.txt" for split in SPLITS}
    for path in files.values():
        if not path.is_file():
            raise LmforgeError(f"{path} not found; run the prepare stage first (dvc repro prepare).")
    total_bytes = sum(path.stat().st_size for path in files.values())
    workers = int(cfg.data.get("workers") or default_workers())
    index = {
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "tokenizer_sha256": tokenizer_sha256(tokenizer_path),
        "splits": {},
    }
    pool = encoder = None
    if workers > 1 and total_bytes >= _PARALLEL_MIN_BYTES:
        # spawn, not fork: the parent has the tokenizer's thread pool running already.
        pool = multiprocessing.get_context("spawn").Pool(
            workers, initializer=_start_worker, initargs=(str(tokenizer_path), eot_id, dtype.name))
    else:
        encoder = Encoder(tokenizer)

    def encoded(chunks: Iterable[str]) -> Iterator[bytes]:
        if pool is not None:
            return _in_order(pool, chunks, ahead=2 * workers + 2)
        return (encode_chunk(encoder, chunk, eot_id).astype(dtype).tobytes() for chunk in chunks)

    try:
        with progress_bar(total_bytes, "tokenize") as bar, atomic_path(cfg.paths.tokens, directory=True) as tmp:
            for split, path in files.items():
                counts = {"documents": 0, "bytes": 0}

                def counted(chunks: Iterable[str]) -> Iterator[str]:
                    for chunk in chunks:
                        size = len(chunk.encode("utf-8"))
                        separators = chunk.count(DOC_SEPARATOR)
                        counts["documents"] += separators
                        counts["bytes"] += size - separators
                        bar.update(size)
                        yield chunk

                writer = ShardWriter(tmp / split, dtype, int(cfg.data.shard_size))
                try:
                    for number, data in enumerate(encoded(counted(iter_chunks(path))), 1):
                        writer.write(np.frombuffer(data, dtype=dtype))
                        if number % _TRIM_EVERY == 0:
                            release_freed_memory()
                finally:
                    writer.close()
                if counts["bytes"]:
                    counts["documents"] += 1  # n separators between n + 1 documents
                index["splits"][split] = {
                    "tokens": sum(s["tokens"] for s in writer.shards),
                    **counts,
                    "shards": writer.shards,
                }
            write_json(tmp / INDEX_FILE, index)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    print(f"tokenize: {index['splits']['train']['tokens']:,} train and {index['splits']['val']['tokens']:,} "
          f"val tokens ({dtype.name}, vocabulary {vocab_size:,})")
    return index


# --- reading ---------------------------------------------------------------------------------


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

    ``read(start, length)`` returns ``length`` consecutive ids as int64. The maps are opened per
    read, not held: a long-lived np.memmap lets resident memory grow with every page touched.
    """

    def __init__(self, tokens_dir: str | Path, split: str):
        self.tokens_dir = Path(tokens_dir)
        index = read_index(self.tokens_dir)
        if split not in index["splits"]:
            raise LmforgeError(f"{self.tokens_dir / INDEX_FILE} has no '{split}' split; rerun the tokenize stage.")
        self.index = index
        self.dtype = np.dtype(index["dtype"])
        self.shards = [(self.tokens_dir / s["file"], int(s["tokens"])) for s in index["splits"][split]["shards"]]
        self.shards = [(path, n) for path, n in self.shards if n > 0]
        self.offsets = np.cumsum([0] + [n for _, n in self.shards])
        for path, n in self.shards:
            if not path.is_file() or path.stat().st_size != n * self.dtype.itemsize:
                raise LmforgeError(f"token shard {path} is missing or truncated; rerun the tokenize stage (dvc repro tokenize).")

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
