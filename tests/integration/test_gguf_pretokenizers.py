"""GGUF import honours ``tokenizer.ggml.pre``: for every pre-tokenizer name lmforge implements, a
GGUF file with that name tokenizes a multilingual text to the same ids in llama.cpp
(llama-cpp-python) and in the imported model directory; any other name is refused by name."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import pytest
import torch

from lmforge.interop.gguf import export_gguf, import_gguf, quantize, write_hyperparameters
from lmforge.interop.gguf_vocab import PRE_TOKENIZERS, hf_pre_tokenizer, write_tokenizer
from lmforge.interop.weights import GGUF, export_weights
from lmforge.model.directory import load_model_dir, save_model_dir
from lmforge.model.gpt import GPT, GPTConfig
from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# Scripts, digits in long runs, contractions in both cases, symbols beside punctuation, runs of
# spaces and tabs, CRLF, and the non-ASCII spaces llama.cpp reads differently (NBSP, U+2009, U+3000).
TEXT = ("In 1812, Napoleon's army of 600000 men crossed the Niemen. They'll say: \"We've WON'T\"... "
        "\u00c7a co\u00fbte 12,50 \u20ac \u2014 na\u00efve caf\u00e9, d\u00e9j\u00e0 vu!\n\n"
        "\u041c\u043e\u0441\u043a\u0432\u0430\u0301 \u2014 \u0441\u0442\u043e\u043b\u0438\u0446\u0430 "
        "\u0420\u043e\u0441\u0441\u0438\u0438; 1812 \u0433\u043e\u0434.  \u0395\u03bb\u03bb\u03ac\u03b4\u03b1 "
        "\u03b5\u03af\u03bd\u03b1\u03b9.\n"
        "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001\u6771\u4eac\u30bf\u30ef\u30fc\u3002"
        "\u4e2d\u6587\uff1a\u4f60\u597d\uff0c\u4e16\u754c\uff012024\u5e74\n"
        "\ud55c\uad6d\uc5b4 \ubb38\uc7a5\uc785\ub2c8\ub2e4. \uc548\ub155\ud558\uc138\uc694!\n"
        "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e\u0964  "
        "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645\u060c \u0646\u0635.\n"
        "Emoji \U0001f44b\U0001f3fd and \U0001f916\u200d tabs\tand   spaces   \r\n"
        "code: def f(x): return x**2 + 3.14159 ~ `ls -la` $HOME <a href='x'>\n"
        "ops a+~=b ~~ $~ ^~| x~y ~\n"
        "Numbers: 1234567890 \u00bd \u00b2 \u0663\u0664\u0665 \u0be7\u0be8  \u3000full\u3000width\u3000"
        "\uff21\uff22\uff23\uff11\uff12\uff13\n"
        "nbsp\u00a0here thin\u2009space ogham\u1680mark" + " " * 40 + "wide gap\n"
        "UPPERcase MixedCase camelCaseWord O'Neil l'\u00e9t\u00e9 I'M YOU'RE\n")
# The sentence of issue 20: 19 tokens in GPT-2's split where llama.cpp's Llama 3 split gives 17.
NAPOLEON = "In 1812, Napoleon's army of 600000 men"


def llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed; `make install-test` installs it from the prebuilt wheel.")
    import llama_cpp

    return llama_cpp


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory) -> dict:
    """A byte-level BPE vocabulary learnt on TEXT without any split, so that its merges cross every
    boundary a pre-tokenizer may draw: a wrong split shows as different ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.train_from_iterator(TEXT.split("\n") * 3, trainer)
    return json.loads(tokenizer.to_str())


def model_dir_with_split(path: Path, vocabulary: dict, name: str) -> Path:
    """A tiny Llama model directory whose tokenizer is ``vocabulary`` split as llama.cpp's ``name``."""
    from tokenizers import Tokenizer, decoders, models

    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in vocabulary["model"]["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary["model"]["vocab"], merges=merges,
                                     ignore_merges=PRE_TOKENIZERS[name].ignore_merges))
    tokenizer.pre_tokenizer = hf_pre_tokenizer(name)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path.parent / f"{path.name}-tokenizer.json"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=32, n_layer=1, n_head=2, n_embd=32,
                          positions="rope", norm="rmsnorm", mlp="swiglu", bias=False))
    return save_model_dir(path, model, path.parent / f"{path.name}-tokenizer.json",
                          {"kind": "bpe", "eot_token": "<|endoftext|>", "eot_id": 0})


def gguf_named(path: Path, model_dir: Path, pre: str | None) -> Path:
    """``model_dir`` as a GGUF file whose ``tokenizer.ggml.pre`` is ``pre`` (None: no such key),
    written with export's own pieces: the files other converters write under each name."""
    loaded = load_model_dir(model_dir)
    writer = gguf.GGUFWriter(str(path), "llama")
    write_hyperparameters(writer, gguf, loaded.model.config, "llama", "pre", "f32")
    if pre is None:  # no tokenizer.ggml.pre: how files from before llama.cpp named its splits look
        writer.add_tokenizer_pre = lambda name: None
    write_tokenizer(writer, json.loads(loaded.tokenizer.to_str()), pre, loaded.model.config.vocab_size, 0)
    for name, tensor in export_weights(loaded.model, "llama", GGUF).items():
        data, qtype = quantize(gguf, name, tensor.numpy(), "f32")
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_ids(path: Path, text: str) -> list[int]:
    llm = llama_cpp().Llama(str(path), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode(), add_bos=False, special=False)


@pytest.mark.parametrize("name", sorted(PRE_TOKENIZERS))
def test_import_tokenizes_as_llama_cpp_does_for_every_pre_tokenizer_name(tmp_path, vocabulary, name):
    model_dir = model_dir_with_split(tmp_path / "model", vocabulary, name)
    path = gguf_named(tmp_path / f"{name}.gguf", model_dir, name)
    imported = load_model_dir(import_gguf(path, tmp_path / "imported"))
    assert imported.tokenizer.encode(TEXT).ids == llama_cpp_ids(path, TEXT)
    assert imported.tokenizer.decode(imported.tokenizer.encode(TEXT).ids) == TEXT


def test_a_file_without_a_pre_tokenizer_splits_as_llama_cpp_default(tmp_path, vocabulary):
    model_dir = model_dir_with_split(tmp_path / "model", vocabulary, "default")
    path = gguf_named(tmp_path / "old.gguf", model_dir, None)
    assert "tokenizer.ggml.pre" not in gguf.GGUFReader(str(path)).fields
    imported = load_model_dir(import_gguf(path, tmp_path / "imported"))
    assert imported.tokenizer.encode(TEXT).ids == llama_cpp_ids(path, TEXT)


def test_the_splits_differ_so_the_comparison_can_fail(tmp_path, vocabulary):
    """GPT-2's split gives other ids than Llama 3's, Qwen2's and SmolLM's on the same vocabulary:
    an import that ignored tokenizer.ggml.pre (as lmforge once did) fails the test above."""
    ids = {}
    for name in ("gpt-2", "llama-bpe", "qwen2", "smollm"):
        model_dir = model_dir_with_split(tmp_path / name, vocabulary, name)
        ids[name] = llama_cpp_ids(gguf_named(tmp_path / f"{name}.gguf", model_dir, name), TEXT)
    assert all(ids[name] != ids["gpt-2"] for name in ("llama-bpe", "qwen2", "smollm"))
    assert ids["qwen2"] != ids["llama-bpe"]  # one digit at a time, against up to three


def test_the_napoleon_sentence_of_issue_20(tmp_path):
    """The issue's report, on a vocabulary learnt with GPT-2's split: Llama 3's split cuts digits into
    runs of at most three and the space off them (' 1812' -> ' ', '181', '2'), GPT-2's keeps ' 1812'
    whole, so the two count different tokens (9 and 14 here), each equal to llama.cpp's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.train_from_iterator([NAPOLEON * 4, "600 000 1812 army men"], trainer)
    vocabulary = json.loads(tokenizer.to_str())
    counts = {}
    for name in ("gpt-2", "llama-bpe"):
        path = gguf_named(tmp_path / f"{name}.gguf", model_dir_with_split(tmp_path / name, vocabulary, name), name)
        imported = load_model_dir(import_gguf(path, tmp_path / f"{name}-imported"))
        counts[name] = len(imported.tokenizer.encode(NAPOLEON).ids)
        assert imported.tokenizer.encode(NAPOLEON).ids == llama_cpp_ids(path, NAPOLEON)
    assert counts["gpt-2"] != counts["llama-bpe"]


@pytest.mark.parametrize("name", ["kimi-k2", "superbpe", "no-such-split"])
def test_a_pre_tokenizer_lmforge_does_not_implement_is_refused_by_name(tmp_path, capsys, vocabulary, name):
    model_dir = model_dir_with_split(tmp_path / "model", vocabulary, "gpt-2")
    path = gguf_named(tmp_path / "m.gguf", model_dir, name)
    code, out, err = run_cli(["import", "--format", "gguf", path, tmp_path / "imported"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: {path}: tokenizer.ggml.pre='{name}' is a pre-tokenizer lmforge does not implement")
    assert "llama-bpe" in err and "qwen2" in err  # what it does implement
    assert not (tmp_path / "imported").exists()


@pytest.mark.parametrize("name", sorted({group.names[0] for group in PRE_TOKENIZERS.values()}))
def test_export_names_the_split_of_the_model_tokenizer(tmp_path, vocabulary, name):
    """An imported Qwen2 or Llama 3 vocabulary exports back under its own name, and llama.cpp
    then tokenizes as the model directory does."""
    model_dir = model_dir_with_split(tmp_path / "model", vocabulary, name)
    path = export_gguf(model_dir, tmp_path / "m.gguf")
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == name
    assert llama_cpp_ids(path, TEXT) == load_model_dir(model_dir).tokenizer.encode(TEXT).ids


def test_export_refuses_a_split_llama_cpp_has_no_name_for(tmp_path, capsys, vocabulary):
    model_dir = model_dir_with_split(tmp_path / "model", vocabulary, "gpt-2")
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\w+|\W"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    code, out, err = run_cli(["export", "--model", model_dir, "--format", "gguf", tmp_path / "m.gguf"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "a tokenizer.kind=bpe vocabulary has no faithful GGUF encoding" in err
    assert not (tmp_path / "m.gguf").exists()
