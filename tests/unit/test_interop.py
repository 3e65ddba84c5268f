"""The pieces of lmforge.interop that need no other program: the one weight-name table per family,
the lineage a shared GGUF may carry, the model directory's guards (tokenizer wider than the
embedding, an existing output) and the permissions of what it writes."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.interop.hf_config import GPT2, LLAMA, QWEN3
from lmforge.interop.weights import GGUF, HF, TABLES, export_weights, import_weights
from lmforge.model.directory import load_model_dir, refuse_existing, save_model_dir
from lmforge.model.gpt import GPT, GPTConfig
from tests.helpers import make_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

GPT2_STYLE = dict(positions="learned", norm="layernorm", mlp="gelu_tanh")
LLAMA_STYLE = dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False)
CASES = {
    "gpt2-tied": (GPT2, dict(GPT2_STYLE)),
    "gpt2-untied-no-bias": (GPT2, dict(GPT2_STYLE, bias=False, tie_embeddings=False)),
    "llama-untied": (LLAMA, dict(LLAMA_STYLE, tie_embeddings=False)),
    "llama-tied-bias": (LLAMA, dict(LLAMA_STYLE, tie_embeddings=True, bias=True)),
}


def random_model(**options) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**dict(dict(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_embd=32), **options)))
    with torch.no_grad():  # norm gains of 1 and biases of 0 would hide a misplaced tensor
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


# ---------------------------------------------------------------------------------------------
# One weight-name table per family
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TABLES)
def test_each_family_names_every_module_once_in_each_format(family):
    rows = TABLES[family]
    for column in ("ours", "hf", "gguf"):
        names = [getattr(row, column) for row in rows]
        assert len(set(names)) == len(names), f"{family}: a {column} name appears twice"
    style = GPT2_STYLE if family == GPT2 else dict(LLAMA_STYLE, qk_norm=family == QWEN3)
    model = random_model(**style, tie_embeddings=False)
    ours = {re.sub(r"\.h\.\d+\.", ".h.{i}.", k.rsplit(".", 1)[0]) for k in model.state_dict()}
    assert {row.ours for row in rows} == ours  # every module of our model has a row, and no row is stale


# A llama GGUF has no biases (gguf.gguf_family refuses bias=true before any weight is named).
ROUND_TRIPS = [(case, fmt) for case in CASES for fmt in (HF, GGUF) if not (fmt == GGUF and case == "llama-tied-bias")]


@pytest.mark.parametrize("case, fmt", ROUND_TRIPS)
def test_export_then_import_gives_back_every_weight_bit_for_bit(case, fmt):
    family, options = CASES[case]
    model = random_model(**options)
    back = import_weights(export_weights(model, family, fmt), model.config, family, fmt, Path("x"))
    ours = model.state_dict()
    assert back.keys() == ours.keys()
    for name in ours:
        assert torch.equal(back[name], ours[name]), name


def test_a_tied_gpt2_gguf_stores_the_output_as_a_copy_of_the_embedding():
    # llama.cpp's converter writes GPT-2's output.weight (GPT2Model.modify_tensors); llama.cpp builds of
    # early 2025 refuse a gpt2 file without it. transformers and a tied Llama GGUF store it once.
    model = random_model(**GPT2_STYLE)
    gguf = export_weights(model, GPT2, GGUF)
    assert torch.equal(gguf["output.weight"], gguf["token_embd.weight"])
    assert "lm_head.weight" not in export_weights(model, GPT2, HF)
    assert "output.weight" not in export_weights(random_model(**LLAMA_STYLE), LLAMA, GGUF)


def test_the_formats_own_layouts():
    model = random_model(**dict(LLAMA_STYLE, tie_embeddings=False))
    c, hf, gguf = model.config, export_weights(model, LLAMA, HF), export_weights(model, LLAMA, GGUF)
    c_attn = model.state_dict()["transformer.h.0.attn.c_attn.weight"]
    q_rows = c.n_head * c.head_dim
    assert torch.equal(hf["model.layers.0.self_attn.q_proj.weight"], c_attn[:q_rows])  # a slice
    q = gguf["blk.0.attn_q.weight"]  # llama.cpp's pair order: row 1 of a head is our row head_dim/2
    assert torch.equal(q[1], c_attn[c.head_dim // 2]) and torch.equal(q[2], c_attn[1])
    gpt2 = random_model(**GPT2_STYLE)
    assert torch.equal(export_weights(gpt2, GPT2, HF)["transformer.h.1.mlp.c_fc.weight"],
                       gpt2.state_dict()["transformer.h.1.mlp.c_fc.weight"].t())  # Conv1D: (in, out)


def test_a_tensor_no_row_accounts_for_is_refused_not_dropped():
    # A Llama 3.1 GGUF carries rope_freqs.weight (its RoPE scaling): dropping it would change the function.
    model = random_model(**dict(LLAMA_STYLE, tie_embeddings=False))
    tensors = {**export_weights(model, LLAMA, GGUF), "rope_freqs.weight": torch.ones(4)}
    with pytest.raises(LmforgeError, match=r"^m.gguf has the tensor 'rope_freqs.weight', which lmforge's llama"):
        import_weights(tensors, model.config, LLAMA, GGUF, Path("m.gguf"))
    hf = export_weights(model, LLAMA, HF)
    del hf["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(LmforgeError, match=r"has no weight 'model.layers.1.mlp.up_proj.weight'"):
        import_weights(hf, model.config, LLAMA, HF, Path("hf"))
    hf = {**export_weights(model, LLAMA, HF), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    import_weights(hf, model.config, LLAMA, HF, Path("hf"))  # a buffer transformers once saved: not a weight


# ---------------------------------------------------------------------------------------------
# What a shared GGUF may say about where it came from
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, shared", [
    ("sqlite:////home/ana/project/mlflow.db", None),
    ("sqlite:///mlflow.db", None),
    ("file:///home/ana/mlruns", None),
    ("/home/ana/project/data/prepared", None),
    ("~/corpus", None),
    ("C:\\Users\\ana\\mlflow.db", None),
    ("postgresql://ana:secret@db.internal/mlflow", None),
    ("https://ana:secret@mlflow.example.org:5000/", "https://mlflow.example.org:5000/"),
    ("http://mlflow.example.org", "http://mlflow.example.org"),
    ("data/prepared", "data/prepared"),
    ("0f3c9a1b2d4e4f5a8b7c6d5e4f3a2b1c", "0f3c9a1b2d4e4f5a8b7c6d5e4f3a2b1c"),
    ("d41d8cd98f00b204e9800998ecf8427e.dir", "d41d8cd98f00b204e9800998ecf8427e.dir"),
])
def test_a_shared_file_carries_no_local_path_and_no_password(value, shared):
    from lmforge.interop.gguf import shareable

    assert shareable(value) == shared


# ---------------------------------------------------------------------------------------------
# The model directory: guards and permissions
# ---------------------------------------------------------------------------------------------


def test_every_load_refuses_a_tokenizer_wider_than_the_embedding(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    rows = load_model_dir(model_dir).model.config.vocab_size
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({"id": rows, "content": "<|extra|>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(LmforgeError) as err:
        load_model_dir(model_dir)
    message = str(err.value)
    assert message.startswith(f"{model_dir / 'tokenizer.json'} has ") and "\n" not in message
    assert f"ids up to {rows}" in message and f"has only {rows} rows" in message


def test_an_existing_output_is_refused_unless_forced(tmp_path):
    refuse_existing(tmp_path / "new", force=False)
    (tmp_path / "old").mkdir()
    with pytest.raises(LmforgeError, match=r"old already exists; choose another output directory, or give --force"):
        refuse_existing(tmp_path / "old", force=False)
    refuse_existing(tmp_path / "old", force=True)


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                       (0o077, 0o600, 0o700)])
def test_the_model_directory_honours_the_umask(tmp_path, mask, file_mode, dir_mode):
    """safetensors writes model.safetensors 0600 whatever the umask: another user or a service
    account could not read the weights beside a world-readable config.json."""
    from lmforge.interop.hf import export_hf

    with umask(mask):
        model_dir = make_model_dir(tmp_path / "model")
        hf_dir = export_hf(model_dir, tmp_path / "hf")
        save_model_dir(model_dir, load_model_dir(model_dir).model, model_dir / "tokenizer.json",
                       {"kind": "char", "eot_token": "<|endoftext|>", "eot_id": 0})  # a replacement, too
    for root in (model_dir, hf_dir):
        found = modes(root)
        assert "model.safetensors" in found
        assert found == {name: dir_mode if (root / name).is_dir() else file_mode for name in found}, root


def test_missing_extras_name_the_pip_install(monkeypatch):
    from lmforge.engines.ray import RayEngine
    from lmforge.interop.gguf import export_gguf, import_gguf

    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` meets where it is not installed
    with pytest.raises(LmforgeError) as err:
        export_gguf("any-model", "out.gguf")
    assert str(err.value) == "lmforge export --format gguf needs the `gguf` extra: pip install 'lmforge[gguf]'"
    with pytest.raises(LmforgeError, match=r"^lmforge import --format gguf needs the `gguf` extra: "
                                           r"pip install 'lmforge\[gguf\]'$"):
        import_gguf("any.gguf", "out")
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(LmforgeError, match=r"^data.engine=ray needs the `ray` extra: pip install 'lmforge\[ray\]' "
                                           r"\(or set data.engine=local\)$"):
        from omegaconf import OmegaConf

        RayEngine(len, OmegaConf.create({"engine": "ray", "ray_address": None, "workers": 1}), "prepare")


def test_a_misshapen_weight_is_one_sentence_not_a_traceback():
    model = random_model(**dict(LLAMA_STYLE, tie_embeddings=False))
    for fmt, name in ((GGUF, "blk.0.attn_k.weight"), (HF, "model.layers.1.mlp.gate_proj.weight")):
        tensors = export_weights(model, LLAMA, fmt)
        tensors[name] = tensors[name][:, :-1]  # a column short: the pieces no longer concatenate
        with pytest.raises(LmforgeError, match=r"does not give the \(\d+, 32\) its configuration needs"):
            import_weights(tensors, model.config, LLAMA, fmt, Path("m"))
    tensors = export_weights(model, LLAMA, GGUF)
    tensors["blk.1.attn_q.weight"] = tensors["blk.1.attn_q.weight"][:-1]  # rows no longer split into heads
    with pytest.raises(LmforgeError, match=r"^m: 'blk.1.attn_q.weight' \(3 piece\(s\) of shape"):
        import_weights(tensors, model.config, LLAMA, GGUF, Path("m"))
