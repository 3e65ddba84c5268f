"""Tests for lmforge.hf: export to transformers and import from it, for the GPT-2 and Llama
families; the logits agree, the tokenizer travels, and what cannot be represented is refused."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.interop.hf import export_hf, import_hf
from lmforge.model.directory import load_model_dir
from tests.helpers import CHAR_TEXT, make_model_dir, run_cli

transformers = pytest.importorskip("transformers")

GPT2_STYLE = dict(positions="learned", norm="layernorm", mlp="gelu")
LLAMA_STYLE = dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False)
FAMILIES = {
    "gpt2": (GPT2_STYLE, "GPT2LMHeadModel"),
    "gpt2-gelu-tanh": (dict(GPT2_STYLE, mlp="gelu_tanh"), "GPT2LMHeadModel"),
    "gpt2-untied-no-bias": (dict(GPT2_STYLE, bias=False, tie_embeddings=False, mlp_hidden=48), "GPT2LMHeadModel"),
    "llama": (LLAMA_STYLE, "LlamaForCausalLM"),
    "llama-bias-tied": (dict(LLAMA_STYLE, bias=True, tie_embeddings=True, n_kv_head=None, rope_theta=500.0),
                        "LlamaForCausalLM"),
    "qwen3": (dict(LLAMA_STYLE, qk_norm=True), "Qwen3ForCausalLM"),
    "qwen3-tied": (dict(LLAMA_STYLE, qk_norm=True, tie_embeddings=True, n_kv_head=None), "Qwen3ForCausalLM"),
}


# Tiny tensors: one thread is fastest on a shared 2-core machine (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed_model_dir(path, **options):
    """A model directory whose weights are all non-trivial (norm gains and biases are not 1 and 0)."""
    from lmforge.model.directory import save_model_dir

    make_model_dir(path, **options)
    loaded = load_model_dir(path)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    meta = loaded.config["tokenizer"]
    return save_model_dir(path, loaded.model, path / "tokenizer.json", meta)


def random_ids(vocab_size: int, length: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_with_equal_logits_and_tokenizer(tmp_path, family):
    options, architecture = FAMILIES[family]
    model_dir = perturbed_model_dir(tmp_path / "model", **options)
    out = export_hf(model_dir, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == architecture
    ours = load_model_dir(model_dir)
    ids = random_ids(ours.model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.model(ids)[0], rtol=0, atol=1e-4)

    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "the queen speaks"
    assert tokenizer(text).input_ids == ours.tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == ours.eot_id
    assert tokenizer.decode(tokenizer(text).input_ids) == text


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(positions="sinusoidal"),
         "a model with positions=sinusoidal, norm=layernorm, mlp=gelu cannot be exported"),
        (dict(positions="rope"), "a model with positions=rope, norm=layernorm, mlp=gelu cannot be exported"),
        (dict(GPT2_STYLE, n_kv_head=2), "model.n_kv_head=2 (grouped-query attention) has no GPT-2 counterpart"),
        (dict(GPT2_STYLE, qk_norm=True), "model.qk_norm=true has no GPT-2 counterpart"),
        (dict(LLAMA_STYLE, qk_norm=True, bias=True), "model.bias=true with model.qk_norm=true has no transformers"),
        (dict(LLAMA_STYLE, logit_softcap=30.0), "model.logit_softcap=30.0 has no counterpart"),
        (dict(LLAMA_STYLE, mlp="relu2"), "a model with positions=rope, norm=rmsnorm, mlp=relu2 cannot be exported"),
    ],
)
def test_export_refuses_what_neither_family_represents(tmp_path, capsys, options, message):
    model_dir = make_model_dir(tmp_path / "model", **options)
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_hf(model_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing half-written
    code, out, err = run_cli(["export", "--model", model_dir, "--format", "hf", tmp_path / "hf"], capsys)
    assert code == 1 and err.startswith(f"error: {message}") and err.count("\n") == 1


def save_transformers_model(path, family: str, vocab_size: int, tokenizer_file,
                            activation: str = "gelu") -> transformers.PreTrainedModel:
    """A randomly initialised transformers model of ``family``, saved with a fast tokenizer at ``path``."""
    torch.manual_seed(2)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                         activation_function=activation, eos_token_id=0, bos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=80,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=777.0,
                                          tie_word_embeddings=False,
                                          eos_token_id=0, bos_token_id=0)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(path)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>")
    tokenizer.save_pretrained(path)
    return model


@pytest.mark.parametrize("family, activation", [("gpt2", "gelu"), ("gpt2", "gelu_new"), ("gpt2", "gelu_pytorch_tanh"),
                                                ("llama", None)])
def test_import_of_a_transformers_model_gives_equal_logits(tmp_path, family, activation):
    from lmforge.inference.generation import SamplingConfig, complete

    reference = make_model_dir(tmp_path / "reference")  # only for its char tokenizer
    vocab_size = load_model_dir(reference).tokenizer.get_vocab_size()
    hf = save_transformers_model(tmp_path / "hf", family, vocab_size, reference / "tokenizer.json", activation)
    out = import_hf(tmp_path / "hf", tmp_path / "imported")
    loaded = load_model_dir(out)
    if activation:  # GPT-2's own activation, the tanh approximation, is model.mlp=gelu_tanh
        assert loaded.model.config.mlp == ("gelu" if activation == "gelu" else "gelu_tanh")
    assert loaded.eot_id == 0 and loaded.config["tokenizer"]["eot_token"] == "<|endoftext|>"
    ids = random_ids(vocab_size, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids)[0], hf(ids).logits, rtol=0, atol=1e-4)
    # ... and it samples, and exports back to the same transformers model.
    assert isinstance(complete(loaded, "the king", SamplingConfig(max_new_tokens=10, seed=0)), str)
    again = transformers.AutoModelForCausalLM.from_pretrained(export_hf(out, tmp_path / "again")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)


def test_export_import_round_trip_keeps_the_config(tmp_path):
    for family in ("gpt2", "gpt2-gelu-tanh", "llama", "qwen3"):
        model_dir = make_model_dir(tmp_path / family, **FAMILIES[family][0])
        back = import_hf(export_hf(model_dir, tmp_path / f"{family}-hf"), tmp_path / f"{family}-back")
        assert load_model_dir(back).model.config == load_model_dir(model_dir).model.config


def test_import_command_and_its_errors(tmp_path, capsys):
    reference = make_model_dir(tmp_path / "reference")
    vocab_size = load_model_dir(reference).tokenizer.get_vocab_size()
    hf_dir = tmp_path / "hf"
    save_transformers_model(hf_dir, "gpt2", vocab_size, reference / "tokenizer.json")

    code, out, err = run_cli(["import", "--format", "hf", hf_dir, tmp_path / "imported"], capsys)
    assert code == 0 and "train.init_from=" in out and "model.n_layer=2" in out
    code, out, err = run_cli(["generate", "--model", tmp_path / "imported", "--prompt", "the", "--max-new-tokens", 5,
                              "--seed", 0], capsys)
    assert code == 0 and out.startswith("the")

    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    code, out, err = run_cli(["import", "--format", "hf", hf_dir, tmp_path / "x"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "activation_function='relu' is none of the GELUs lmforge has (gelu, gelu_new, gelu_pytorch_tanh)" in err
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    code, out, err = run_cli(["import", "--format", "hf", hf_dir, tmp_path / "x"], capsys)
    assert code == 1 and "model_type='t5' is not supported" in err
    (hf_dir / "config.json").write_text(json.dumps(config))

    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, out, err = run_cli(["import", "--format", "hf", hf_dir, tmp_path / "x"], capsys)
    assert code == 1 and err.startswith(f"error: {weights} is missing, corrupt or truncated")
    weights.rename(hf_dir / "pytorch_model.bin")
    code, out, err = run_cli(["import", "--format", "hf", hf_dir, tmp_path / "x"], capsys)
    assert code == 1 and "has only pickled .bin weights, which lmforge never loads" in err
    (hf_dir / "tokenizer.json").unlink()
    code, out, err = run_cli(["import", "--format", "hf", hf_dir, tmp_path / "x"], capsys)
    assert code == 1 and err.startswith(f"error: {hf_dir / 'tokenizer.json'} is missing")
    assert not (tmp_path / "x").exists()


def test_export_command_writes_a_directory_transformers_can_generate_from(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    code, out, err = run_cli(["export", "--model", model_dir, "--format", "hf", tmp_path / "hf"], capsys)
    assert code == 0 and "GPT2LMHeadModel" in out
    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = tokenizer("the king", return_tensors="pt").input_ids
    generated = hf.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=0)
    text = tokenizer.decode(generated[0])
    assert text.startswith("the king") and set(text) <= set(CHAR_TEXT) | set("<|endoftext|>unk")


@pytest.mark.slow
def test_training_continues_from_an_imported_model(tiny_cfg, tmp_path):
    """A transformers model trained elsewhere, imported, is the starting point of train.init_from."""
    from safetensors.torch import load_file

    from lmforge.corpus.stage import prepare_stage
    from lmforge.tokenization.encode import tokenize_stage
    from lmforge.tokenization.shards import read_index
    from lmforge.tokenization.vocab import vocab_stage
    from lmforge.training.stage import train_stage
    from tests.helpers import write_corpus

    tiny_cfg.data.sources = [str(write_corpus(tmp_path / "corpus", n_docs=8, words=200))]
    prepare_stage(tiny_cfg)
    vocab_stage(tiny_cfg)
    tokenize_stage(tiny_cfg)
    vocab_size = read_index(tiny_cfg.paths.tokens)["vocab_size"]
    # The tiny config's architecture, trained "elsewhere", with the corpus's tokenizer.
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2, activation_function="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    hf.save_pretrained(tmp_path / "hf")
    transformers.PreTrainedTokenizerFast(tokenizer_file=f"{tiny_cfg.paths.vocab}/tokenizer.json",
                                         eos_token=tiny_cfg.tokenizer.eot_token).save_pretrained(tmp_path / "hf")
    imported = import_hf(tmp_path / "hf", tmp_path / "imported")

    # With a vanishing learning rate the trained weights are the imported ones.
    tiny_cfg.train.init_from = str(imported)
    tiny_cfg.train.max_steps = 2
    tiny_cfg.optimizer.update({"lr": 1e-12, "weight_decay": 0.0})
    if "muon_lr" in tiny_cfg.optimizer:  # the default optimizer is Muon: its matrices have their own rate
        tiny_cfg.optimizer.update({"muon_lr": 1e-12, "muon_weight_decay": 0.0})
    tiny_cfg.tracking.log_model = False
    start = load_file(imported / "model.safetensors")
    trained = load_file(train_stage(tiny_cfg) / "model.safetensors")
    assert start.keys() == trained.keys()
    for name in start:
        torch.testing.assert_close(trained[name], start[name], rtol=0, atol=1e-6)

    tiny_cfg.model.n_layer = 3
    with pytest.raises(LmforgeError, match=r"has a different architecture than the config; set model.n_layer=2"):
        train_stage(tiny_cfg)
    tiny_cfg.model.n_layer = 2
    other = make_model_dir(tmp_path / "other", vocab_size=vocab_size, block_size=32, n_head=2)
    tiny_cfg.train.init_from = str(other)
    with pytest.raises(LmforgeError, match="uses a different tokenizer than the token files"):
        train_stage(tiny_cfg)


@pytest.mark.parametrize("shard",
                         ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../outside.safetensors"])
def test_a_shard_name_outside_the_directory_is_refused(tmp_path, shard):
    # model.safetensors.index.json comes with a downloaded model: it must not name files elsewhere.
    from safetensors.torch import save_file

    from lmforge.interop.hf import _read_weights

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    save_file({"w": torch.zeros(2)}, "/tmp/outside.safetensors")
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(LmforgeError, match="not a file inside"):
        _read_weights(hf_dir)


def test_shards_inside_the_directory_are_read(tmp_path):
    from safetensors.torch import save_file

    from lmforge.interop.hf import _read_weights

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    save_file({"a": torch.ones(2)}, str(hf_dir / "model-00001.safetensors"))
    save_file({"b": torch.zeros(2)}, str(hf_dir / "model-00002.safetensors"))
    weight_map = {"a": "model-00001.safetensors", "b": "model-00002.safetensors"}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert sorted(_read_weights(hf_dir)) == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# Issue 20: items 13 and 18, and the hf extra named where the command is shown
# ---------------------------------------------------------------------------------------------


def wide_tokenizer_file(path, n_tokens: int):
    """A byte-level BPE tokenizer.json of exactly ``n_tokens`` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tests.helpers import write_corpus

    corpus = write_corpus(path.parent / "corpus", n_docs=40, words=800)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=n_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.train_from_iterator((p.read_text() for p in sorted(corpus.iterdir())), trainer)
    assert tokenizer.get_vocab_size() == n_tokens
    tokenizer.save(str(path))
    return path


def test_import_refuses_a_tokenizer_larger_than_the_embedding_table(tmp_path, capsys):
    """3000 tokens over 2000 embedding rows imported "fine", then evaluate ended in IndexError."""
    tokenizer = wide_tokenizer_file(tmp_path / "tokenizer.json", 3000)
    save_transformers_model(tmp_path / "hf", "gpt2", 2000, tokenizer)
    capsys.readouterr()  # transformers' own progress lines
    code, out, err = run_cli(["import", "--format", "hf", tmp_path / "hf", tmp_path / "imported"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path / 'hf' / 'tokenizer.json'} has 3000 tokens (ids up to 2999) but the "
                          f"embedding table ({tmp_path / 'hf' / 'config.json'} vocab_size) has only 2000 rows")
    assert not (tmp_path / "imported").exists()

    # A model directory put together by hand meets the same guard on every load.
    save_transformers_model(tmp_path / "hf", "gpt2", 3000, tokenizer)
    imported = import_hf(tmp_path / "hf", tmp_path / "imported")
    small = make_model_dir(tmp_path / "small")  # 26 rows
    (small / "tokenizer.json").write_bytes((imported / "tokenizer.json").read_bytes())
    (tmp_path / "text.txt").write_text("the king speaks\n")
    capsys.readouterr()
    for command in (["generate", "--model", small, "--prompt", "the"],
                    ["evaluate", "--model", small, "--data", tmp_path / "text.txt"]):
        code, out, err = run_cli(command, capsys)
        assert code == 1 and err.count("\n") == 1 and "has only 26 rows" in err, command


def test_gpt2_export_writes_n_ctx_as_well_as_n_positions(tmp_path):
    """llama.cpp's converter reads GPT-2's context length from n_ctx (a KeyError without it)."""
    out = export_hf(make_model_dir(tmp_path / "model"), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["n_ctx"] == config["n_positions"] == load_model_dir(tmp_path / "model").model.config.block_size
    assert transformers.AutoConfig.from_pretrained(out).n_positions == config["n_positions"]


def test_export_says_which_extra_loads_the_result(tmp_path, capsys):
    code, out, err = run_cli(["export", "--model", make_model_dir(tmp_path / "model"), "--format", "hf",
                              tmp_path / "hf"], capsys)
    assert code == 0 and "pip install 'lmforge[hf]'" in out


def test_import_refuses_a_weight_the_table_does_not_know(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    reference = make_model_dir(tmp_path / "reference")
    vocab_size = load_model_dir(reference).tokenizer.get_vocab_size()
    save_transformers_model(tmp_path / "hf", "llama", vocab_size, reference / "tokenizer.json")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    save_file({**weights, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)},
              tmp_path / "hf" / "model.safetensors")
    capsys.readouterr()  # transformers' own progress lines
    code, out, err = run_cli(["import", "--format", "hf", tmp_path / "hf", tmp_path / "imported"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "has the tensor 'model.layers.0.self_attn.q_norm.weight', which lmforge's llama model does not have" in err
