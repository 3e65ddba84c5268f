"""The vocab stage: build a tokenizer from the training split and save it as one tokenizer.json.

Three kinds of tokenizer, all built with the HuggingFace ``tokenizers`` library so that the saved
file loads in ``tokenizers.Tokenizer.from_file`` and ``transformers.PreTrainedTokenizerFast``:

* ``char``: one token per distinct character of the training text.
  ``decode(encode(s).ids) == s`` for any string over the training alphabet.
* ``word``: word-level; punctuation is split from words, each newline is its own token and other
  whitespace is dropped. ``decode(encode(s).ids) == normalise_for_word(s, lowercase)`` for text whose
  words are in the vocabulary.
* ``bpe``: byte-level BPE. ``decode(encode(s).ids) == s`` for any string.

Special tokens get the lowest ids, in the configured order. No post-processor is set, so ``encode``
returns the raw ids (no BOS/EOS are added); the pipeline inserts the end-of-text token itself.
The kind and the end-of-text token are not stored in tokenizer.json (the format has no field for
them); the caller keeps them in its own metadata. Loading, saving and the fast encoder are
``lmforge.tokenization.tokenizer``'s; the pre-tokenization rules are ``lmforge.tokenization.pretokenize``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lmforge.config.compose import UNSET
from lmforge.config.paths import BASE_FILE, TOKENIZER_FILE
from lmforge.config.rules import check_setting, check_vocab_size
from lmforge.errors import LmforgeError
from lmforge.tokenization.chunks import prepared_format
from lmforge.tokenization.pretokenize import count_byte_level_pre_tokens, word_pre_tokenizer
from lmforge.tokenization.tokenizer import (
    DEFAULT_EOT_TOKEN,
    DEFAULT_SPECIAL_TOKENS,
    UNK_TOKEN,
    Encoder,
    eot_token_id,
    load_tokenizer,
    save_tokenizer,
)

KINDS = ("char", "word", "bpe")

# The word decoder joins tokens with WordPiece's "prefix or space" rule; no word token can start
# with this prefix because the pre-tokenizer isolates every punctuation character, "#" included.
_NEVER_A_PREFIX = "##"

def build_tokenizer(cfg: Any, texts: Iterable[str]) -> Tokenizer:
    """Train a tokenizer of kind ``cfg.kind`` on the documents in ``texts``.

    ``cfg`` is the ``tokenizer`` config section (a DictConfig, a mapping, or any object with
    attributes) with keys ``kind``, ``vocab_size``, ``min_frequency``, ``lowercase``,
    ``special_tokens`` and ``eot_token``. ``texts`` is an iterable of documents; it is read once, in
    a stream, so it may be a generator over a large file (a single ``str`` counts as one document).

    Returns a ``tokenizers.Tokenizer`` with the special tokens at ids ``0..k-1`` and no
    post-processor. Its ``get_vocab_size()`` is the real vocabulary size, which for bpe may be
    smaller than ``vocab_size`` when the text has too few distinct pairs to merge.
    Raises ``LmforgeError`` for an invalid config or an empty training split.
    """
    kind = _config_value(cfg, "kind")
    if kind not in KINDS:
        raise LmforgeError(
            f"tokenizer.kind is {kind!r}; set tokenizer.kind to one of {', '.join(KINDS)}."
        )
    special_tokens = _special_tokens(cfg, kind)
    eot_token = str(_config_value(cfg, "eot_token", DEFAULT_EOT_TOKEN[kind]))
    if eot_token not in special_tokens:
        raise LmforgeError(
            f"tokenizer.eot_token {eot_token!r} is not in tokenizer.special_tokens {special_tokens}; "
            "set tokenizer.eot_token to one of them or add it to tokenizer.special_tokens."
        )
    if isinstance(texts, str):
        texts = [texts]
    corpus = _CountingTexts(texts)

    if kind == "char":
        tokenizer = _build_char(cfg, special_tokens, corpus)
    elif kind == "word":
        tokenizer = _build_word(cfg, special_tokens, corpus)
    else:
        tokenizer = _build_bpe(cfg, special_tokens, corpus)

    if corpus.chars == 0:
        raise LmforgeError(
            "The training split is empty (no characters reached the vocab stage); "
            "check data.sources and rerun the prepare stage (dvc repro prepare)."
        )
    # Raw ids only: the pipeline decides where end-of-text tokens go.
    tokenizer.post_processor = None
    return tokenizer


def normalise_for_word(text: str, lowercase: bool = False) -> str:
    """Return the text a word tokenizer gives back: ``decode(encode(text).ids)``.

    Holds for text whose words are all in the vocabulary (out-of-vocabulary words become
    ``<unk>``, which ``decode`` skips). The form is: lowercased if ``lowercase``; every punctuation
    character is its own token; tokens are joined by single spaces; each newline is kept, with no
    space before or after it; all other whitespace (spaces, tabs, ``\\r``, ...) only separates
    tokens. Example: ``"Hello,  world!\\r\\n\\nBye"`` becomes ``"Hello , world !\\n\\nBye"``.
    """
    if lowercase:
        text = normalizers.Lowercase().normalize_str(text)
    pieces = [piece for piece, _ in word_pre_tokenizer().pre_tokenize_str(text)]
    return _join_words(pieces)


def vocab_metrics(tokenizer: Tokenizer, texts: Iterable[str]) -> dict:
    """Measure ``tokenizer`` on the documents in ``texts`` (streamed, e.g. the validation split).

    Returns ``{"vocab_size", "bytes_per_token", "unk_rate", "tokens", "bytes"}``: the real vocabulary
    size, UTF-8 bytes of text per token, the fraction of tokens that are ``<unk>`` (0.0 when the
    tokenizer has no ``<unk>``), the number of tokens and the number of UTF-8 bytes. With no tokens
    at all, ``bytes_per_token`` and ``unk_rate`` are 0.0.
    """
    if isinstance(texts, str):
        texts = [texts]
    encoder = Encoder(tokenizer)
    unk_id = tokenizer.token_to_id(UNK_TOKEN)
    total_tokens = total_bytes = unk_tokens = 0
    for text in texts:
        total_bytes += len(text.encode("utf-8"))
        ids = encoder.encode(text)
        total_tokens += len(ids)
        if unk_id is not None:
            unk_tokens += int(np.count_nonzero(ids == unk_id))
    return {
        "vocab_size": tokenizer.get_vocab_size(),
        "bytes_per_token": total_bytes / total_tokens if total_tokens else 0.0,
        "unk_rate": unk_tokens / total_tokens if total_tokens else 0.0,
        "tokens": total_tokens,
        "bytes": total_bytes,
    }


# --- the three kinds ---------------------------------------------------------------------------


def _build_char(cfg: Any, special_tokens: list[str], corpus: Iterable[str]) -> Tokenizer:
    """One token per distinct character, ids after the specials in codepoint order."""
    alphabet: set[str] = set()
    for text in corpus:
        alphabet.update(text)
    vocab = {token: token_id for token_id, token in enumerate(special_tokens)}
    for char in sorted(alphabet):
        vocab.setdefault(char, len(vocab))
    # tokenizer.vocab_size null (or 0) means "the alphabet"; a number must leave room for it.
    vocab_size = _int_value(cfg, "vocab_size", 0)
    if vocab_size and vocab_size < len(vocab):
        raise LmforgeError(
            f"tokenizer.vocab_size is {vocab_size} but the training split has {len(alphabet)} distinct "
            f"characters and there are {len(special_tokens)} special tokens; set tokenizer.vocab_size to "
            f"{len(vocab)} or more, or to null for exactly the alphabet."
        )
    # BPE with no merges splits a document into characters without a pre-tokenizer, which keeps
    # encoding fast on long documents; characters outside the vocabulary become <unk> if it exists
    # (and are dropped otherwise).
    unk_token = UNK_TOKEN if UNK_TOKEN in special_tokens else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token))
    tokenizer.add_special_tokens(special_tokens)
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def _build_word(cfg: Any, special_tokens: list[str], corpus: Iterable[str]) -> Tokenizer:
    """Word-level tokenizer: frequent words, punctuation marks and newlines."""
    vocab_size = _int_value(cfg, "vocab_size")
    check_vocab_size("word", vocab_size, special_tokens)
    if UNK_TOKEN not in special_tokens:
        raise LmforgeError(
            f"tokenizer.special_tokens {special_tokens} lacks {UNK_TOKEN!r}, which a word tokenizer "
            f"maps unseen words to; add {UNK_TOKEN!r} to tokenizer.special_tokens."
        )
    min_frequency = _int_value(cfg, "min_frequency", 0)
    lowercase = _config_value(cfg, "lowercase", False)
    if not isinstance(lowercase, bool):
        raise LmforgeError(f"tokenizer.lowercase is {lowercase!r}; set it to true or false.")

    tokenizer = Tokenizer(models.WordLevel(vocab={}, unk_token=UNK_TOKEN))
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = word_pre_tokenizer()
    tokenizer.decoder = decoders.Sequence(
        [
            # Puts a space before every token but the first (no token starts with the prefix) ...
            decoders.WordPiece(prefix=_NEVER_A_PREFIX, cleanup=False),
            decoders.Fuse(),
            # ... then takes the spaces next to newlines back out, so lines come back unindented.
            decoders.Replace(Regex(" ?\n ?"), "\n"),
        ]
    )
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def _build_bpe(cfg: Any, special_tokens: list[str], corpus: Iterable[str]) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): every string round-trips."""
    vocab_size = _int_value(cfg, "vocab_size")
    check_vocab_size("bpe", vocab_size, special_tokens)
    min_frequency = _int_value(cfg, "min_frequency", 0)

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # The library's ByteLevel pre-tokenizer is the slow part of training (2-4 MB/s a core), so
    # the pre-tokens are counted by lmforge.pretokenize's fast path and handed to the trainer as
    # whitespace-separated words (the byte-level alphabet has no whitespace): the same counts,
    # hence the same vocabulary and merges (tests/test_vocab.py compares the two).
    counts = count_byte_level_pre_tokens(corpus, byte_level)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_repeated(counts), trainer=trainer)
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _repeated(counts: Mapping[str, int], piece_chars: int = 1 << 16) -> Iterator[str]:
    """Text in which each word of ``counts`` occurs its count of times, in pieces of ``piece_chars``.

    Small pieces: the library reads 256 of them ahead of its trainer, so 1 MB pieces would hold
    hundreds of megabytes.
    """
    pieces: list[str] = []
    size = 0
    for word, count in counts.items():
        per_piece = max(1, piece_chars // (len(word) + 1))
        while count > 0:
            times = min(count, per_piece)
            pieces.append((word + " ") * times)
            size += times * (len(word) + 1)
            count -= times
            if size >= piece_chars:
                yield "".join(pieces)
                pieces, size = [], 0
    if pieces:
        yield "".join(pieces)


# --- helpers -----------------------------------------------------------------------------------


def _join_words(pieces: list[str]) -> str:
    """Join word tokens the way the word decoder does (see normalise_for_word)."""
    text = ""
    for piece in pieces:
        if text and piece != "\n" and not text.endswith("\n"):
            text += " "
        text += piece
    return text


class _CountingTexts:
    """Iterate over documents once, counting their characters so an empty split can be reported."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = texts
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            if not isinstance(text, str):
                raise TypeError(f"training documents must be str, got {type(text).__name__}")
            self.chars += len(text)
            yield text


def _config_value(cfg: Any, key: str, default: Any = UNSET) -> Any:
    """Read ``tokenizer.<key>`` from a mapping or attribute-style config; None counts as unset."""
    try:
        value = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
    except Exception as err:  # e.g. omegaconf's MissingMandatoryValue for "???"
        raise LmforgeError(
            f"tokenizer.{key} could not be read ({err}); set tokenizer.{key} in the config."
        ) from err
    if value is None:
        if default is UNSET:
            raise LmforgeError(f"tokenizer.{key} is not set; set tokenizer.{key} in the config.")
        return default
    return value


def _int_value(cfg: Any, key: str, default: Any = UNSET) -> int:
    """Read an integer config value (``default`` when unset), refused out of its range
    (``lmforge.config.rules``, the table ``lmforge check`` uses)."""
    value = _config_value(cfg, key, default)
    return value if value is default else check_setting(f"tokenizer.{key}", value)


def _special_tokens(cfg: Any, kind: str) -> list[str]:
    """Read tokenizer.special_tokens (a list of distinct non-empty strings)."""
    value = _config_value(cfg, "special_tokens", DEFAULT_SPECIAL_TOKENS[kind])
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise LmforgeError(
            f"tokenizer.special_tokens is {value!r}; set tokenizer.special_tokens to a list of strings."
        )
    tokens = list(value)
    if not all(isinstance(token, str) and token for token in tokens):
        raise LmforgeError(
            f"tokenizer.special_tokens {tokens!r} has a token that is not a non-empty string; "
            "make every entry of tokenizer.special_tokens a non-empty string."
        )
    if len(set(tokens)) != len(tokens):
        raise LmforgeError(
            f"tokenizer.special_tokens {tokens!r} lists a token twice; remove the duplicate."
        )
    return tokens


def training_sample(path: Path, train_bytes: int = 0) -> Iterator[str]:
    """The text a vocabulary is built from: the train split ``path``, or a sample of it.

    Yields pieces of at most a megabyte, cut where no tokenizer joins text across, rather than
    whole documents: a one-document split (``data.split=position``) may be larger than memory.
    With ``train_bytes`` (``tokenizer.train_bytes``) smaller than the split, only every k-th
    megabyte is yielded, an evenly spread sample of about ``train_bytes``.
    """
    from lmforge.config.paths import DOC_SEPARATOR
    from lmforge.tokenization.chunks import iter_chunks

    size = Path(path).stat().st_size if Path(path).is_file() else 0
    stride = -(-size // train_bytes) if train_bytes else 1
    for number, chunk in enumerate(iter_chunks(path)):
        if number % stride == 0:
            yield from (piece for piece in chunk.split(DOC_SEPARATOR) if piece)


def vocab_stage(cfg: Any) -> dict:
    """Run the vocab stage: build from ``train.txt``, save ``paths.vocab/tokenizer.json``, measure on val.

    Returns the vocabulary metrics, also written to ``reports/vocab.json`` (DVC metrics).
    """
    from lmforge.outputs import check_writable, write_json
    from lmforge.tokenization.chunks import iter_pieces

    check_writable(("paths.vocab", Path(cfg.paths.vocab) / TOKENIZER_FILE),
                   ("paths.reports", Path(cfg.paths.reports) / "vocab.json"))
    prepared = Path(cfg.paths.prepared)
    if cfg.get("finetune") is not None and cfg.finetune.get("base"):
        return _adopt_base(cfg, prepared)
    # A fine-tune's or a chat run's files, from an earlier run of this directory by hand.
    for stale in (BASE_FILE, "tokenizer_config.json", "chat_template.jinja", "chat.json"):
        (Path(cfg.paths.vocab) / stale).unlink(missing_ok=True)
    if prepared_format(prepared) != "text":
        return _records_vocab(cfg, prepared)
    if not (prepared / "train.txt").is_file():
        raise LmforgeError(f"{prepared / 'train.txt'} not found; run the prepare stage first (dvc repro prepare).")
    train_bytes = _int_value(cfg.tokenizer, "train_bytes", 0)
    tokenizer = build_tokenizer(cfg.tokenizer, training_sample(prepared / "train.txt", train_bytes))
    eot_token_id(tokenizer, cfg.tokenizer.eot_token)  # fail now, not in the tokenize stage
    requested = cfg.tokenizer.get("vocab_size")
    metrics = {"kind": cfg.tokenizer.kind, "requested_vocab_size": requested,
               **vocab_metrics(tokenizer, iter_pieces(prepared / "val.txt"))}
    save_tokenizer(tokenizer, Path(cfg.paths.vocab) / TOKENIZER_FILE)
    write_json(Path(cfg.paths.reports) / "vocab.json", metrics)
    print(vocab_line(metrics))
    return metrics


def _adopt_base(cfg: Any, prepared: Path) -> dict:
    """The vocab stage of a fine-tune: the base's own tokenizer (``tokenizer.*`` do not apply),
    with ``base.json`` naming the base's exact files (``lmforge.tokenization.base``); for chat
    records, the base's chat template, or ChatML with its tokens added (``lmforge.tokenization.chat``)."""
    from lmforge.outputs import write_json
    from lmforge.tokenization.base import adopt_tokenizer, base_setting, resolve_base
    from lmforge.tokenization.chat import save_chat, template_for
    from lmforge.tokenization.chunks import iter_pieces, iter_records

    base = resolve_base(*base_setting(cfg))
    vocab = Path(cfg.paths.vocab)
    adopt_tokenizer(base, vocab)
    tokenizer = load_tokenizer(vocab / "tokenizer.json")
    fmt = prepared_format(prepared)
    val = iter_pieces(prepared / "val.txt") if fmt == "text" else record_texts(iter_records(prepared, "val"))
    metrics = {"kind": "base", "base": base.ref, "revision": base.revision, "requested_vocab_size": None,
               **vocab_metrics(tokenizer, val)}
    for stale in ("chat_template.jinja", "chat.json"):
        (vocab / stale).unlink(missing_ok=True)
    if fmt == "chat":
        template = template_for(tokenizer, base.path)  # the base's own, else ChatML with its tokens added
        metrics["added_tokens"] = list(template.added_tokens)
        metrics["vocab_size"] = tokenizer.get_vocab_size(with_added_tokens=True)
        save_chat(vocab, template)
        if template.added_tokens:
            save_tokenizer(tokenizer, vocab / "tokenizer.json")
    write_json(Path(cfg.paths.reports) / "vocab.json", metrics)
    print(f"vocab: the tokenizer of finetune.base={base.ref}" + (f" at {base.revision}" if base.revision else "")
          + f", {metrics['vocab_size']:,} tokens, {metrics['bytes_per_token']:.2f} bytes per token on val")
    return metrics


def _records_vocab(cfg: Any, prepared: Path) -> dict:
    """data.format=chat|prompt_completion: a tokenizer built from the records' text, ChatML's tokens
    added for chat, and the template saved beside it (``lmforge.tokenization.chat``)."""
    from lmforge.outputs import write_json
    from lmforge.tokenization.chat import save_chat, template_for
    from lmforge.tokenization.chunks import iter_records

    fmt = prepared_format(prepared)
    tokenizer = build_tokenizer(cfg.tokenizer, record_texts(iter_records(prepared, "train")))
    eot_token_id(tokenizer, cfg.tokenizer.eot_token)
    vocab = Path(cfg.paths.vocab)
    metrics = {"kind": cfg.tokenizer.kind, "requested_vocab_size": cfg.tokenizer.get("vocab_size"),
               **vocab_metrics(tokenizer, record_texts(iter_records(prepared, "val")))}
    if fmt == "chat":
        template = template_for(tokenizer)  # a tokenizer built here has no template: ChatML
        metrics["added_tokens"] = template.added_tokens
        metrics["vocab_size"] = tokenizer.get_vocab_size(with_added_tokens=True)
        save_chat(vocab, template)
    save_tokenizer(tokenizer, vocab / "tokenizer.json")
    write_json(Path(cfg.paths.reports) / "vocab.json", metrics)
    print(vocab_line(metrics))
    return metrics


def record_texts(records: Iterable[dict]) -> Iterator[str]:
    """The text of prepared records a vocabulary is built from: each message with its role's name
    (the template writes it) or the prompt and completion."""
    for record in records:
        if "messages" in record:
            yield "".join(f"{m['role']}\n{m['content']}\n" for m in record["messages"])
        else:
            yield record["prompt"] + record["completion"]


def vocab_line(metrics: dict) -> str:
    """The vocab stage's log line; it says so when the vocabulary came out smaller than requested
    (byte-level BPE stops merging when the text has no pair left to merge)."""
    line = (f"vocab: {metrics['kind']}, {metrics['vocab_size']:,} tokens, "
            f"{metrics['bytes_per_token']:.2f} bytes per token on val")
    requested = metrics["requested_vocab_size"]
    if requested and metrics["vocab_size"] < requested:
        line += (f"; fewer than the {requested:,} tokenizer.vocab_size asked for: the training split has no more "
                 "to merge (a larger corpus, or a smaller tokenizer.vocab_size, makes them equal)")
    return line
