"""A tokenizer as a file and as a fast encoder: load, save, hash, special tokens, ``Encoder``; not how one is built.

``tokenizer.json`` is HuggingFace ``tokenizers``' own format. The vocab stage (``lmforge.tokenization.vocab``)
builds and saves one; everything downstream (tokenize, training, evaluation, generation, export)
loads it from here. The pre-tokenization rules the fast ``Encoder`` relies on live in
``lmforge.tokenization.pretokenize``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lmforge.config.paths import BASE_FILE
from lmforge.errors import LmforgeError
from lmforge.outputs import write_text
from lmforge.tokenization.pretokenize import (
    BYTE_LEVEL_PATTERN,
    WORD_PATTERN,
    byte_level_alphabet,
    checked_runs,
    word_pre_tokenizer_spec,
)

# The token unknown characters (char) and out-of-vocabulary words (word) map to.
UNK_TOKEN = "<unk>"

# Fallbacks for when the config leaves a key out; the shipped config files set them explicitly.
DEFAULT_SPECIAL_TOKENS = {
    "char": ["<|endoftext|>", UNK_TOKEN],
    "bpe": ["<|endoftext|>"],
    "word": ["<pad>", UNK_TOKEN, "<bos>", "<eos>"],
}
DEFAULT_EOT_TOKEN = {"char": "<|endoftext|>", "bpe": "<|endoftext|>", "word": "<eos>"}


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """Write ``tokenizer`` to ``path`` as tokenizer.json, atomically; create parent directories.

    Written as every output is (``lmforge.outputs``): a crash leaves either the old file or the
    new one, never a partial file.
    """
    write_text(path, tokenizer.to_str(pretty=True))


def load_tokenizer(path: Path) -> Tokenizer:
    """Load the tokenizer.json at ``path``.

    Raises ``LmforgeError`` naming the file if it is missing or is not a valid tokenizer.json.
    """
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(
            f"{path} not found; run the vocab stage (dvc repro vocab) "
            "or pass the path of an existing tokenizer.json."
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LmforgeError(
            f"{path} is not a valid tokenizer.json ({reason}); "
            "delete it and rerun the vocab stage (dvc repro vocab)."
        ) from err


def tokenizer_sha256(path: Path) -> str:
    """Return the SHA-256 hex digest of the bytes of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def vocab_eot_token(cfg) -> str:
    """The end-of-text token of the tokenizer in ``paths.vocab``: the base model's (recorded in
    ``base.json`` when the vocab stage adopted a fine-tune's base tokenizer), else ``tokenizer.eot_token``."""
    record = Path(cfg.paths.vocab) / BASE_FILE
    if record.is_file():
        try:
            return str(json.loads(record.read_text(encoding="utf-8"))["eot_token"])
        except (ValueError, KeyError, TypeError):
            raise LmforgeError(f"{record} names no eot_token; rerun the vocab stage to write it again.") from None
    return str(cfg.tokenizer.eot_token)


def hf_eos_token(hf_dir: Path, hf_config: dict, tokenizer: Tokenizer) -> tuple[str, int]:
    """The end-of-text token and id of a transformers directory: the eos token its tokenizer files
    name, else config.json's eos_token_id; LmforgeError when it names none."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = hf_dir / name
        if path.is_file():
            token = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
                return token, tokenizer.token_to_id(token)
    eos_id = hf_config.get("eos_token_id")
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    if isinstance(eos_id, int) and tokenizer.id_to_token(eos_id) is not None:
        return tokenizer.id_to_token(eos_id), eos_id
    raise LmforgeError(
        f"{hf_dir} names no end-of-text token (eos_token in tokenizer_config.json or eos_token_id in "
        "config.json); add one and import again."
    )


def eot_token_id(tokenizer: Tokenizer, eot_token: str) -> int:
    """Return the id of the end-of-text token ``eot_token``.

    Raises ``LmforgeError`` if the tokenizer has no such token.
    """
    token_id = tokenizer.token_to_id(eot_token)
    if token_id is None:
        raise LmforgeError(
            f"tokenizer.eot_token {eot_token!r} is not in the tokenizer's vocabulary; "
            "set tokenizer.eot_token to one of tokenizer.special_tokens and rerun the vocab stage "
            "(dvc repro vocab)."
        )
    return token_id


# --- the fast encoder -------------------------------------------------------------------------

# Distinct pre-tokens remembered per process before the memory is cleared and refilled.
_MAX_REMEMBERED = 1 << 20


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

    HuggingFace's pre-tokenizers are the slow part of encoding (``benchmarks/data_pipeline.py``
    times the tokenize stage against HuggingFace's ``encode_batch`` on the same text).
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
            self._pattern = BYTE_LEVEL_PATTERN
            alphabet = byte_level_alphabet()
            self._ids = _Remembered(lambda piece: [
                token.id for token in model.tokenize("".join([alphabet[b] for b in piece.encode("utf-8")]))])
        elif self.kind == "word":
            self._pattern = WORD_PATTERN
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
        return join_ids(arrays)

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
                  for checked, run in checked_runs(text)]
        return arrays[0] if len(arrays) == 1 else join_ids(arrays)

    def _encode_checked(self, text: str) -> np.ndarray:
        return np.frombuffer(b"".join(map(self._ids.__getitem__, self._pattern.findall(text))), dtype=np.uint32)

    def _encode_by_tokenizer(self, text: str) -> np.ndarray:
        # For word, the text is normalised already: the tokenizer's Lowercase leaves it unchanged.
        return np.array(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.uint32)


def join_ids(arrays: list[np.ndarray]) -> np.ndarray:
    """The uint32 id arrays ``arrays`` one after another (an empty array for none)."""
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=np.uint32)


def _fast_kind(spec: dict) -> str:
    """Which fast path fits a tokenizer.json: ``char``, ``byte_level``, ``word`` or ``tokenizer`` (none)."""
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

