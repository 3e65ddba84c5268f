"""Tests for the vocab stage: building, saving and measuring char, word and bpe tokenizers."""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmforge import outputs
from lmforge.errors import LmforgeError
from lmforge.tokenization import vocab
from lmforge.tokenization.tokenizer import (
    DEFAULT_EOT_TOKEN,
    DEFAULT_SPECIAL_TOKENS,
    eot_token_id,
    load_tokenizer,
    save_tokenizer,
    tokenizer_sha256,
)
from lmforge.tokenization.vocab import build_tokenizer, normalise_for_word, vocab_metrics

# Free of "<" and "|", so hypothesis cannot draw a special token out of its alphabet.
CHAR_TEXT = "First Citizen:\nBefore we proceed, hear me speak.\n\n**ROMEO**  Speak,\tspeak!\n"

SHAKESPEARE = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "All:\nSpeak, speak.\n",
    "First Citizen:\nYou are all resolved rather to die than to famish?\n",
    "All:\nResolved. resolved.\n",
    "**ROMEO**  But, soft! what light through yonder window breaks?\n",
    "Café, naïve, 東京, emoji 🎭 and tabs\tand  runs   of spaces.\n",
]

HYPOTHESIS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def make_cfg(kind: str, **overrides) -> DictConfig:
    """A tokenizer config section as the lead's config files write it."""
    section = {
        "kind": kind,
        "vocab_size": {"char": 0, "word": 100, "bpe": 400}[kind],
        "min_frequency": {"char": 0, "word": 1, "bpe": 2}[kind],
        "lowercase": False,
        "special_tokens": DEFAULT_SPECIAL_TOKENS[kind],
        "eot_token": DEFAULT_EOT_TOKEN[kind],
    }
    section.update(overrides)
    return OmegaConf.create(section)


@cache
def char_tokenizer() -> Tokenizer:
    return build_tokenizer(make_cfg("char"), [CHAR_TEXT])


@cache
def bpe_tokenizer() -> Tokenizer:
    return build_tokenizer(make_cfg("bpe", vocab_size=400), (doc for doc in SHAKESPEARE * 3))


@cache
def word_tokenizer(lowercase: bool = False) -> Tokenizer:
    return build_tokenizer(make_cfg("word", lowercase=lowercase), (doc for doc in SHAKESPEARE))


def roundtrip(tokenizer: Tokenizer, text: str) -> str:
    return tokenizer.decode(tokenizer.encode(text).ids)


# --- char --------------------------------------------------------------------------------------


def test_char_vocab_is_specials_then_sorted_distinct_characters():
    expected = ["<|endoftext|>", "<unk>"] + sorted(set(CHAR_TEXT))
    vocab_by_id = sorted(char_tokenizer().get_vocab().items(), key=lambda item: item[1])
    assert [token for token, _ in vocab_by_id] == expected
    assert [token_id for _, token_id in vocab_by_id] == list(range(len(expected)))


def test_char_round_trips_the_training_text():
    assert roundtrip(char_tokenizer(), CHAR_TEXT) == CHAR_TEXT
    assert roundtrip(char_tokenizer(), "**ROMEO**\n\n   speak") == "**ROMEO**\n\n   speak"
    assert len(char_tokenizer().encode(CHAR_TEXT).ids) == len(CHAR_TEXT)


def test_char_maps_unseen_characters_to_unk():
    tokenizer = char_tokenizer()
    unk_id = tokenizer.token_to_id("<unk>")
    assert tokenizer.encode("Zé").ids == [unk_id, unk_id]
    assert tokenizer.encode("aZa").ids[1] == unk_id


def test_char_keeps_eot_as_one_token():
    tokenizer = char_tokenizer()
    text = "speak.<|endoftext|>First"
    ids = tokenizer.encode(text).ids
    assert ids.count(0) == 1 and len(ids) == len("speak.") + 1 + len("First")
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_char_without_unk_special_still_builds():
    tokenizer = build_tokenizer(make_cfg("char", special_tokens=["<|endoftext|>"]), ["abc"])
    assert tokenizer.get_vocab() == {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3}
    assert roundtrip(tokenizer, "cab") == "cab"


@HYPOTHESIS
@given(st.text(alphabet=sorted(set(CHAR_TEXT))))
def test_char_round_trips_any_string_over_the_training_alphabet(text):
    assert roundtrip(char_tokenizer(), text) == text


def test_char_encodes_a_megabyte_in_one_pass_of_the_library():
    # What keeps it fast (about 0.5 s a megabyte on 2 cores): a BPE model with no merges and nothing
    # before it, so the Rust library splits the text into characters itself; a pre-tokenizer or a
    # normalizer would add a regex or a Python pass. Asserted instead of the wall time, which a busy
    # machine stretches.
    saved = json.loads(char_tokenizer().to_str())
    assert saved["model"]["type"] == "BPE" and saved["model"]["merges"] == []
    assert saved["pre_tokenizer"] is None and saved["normalizer"] is None
    text = CHAR_TEXT * (1_000_000 // len(CHAR_TEXT))
    assert len(char_tokenizer().encode(text).ids) == len(text)


# --- bpe ---------------------------------------------------------------------------------------


@HYPOTHESIS
@given(st.text())
def test_bpe_round_trips_any_unicode_string(text):
    assume("<|endoftext|>" not in text)
    assert roundtrip(bpe_tokenizer(), text) == text


def test_bpe_honours_vocab_size_and_puts_specials_first():
    tokenizer = build_tokenizer(
        make_cfg("bpe", vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"]),
        SHAKESPEARE * 3,
    )
    assert tokenizer.get_vocab_size() <= 300
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    assert tokenizer.token_to_id("<pad>") == 1
    assert tokenizer.post_processor is None


def test_bpe_vocab_smaller_than_requested_is_exposed():
    tokenizer = build_tokenizer(make_cfg("bpe", vocab_size=5000), ["tiny text"])
    assert 257 <= tokenizer.get_vocab_size() < 5000
    assert vocab_metrics(tokenizer, ["tiny"])["vocab_size"] == tokenizer.get_vocab_size()


def test_bpe_encodes_eot_in_text_as_its_id():
    tokenizer = bpe_tokenizer()
    ids = tokenizer.encode("Speak, speak.<|endoftext|>All:").ids
    assert ids.count(0) == 1
    assert tokenizer.decode(ids, skip_special_tokens=False) == "Speak, speak.<|endoftext|>All:"


@pytest.mark.parametrize("vocab_size, min_frequency", [(300, 2), (600, 0), (1000, 1)])
def test_bpe_is_the_vocabulary_the_library_trains_itself(vocab_size, min_frequency):
    # build_tokenizer counts pre-tokens with lmforge.pretokenize's fast path: the library, pre-tokenizing
    # on its own, must arrive at the very same tokenizer.json.
    texts = SHAKESPEARE * 3 + ["  indented\n\n\n  lines\t\ttabs  ", "<|endoftext|> in the text", "東京 ½ ¹ ﬁ Ελλάδα"]
    reference = Tokenizer(models.BPE())
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    reference.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    reference.post_processor = None
    built = build_tokenizer(make_cfg("bpe", vocab_size=vocab_size, min_frequency=min_frequency), iter(texts))
    assert built.to_str() == reference.to_str()


def test_bpe_build_is_deterministic():
    again = build_tokenizer(make_cfg("bpe", vocab_size=400), SHAKESPEARE * 3)
    assert again.to_str() == bpe_tokenizer().to_str()


# --- word --------------------------------------------------------------------------------------


def test_word_vocab_covers_the_hypothesis_pieces():
    vocabulary = word_tokenizer().get_vocab()
    assert all(piece in vocabulary for piece in WORD_VOCAB + WORD_PUNCTUATION + ["\n"])
    assert len(WORD_VOCAB) > 20 and len(WORD_PUNCTUATION) >= 5


def test_word_specials_have_the_lowest_ids():
    tokenizer = word_tokenizer()
    assert [tokenizer.token_to_id(t) for t in ["<pad>", "<unk>", "<bos>", "<eos>"]] == [0, 1, 2, 3]
    assert tokenizer.post_processor is None


def test_word_honours_max_vocab_size_keeping_the_most_frequent():
    texts = ["the the the the cat cat cat sat sat on"]
    tokenizer = build_tokenizer(make_cfg("word", vocab_size=6), texts)
    assert tokenizer.get_vocab_size() == 6
    assert set(tokenizer.get_vocab()) == {"<pad>", "<unk>", "<bos>", "<eos>", "the", "cat"}


def test_word_honours_min_frequency():
    tokenizer = build_tokenizer(make_cfg("word", min_frequency=2), ["rare common common"])
    assert tokenizer.encode("rare common").tokens == ["<unk>", "common"]
    assert tokenizer.token_to_id("rare") is None


def test_word_lowercase_option():
    lower = word_tokenizer(lowercase=True)
    assert lower.encode("Speak SPEAK speak").tokens == ["speak", "speak", "speak"]
    cased = word_tokenizer(lowercase=False)
    assert cased.encode("Speak speak").tokens == ["Speak", "speak"]


def test_word_splits_punctuation_from_words():
    tokenizer = build_tokenizer(make_cfg("word"), ["Hello, world!"])
    assert tokenizer.encode("Hello, world!").tokens == ["Hello", ",", "world", "!"]
    assert tokenizer.decode(tokenizer.encode("Hello, world!").ids) == "Hello , world !"


def test_word_keeps_newlines_and_drops_other_whitespace():
    tokenizer = build_tokenizer(make_cfg("word"), ["a b\nc"])
    assert tokenizer.encode("a \t b\r\n\nc").tokens == ["a", "b", "\n", "\n", "c"]
    assert roundtrip(tokenizer, "a \t b\r\n\n  c") == "a b\n\nc"


def test_normalise_for_word_examples():
    assert normalise_for_word("Hello,  world!\r\n\nBye") == "Hello , world !\n\nBye"
    assert normalise_for_word("\n  indented\tline \n") == "\nindented line\n"
    assert normalise_for_word("Don't STOP", lowercase=True) == "don ' t stop"
    assert normalise_for_word("") == ""


# The ASCII words and punctuation marks the word tokenizer learned from SHAKESPEARE.
WORD_VOCAB = sorted(
    {w for w in re.findall(r"\w+", " ".join(SHAKESPEARE)) if w.isascii() and w.isalpha()}
)
WORD_PUNCTUATION = sorted(set(re.findall(r"[!-/:-@\[-`{-~]", " ".join(SHAKESPEARE))))


@st.composite
def word_text(draw):
    """Text of in-vocabulary words, punctuation and newlines; returns (text, expected decode)."""
    pieces = WORD_VOCAB + WORD_PUNCTUATION + ["\n"]
    tokens = draw(st.lists(st.sampled_from(pieces), max_size=30))
    text = ""
    for index, token in enumerate(tokens):
        separator = draw(st.sampled_from(["", " ", "  ", "\t", " \t "]))
        if separator == "" and index and token.isalpha() and tokens[index - 1].isalpha():
            separator = " "  # two words with nothing between them would be one word
        text += separator + token
    text += draw(st.sampled_from(["", " ", "\n"]))
    # Independent of vocab.py: single spaces between tokens, none next to a newline.
    expected = re.sub(r" ?\n ?", "\n", " ".join(re.findall(r"[A-Za-z]+|\S|\n", text)))
    return text, expected


@HYPOTHESIS
@given(word_text())
def test_word_round_trips_to_the_normalised_form(case):
    text, expected = case
    assert roundtrip(word_tokenizer(), text) == expected
    assert normalise_for_word(text) == expected


def test_word_round_trip_with_lowercase():
    text = "Speak, SPEAK.\nAll:  resolved!"
    assert roundtrip(word_tokenizer(lowercase=True), text) == normalise_for_word(text, True)
    assert normalise_for_word(text, True) == "speak , speak .\nall : resolved !"


@HYPOTHESIS
@given(st.text(alphabet=st.sampled_from(list("SpeakAlrsoved xyzé,.!:\n\t")), max_size=60))
def test_word_round_trips_normalised_text_up_to_unknown_words(text):
    # Unknown words ("xyz", "Spe", ...) become <unk>, which decoding leaves out; everything else
    # comes back in the normalised form.
    tokenizer = word_tokenizer()
    known = tokenizer.get_vocab()
    kept = [p for p in re.findall(r"[A-Za-zé]+|\n|[^\sA-Za-zé]", text) if p in known]
    expected = re.sub(r" ?\n ?", "\n", " ".join(kept))
    assert roundtrip(tokenizer, text) == expected


# --- validation --------------------------------------------------------------------------------


def test_unknown_kind_names_the_key_and_the_valid_kinds():
    with pytest.raises(LmforgeError, match=r"tokenizer\.kind.*char, word, bpe"):
        build_tokenizer(OmegaConf.create({"kind": "sentencepiece"}), ["abc"])


def test_bpe_vocab_size_below_byte_alphabet_is_rejected():
    with pytest.raises(LmforgeError, match=r"tokenizer\.vocab_size.*257.*256 byte"):
        build_tokenizer(make_cfg("bpe", vocab_size=256), ["abc"])


def test_word_vocab_size_must_exceed_the_specials():
    with pytest.raises(LmforgeError, match=r"tokenizer\.vocab_size"):
        build_tokenizer(make_cfg("word", vocab_size=4), ["abc"])


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
@pytest.mark.parametrize("texts", [[], [""], ["", ""]])
def test_empty_training_split_is_rejected(kind, texts):
    with pytest.raises(LmforgeError, match=r"training split is empty"):
        build_tokenizer(make_cfg(kind), iter(texts))


def test_eot_token_must_be_a_special_token():
    with pytest.raises(LmforgeError, match=r"tokenizer\.eot_token"):
        build_tokenizer(make_cfg("bpe", eot_token="</s>"), ["abc"])


def test_duplicate_special_tokens_are_rejected():
    with pytest.raises(LmforgeError, match=r"tokenizer\.special_tokens"):
        build_tokenizer(make_cfg("char", special_tokens=["<unk>", "<unk>"], eot_token="<unk>"), ["a"])


def test_word_needs_unk_among_specials():
    with pytest.raises(LmforgeError, match=r"tokenizer\.special_tokens.*<unk>"):
        build_tokenizer(make_cfg("word", special_tokens=["<pad>", "<eos>"]), ["a"])


def test_missing_vocab_size_names_the_key():
    with pytest.raises(LmforgeError, match=r"tokenizer\.vocab_size"):
        build_tokenizer(OmegaConf.create({"kind": "bpe", "vocab_size": "???"}), ["a"])


class OneShotTexts:
    """An iterable that may be iterated only once, like a generator over a large file."""

    def __init__(self, texts):
        self.texts = texts
        self.iterations = 0

    def __iter__(self):
        self.iterations += 1
        assert self.iterations == 1, "the training split was read twice"
        return iter(self.texts)


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_training_text_is_read_once(kind):
    texts = OneShotTexts(SHAKESPEARE)
    build_tokenizer(make_cfg(kind), texts)
    assert texts.iterations == 1


def test_a_single_string_counts_as_one_document():
    assert build_tokenizer(make_cfg("char"), "ba").get_vocab() == char_vocab("ab")


def test_config_can_be_a_plain_mapping_or_namespace():
    as_dict = build_tokenizer({"kind": "char"}, ["ab"])
    as_namespace = build_tokenizer(SimpleNamespace(kind="char"), ["ab"])
    assert as_dict.get_vocab() == as_namespace.get_vocab() == char_vocab("ab")


def char_vocab(alphabet: str) -> dict:
    tokens = ["<|endoftext|>", "<unk>"] + sorted(alphabet)
    return {token: token_id for token_id, token in enumerate(tokens)}


def test_training_sample_spreads_train_bytes_over_the_split(tmp_path):
    from lmforge.config.paths import DOC_SEPARATOR

    megabyte = ("word " * 200 + "\n") * 1000  # about 1 MB a chunk
    path = tmp_path / "train.txt"
    path.write_text(DOC_SEPARATOR.join(f"doc {i}\n{megabyte}" for i in range(6)), encoding="utf-8")
    everything = "".join(vocab.training_sample(path))
    assert everything == path.read_text(encoding="utf-8").replace(DOC_SEPARATOR, "")
    sample = list(vocab.training_sample(path, train_bytes=2_000_000))
    assert 1_500_000 < sum(map(len, sample)) < 3_000_000
    # Spread over the split, not its first megabytes.
    assert any(p.startswith("doc 0") for p in sample) and any(p.startswith(("doc 4", "doc 5")) for p in sample)


def test_eot_token_id():
    assert eot_token_id(bpe_tokenizer(), "<|endoftext|>") == 0
    assert eot_token_id(word_tokenizer(), "<eos>") == 3
    with pytest.raises(LmforgeError, match=r"tokenizer\.eot_token"):
        eot_token_id(word_tokenizer(), "<|endoftext|>")


# --- save and load -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_saved_file_loads_in_tokenizers_and_transformers(tmp_path, kind):
    tokenizer = {"char": char_tokenizer, "word": word_tokenizer, "bpe": bpe_tokenizer}[kind]()
    path = tmp_path / "nested" / "dir" / "tokenizer.json"
    save_tokenizer(tokenizer, path)

    loaded = load_tokenizer(path)
    assert loaded.to_str() == tokenizer.to_str()
    assert loaded.post_processor is None

    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    sample = CHAR_TEXT if kind == "char" else "".join(SHAKESPEARE[:3])
    expected = tokenizer.encode(sample).ids
    assert hf.encode(sample) == expected
    assert hf(sample)["input_ids"] == expected
    assert hf.decode(expected) == tokenizer.decode(expected)


def test_save_leaves_no_temporary_file(tmp_path):
    save_tokenizer(char_tokenizer(), tmp_path / "tokenizer.json")
    save_tokenizer(char_tokenizer(), tmp_path / "tokenizer.json")  # overwriting is fine too
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]


def test_failed_save_keeps_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("old contents")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(outputs.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_tokenizer(char_tokenizer(), path)
    assert path.read_text() == "old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]


def test_load_missing_file_names_it_and_the_fix(tmp_path):
    path = tmp_path / "models" / "tokenizer.json"
    with pytest.raises(LmforgeError, match=r"tokenizer\.json not found.*dvc repro vocab"):
        load_tokenizer(path)


@pytest.mark.parametrize("contents", ["not json at all", json.dumps({"version": "1.0"}), ""])
def test_load_invalid_file_names_it(tmp_path, contents):
    path = tmp_path / "tokenizer.json"
    path.write_text(contents)
    with pytest.raises(LmforgeError, match=re.escape(str(path)) + r" is not a valid tokenizer\.json"):
        load_tokenizer(path)


def test_tokenizer_sha256_is_the_digest_of_the_file_bytes(tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(word_tokenizer(), path)
    assert tokenizer_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    again = tmp_path / "again.json"
    save_tokenizer(word_tokenizer(), again)
    assert tokenizer_sha256(again) == tokenizer_sha256(path)


# --- metrics -----------------------------------------------------------------------------------


def test_vocab_metrics_on_crafted_text():
    tokenizer = build_tokenizer(make_cfg("char"), ["abc"])
    # "d" and "é" are unseen: 6 tokens, 2 of them <unk>; "é" is 2 UTF-8 bytes, so 7 bytes.
    metrics = vocab_metrics(tokenizer, iter(["abcd", "aé"]))
    assert metrics == {
        "vocab_size": 5,
        "bytes_per_token": pytest.approx(7 / 6),
        "unk_rate": pytest.approx(2 / 6),
        "tokens": 6,
        "bytes": 7,
    }
    # Same numbers when the text comes in other pieces.
    assert vocab_metrics(tokenizer, iter(["ab", "cd", "a", "é"])) == metrics


def test_vocab_metrics_without_unk_token_and_on_empty_text():
    metrics = vocab_metrics(bpe_tokenizer(), ["Speak, speak."])
    assert metrics["unk_rate"] == 0.0
    assert metrics["bytes"] == len("Speak, speak.")
    assert metrics["bytes_per_token"] == pytest.approx(metrics["bytes"] / metrics["tokens"])
    empty = vocab_metrics(bpe_tokenizer(), [])
    assert empty["tokens"] == 0 and empty["bytes_per_token"] == 0.0 and empty["unk_rate"] == 0.0
