"""Pre-tokenization: the rules that must match HuggingFace's pre-tokenizers; no tokenizer files, no encoding.

Owns the regexes (with character classes built from ``unicodedata``) that split text exactly as
the ``tokenizers`` library's ByteLevel and word pre-tokenizers do, the byte-level alphabet, the
word pre-tokenizer itself, and where a text may be cut without changing its pre-tokens. The
vocab stage (``lmforge.tokenization.vocab``) counts pre-tokens with them; the fast ``Encoder``
(``lmforge.tokenization.tokenizer``) encodes with them. It imports neither.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from tokenizers import Regex, Tokenizer, models, pre_tokenizers

# The fast encoder splits text into pre-tokens with Python's `re`, using character classes built
# from unicodedata for the "checked" characters: U+0000-U+052F (Latin, IPA, Greek, Cyrillic) and
# U+2000-U+206F (General Punctuation: dashes, curly quotes, spaces), where the classes agree with
# the tokenizers' own Oniguruma regexes character by character (tests/test_tokens.py checks each).
# Other scripts may differ between the two libraries' Unicode versions, so a line holding any
# other character is encoded by the tokenizer itself.
CHECKED_RANGES = ((0x0000, 0x0530), (0x2000, 0x2070))
_BEYOND_CHECKED = re.compile(
    "[^" + "".join(f"{re.escape(chr(low))}-{re.escape(chr(high - 1))}" for low, high in CHECKED_RANGES) + "]")


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
BYTE_LEVEL_PATTERN = re.compile(
    rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{_LETTER}]+| ?[{_NUMBER}]+| ?[^{_SPACE}{_LETTER}{_NUMBER}]+"""
    rf"""|[{_SPACE}]+(?![^{_SPACE}])|[{_SPACE}]+"""
)
# The word tokenizer's pre-tokenizer (word_pre_tokenizer below): newlines and punctuation marks
# are tokens, other whitespace only separates.
WORD_PATTERN = re.compile(rf"\n|[{_PUNCTUATION}]|[^{_SPACE}{_PUNCTUATION}]+")


def byte_level_alphabet() -> list[str]:
    """GPT-2's map from byte values to the printable characters byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def checked_runs(text: str) -> Iterator[tuple[bool, str]]:
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


def _line_around(text: str, index: int) -> tuple[int, int]:
    """The span between the safe cuts (``lmforge.corpus.is_safe_cut``) around ``text[index]``."""
    from lmforge.tokenization.chunks import is_safe_cut

    start = text.rfind("\n", 0, index)
    while start >= 0 and not is_safe_cut(text, start + 1):
        start = text.rfind("\n", 0, start)
    end = text.find("\n", index)
    while end >= 0 and not is_safe_cut(text, end + 1):
        end = text.find("\n", end + 1)
    return start + 1, (end + 1 if end >= 0 else len(text))


def count_byte_level_pre_tokens(texts: Iterable[str], pre_tokenizer) -> Counter:
    """How often each pre-token of byte-level BPE occurs in ``texts``, as BPE training counts them.

    The keys are in the byte-level alphabet (``Ġthe`` for `` the``), what the tokenizers
    library's ``pre_tokenizer`` (a ByteLevel one) yields; the same fast path as ``Encoder``, about
    ten times quicker than the library. No special tokens are split out, as in training.
    """
    raw: Counter = Counter()
    counts: Counter = Counter()
    for text in texts:
        for checked, run in checked_runs(text):
            if checked:
                raw.update(BYTE_LEVEL_PATTERN.findall(run))
            else:
                counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(run))
    alphabet = byte_level_alphabet()
    for piece, count in raw.items():
        counts["".join([alphabet[b] for b in piece.encode("utf-8")])] += count
    return counts


def word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Split text into words, single punctuation characters and single newlines."""
    return pre_tokenizers.Sequence(
        [
            # Whitespace other than newlines only separates words.
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            # Each newline is a token: a language model of text needs the line structure.
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )


def word_pre_tokenizer_spec() -> dict:
    """The word pre-tokenizer as it appears in tokenizer.json (how the fast ``Encoder`` recognises it)."""
    probe = Tokenizer(models.WordLevel())
    probe.pre_tokenizer = word_pre_tokenizer()
    return json.loads(probe.to_str())["pre_tokenizer"]
