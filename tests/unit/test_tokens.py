"""The tokenize stage: the fast encoder equals the tokenizer, chunks, shards, index, workers."""

from __future__ import annotations

import json
import pickle
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from lmforge.config.paths import DOC_SEPARATOR
from lmforge.corpus.stage import prepare_stage
from lmforge.engines.local import ProcessPool
from lmforge.errors import LmforgeError
from lmforge.tokenization import encode as tokens
from lmforge.tokenization import pretokenize
from lmforge.tokenization.chunks import is_safe_cut, iter_chunks
from lmforge.tokenization.encode import ChunkEncoder, encode_chunk, tokenize_stage
from lmforge.tokenization.shards import TokenStream, token_dtype
from lmforge.tokenization.tokenizer import Encoder, load_tokenizer, tokenizer_sha256
from lmforge.tokenization.vocab import build_tokenizer, vocab_stage
from tests.helpers import write_corpus

HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRAINING_TEXT = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    "Café, naïve, Ελληνικά, русский, 東京 and emoji 🎭; tabs\tand  runs   of spaces. 1999 1,000.50\n",
    "It's, we'll, they're, I'd, you've, I'm \u00a0nbsp\u2003em-space ¹²³ ½ ﬁ\n",
    "Runs of whitespace, so that byte-level BPE learns tokens for them:\n\n\n\n  \n\n\t\t\n\n  a\n\nB\n\n",
]


@cache
def tokenizer(kind: str, lowercase: bool = False):
    specials = {"char": ["<|endoftext|>", "<unk>"], "bpe": ["<|endoftext|>"],
                "word": ["<pad>", "<unk>", "<bos>", "<eos>"]}
    cfg = OmegaConf.create({"kind": kind, "vocab_size": {"char": None, "word": 200, "bpe": 600}[kind],
                            "min_frequency": 1, "lowercase": lowercase, "special_tokens": specials[kind],
                            "eot_token": specials[kind][-1] if kind == "word" else "<|endoftext|>"})
    return build_tokenizer(cfg, TRAINING_TEXT * 3)


KINDS = [("char", False), ("bpe", False), ("word", False), ("word", True)]
# Text the fast path handles (checked characters only), with specials and the corpus' characters.
checked_text = st.lists(st.one_of(
    st.text(alphabet=st.characters(max_codepoint=0x52F), max_size=8),
    st.text(alphabet=st.characters(min_codepoint=0x2000, max_codepoint=0x206F), max_size=3),
    st.sampled_from(["<|endoftext|>", "<eos>", "\n", " ", "'s", "  \n", "speak", "Café"]))).map("".join)
any_text = st.one_of(st.text(), checked_text)


@pytest.mark.parametrize("kind, lowercase", KINDS)
def test_the_encoder_takes_the_fast_path_for_our_tokenizers(kind, lowercase):
    assert Encoder(tokenizer(kind, lowercase)).kind == {"char": "char", "bpe": "byte_level", "word": "word"}[kind]


@pytest.mark.parametrize("kind, lowercase", KINDS)
@HYPOTHESIS
@given(text=any_text)
def test_the_encoder_gives_the_tokenizers_ids_for_any_text(kind, lowercase, text):
    tok = tokenizer(kind, lowercase)
    assert Encoder(tok).encode(text).tolist() == tok.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("kind, lowercase", KINDS)
def test_the_encoder_on_mixed_scripts_and_long_text(kind, lowercase):
    tok = tokenizer(kind, lowercase)
    text = "".join(TRAINING_TEXT) * 50 + "\n  东京 line\n\nnext\n 末\nLatin again's\n" * 20 + "<|endoftext|>tail"
    assert Encoder(tok).encode(text).tolist() == tok.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("kind, lowercase", KINDS)
@HYPOTHESIS
@given(text=st.text(alphabet=st.sampled_from(list("aB1 .*'\n\t\u00a0\u2014東")), max_size=80))
def test_the_encoder_around_lines_it_hands_to_the_tokenizer(kind, lowercase, text):
    # 東 sends its line to the tokenizer; the whitespace around the cuts must split as in the whole.
    tok = tokenizer(kind, lowercase)
    assert Encoder(tok).encode(text).tolist() == tok.encode(text, add_special_tokens=False).ids


def test_the_bpe_vocabulary_has_whitespace_runs_to_get_wrong():
    # Otherwise "\n\n" and "\n" "\n" would encode alike and the tests above could not tell them apart.
    assert tokenizer("bpe").token_to_id("ĊĊ") is not None


def test_safe_cuts():
    assert is_safe_cut("a\nB", 2)
    assert not is_safe_cut("a\n\nB", 3)  # byte-level BPE: "\n" "\n" "B", but "\n\n" at a chunk's end
    assert not is_safe_cut("a \nB", 3) and not is_safe_cut("a\n B", 2) and not is_safe_cut("aB", 1)
    assert not is_safe_cut("a\n", 2)  # nothing after it


@pytest.mark.parametrize("kind, lowercase", KINDS)
@HYPOTHESIS
@given(text=st.text(alphabet=st.sampled_from(list("aB1 .*\n\t\u00a0\u2014東" + DOC_SEPARATOR)), max_size=300),
       chunk_chars=st.integers(min_value=4, max_value=60))
def test_encoding_in_chunks_equals_encoding_whole_documents(tmp_path_factory, kind, lowercase, text, chunk_chars):
    path = tmp_path_factory.mktemp("chunks") / "train.txt"
    path.write_text(text, encoding="utf-8")
    chunks = list(iter_chunks(path, chunk_chars))
    # Only where iter_chunks found a safe place (a chunk with none is cut anywhere, on purpose).
    assume(all(c.endswith(DOC_SEPARATOR) or is_safe_cut(c + following, len(c))
               for c, following in zip(chunks, chunks[1:])))
    tok = tokenizer(kind, lowercase)
    eot = tok.token_to_id("<eos>" if kind == "word" else "<|endoftext|>")
    by_chunk = [i for c in chunks for i in encode_chunk(Encoder(tok), c, eot).tolist()]
    whole = []
    for number, document in enumerate(text.split(DOC_SEPARATOR)):
        whole += ([eot] if number else []) + tok.encode(document, add_special_tokens=False).ids
    assert by_chunk == whole


@pytest.mark.parametrize("kind", ["bpe", "word"])
def test_pre_tokens_agree_with_the_tokenizer_for_every_checked_character(kind):
    # The fast path's character classes stand in for Oniguruma's \s, \p{L}, \p{N} and
    # punctuation; compare the pre-tokens (not ids, which a small vocabulary could hide) for each
    # checked character in the contexts where its class matters.
    tok = tokenizer(kind)
    pattern = pretokenize.BYTE_LEVEL_PATTERN if kind == "bpe" else pretokenize.WORD_PATTERN
    alphabet = pretokenize.byte_level_alphabet()
    disagree = []
    for c in pretokenize.checked_characters():
        code = ord(c)
        probe = f"a{c}b {c}{c} 1{c}2 {c}x\n{c} x {c}\n\n{c}y.{c}"
        expected = [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(probe)]
        ours = pattern.findall(probe)
        if kind == "bpe":
            ours = ["".join(alphabet[b] for b in piece.encode("utf-8")) for piece in ours]
        if ours != expected:
            disagree.append(hex(code))
    assert not disagree


def test_another_tokenizer_is_encoded_by_the_tokenizer_itself():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    encoder = Encoder(tok)
    assert encoder.kind == "tokenizer"
    assert encoder.encode("a b c").tolist() == [0, 1, 2]


def test_encode_chunk_puts_eot_between_documents():
    tok = tokenizer("char")
    encoder = Encoder(tok)
    ids = encode_chunk(encoder, f"ab{DOC_SEPARATOR}ba{DOC_SEPARATOR}", eot_id=0)
    a, b = tok.token_to_id("a"), tok.token_to_id("b")
    assert ids.tolist() == [a, b, 0, b, a, 0]


def test_the_worker_encoder_pickles_without_its_encoder_and_gives_the_chunks_ids():
    # One worker encoder for every engine: sent to a worker once (pickled without what it built), it
    # builds its Encoder there on its first chunk and keeps it for the next ones.
    tok = tokenizer("bpe")
    chunk = f"Speak, speak.{DOC_SEPARATOR}Café 東京\n"
    worker = ChunkEncoder(tok.to_str(), eot_id=0, dtype=np.uint16)
    expected = encode_chunk(Encoder(tok), chunk, 0).astype(np.uint16).tobytes()
    assert worker(chunk) == expected
    built = worker._encoder
    assert worker(chunk) == expected and worker._encoder is built  # built once, not per chunk
    sent = pickle.loads(pickle.dumps(worker))
    assert sent._encoder is None and sent(chunk) == expected


def test_token_dtype_by_vocabulary_size():
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32


# --- chunks ------------------------------------------------------------------------------------


@HYPOTHESIS
@given(text=st.text(alphabet=st.sampled_from(list("ab \n\t\u00a0é東" + DOC_SEPARATOR)), max_size=400),
       chunk_chars=st.integers(min_value=1, max_value=40))
def test_chunks_join_to_the_file_and_cut_only_at_safe_places(tmp_path_factory, text, chunk_chars):
    path = tmp_path_factory.mktemp("chunks") / "train.txt"
    path.write_bytes(text.encode("utf-8"))
    chunks = list(iter_chunks(path, chunk_chars))
    assert "".join(chunks) == text
    assert all(chunks)
    start = 0
    for chunk in chunks[:-1]:
        end = start + len(chunk)
        safe = chunk.endswith(DOC_SEPARATOR) or is_safe_cut(text, end)
        has_safe_cut = DOC_SEPARATOR in chunk[:-1] or any(is_safe_cut(text, p) for p in range(start + 1, end))
        # A forced cut only where the whole chunk offers no safe place (by the rule tokenizers need:
        # is_safe_cut, whose own test is above).
        assert safe or not has_safe_cut or len(chunk) == chunk_chars
        start = end


def test_encoding_chunk_by_chunk_equals_encoding_documents_whole(tmp_path):
    tok = tokenizer("bpe")
    documents = ["".join(TRAINING_TEXT) * 20, "  indented\n\n\n  lines\n" * 30, "x" * 50]
    path = tmp_path / "train.txt"
    path.write_text(DOC_SEPARATOR.join(documents), encoding="utf-8")
    encoder = Encoder(tok)
    by_chunk = np.concatenate([encode_chunk(encoder, c, 0) for c in iter_chunks(path, 300)]).tolist()
    whole = []
    for i, doc in enumerate(documents):
        whole += ([0] if i else []) + tok.encode(doc, add_special_tokens=False).ids
    assert by_chunk == whole


# --- the stage ---------------------------------------------------------------------------------


@pytest.fixture
def prepared_cfg(tiny_cfg, tmp_path):
    """tiny_cfg on a small generated corpus, split by document, prepared, with a bpe vocabulary."""
    from lmforge.config.compose import compose_config
    from tests.helpers import ROOT

    cfg = compose_config(["model=tiny", "tokenizer=bpe", "tokenizer.vocab_size=400", "data.split=document",
                          "data.val_fraction=0.3"], conf_dir=ROOT / "conf")
    cfg.paths = tiny_cfg.paths
    cfg.data.sources = [str(write_corpus(tmp_path / "corpus", n_docs=16, words=300))]
    prepare_stage(cfg)
    vocab_stage(cfg)
    return cfg


def test_tokenize_writes_shards_and_index_that_decode_to_the_text(prepared_cfg):
    index = tokenize_stage(prepared_cfg)
    on_disk = json.loads(Path(prepared_cfg.paths.tokens, "index.json").read_text())
    assert on_disk == index
    tokenizer_path = Path(prepared_cfg.paths.vocab, "tokenizer.json")
    assert index["dtype"] == "uint16" and index["vocab_size"] == load_tokenizer(tokenizer_path).get_vocab_size()
    assert index["tokenizer_sha256"] == tokenizer_sha256(tokenizer_path)
    tok = load_tokenizer(tokenizer_path)
    for split in ("train", "val"):
        text = Path(prepared_cfg.paths.prepared, f"{split}.txt").read_text(encoding="utf-8")
        stream = TokenStream(prepared_cfg.paths.tokens, split)
        ids = stream.read(0, len(stream))
        counts = index["splits"][split]
        assert counts["tokens"] == len(ids)
        assert counts["documents"] == text.count(DOC_SEPARATOR) + 1 == int((ids == index["eot_id"]).sum()) + 1
        assert counts["bytes"] == len(text.encode("utf-8")) - text.count(DOC_SEPARATOR)
        decoded = tok.decode(ids.tolist(), skip_special_tokens=False)
        assert decoded == text.replace(DOC_SEPARATOR, "<|endoftext|>")


def test_worker_processes_write_the_same_tokens(prepared_cfg, monkeypatch):
    one = tokenize_stage(prepared_cfg)
    single = {s: TokenStream(prepared_cfg.paths.tokens, s).read(0, one["splits"][s]["tokens"])
              for s in ("train", "val")}
    monkeypatch.setattr(tokens, "_PARALLEL_MIN_BYTES", 0)
    through_workers = []
    pool_map = ProcessPool.map
    monkeypatch.setattr(ProcessPool, "map", lambda self, items: through_workers.append(1) or pool_map(self, items))
    prepared_cfg.data.workers = 2
    prepared_cfg.data.shard_size = 2000  # bytes: several shards, written in order across workers
    two = tokenize_stage(prepared_cfg)
    assert through_workers == [1, 1]  # both splits went through the worker pool
    assert len(two["splits"]["train"]["shards"]) > 2
    for split, ids in single.items():
        stream = TokenStream(prepared_cfg.paths.tokens, split)
        assert np.array_equal(stream.read(0, len(stream)), ids)


def test_a_vocabulary_over_65536_ids_writes_uint32(prepared_cfg):
    alphabet = "".join(map(chr, range(0x4E00, 0x9FA0))) + "".join(map(chr, range(0x20000, 0x2B000)))
    Path(prepared_cfg.paths.prepared, "train.txt").write_text(alphabet + "\nab", encoding="utf-8")
    Path(prepared_cfg.paths.prepared, "val.txt").write_text(alphabet[::-1], encoding="utf-8")
    prepared_cfg.tokenizer = OmegaConf.create({"kind": "char", "vocab_size": None, "min_frequency": 1,
                                               "lowercase": False, "special_tokens": ["<|endoftext|>", "<unk>"],
                                               "eot_token": "<|endoftext|>"})
    vocab_stage(prepared_cfg)
    index = tokenize_stage(prepared_cfg)
    assert index["vocab_size"] > 65_536 and index["dtype"] == "uint32"
    stream = TokenStream(prepared_cfg.paths.tokens, "val")
    assert stream.read(0, len(stream)).max() > 65_535


def test_tokenize_without_prepared_splits_names_the_stage_to_run(prepared_cfg):
    Path(prepared_cfg.paths.prepared, "val.txt").unlink()
    with pytest.raises(LmforgeError, match=r"val\.txt not found.*dvc repro prepare"):
        tokenize_stage(prepared_cfg)
    assert not Path(prepared_cfg.paths.tokens).exists()
