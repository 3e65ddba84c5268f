"""GGUF interchange: a model directory out as one GGUF file (llama.cpp, Ollama, LM Studio, Candle,
transformers' GGUF loader all read it), and a GGUF file of the same families back in.

The families are ``lmforge.hf_config``'s, under llama.cpp's names:

* ``gpt2``: learned positions, LayerNorm, fused qkv, tanh-approximate GELU. llama.cpp and
  transformers compute a gpt2 GGUF model's GELU with the tanh approximation, so only
  ``model.mlp=gelu_tanh`` exports; the exact-GELU ``gelu`` would come out a different function.
* ``llama``: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases. llama.cpp rotates
  adjacent pairs (2i, 2i+1) where we rotate halves (i, i + head_dim/2), so the q and k rows are
  permuted on the way out and back on the way in, exactly as llama.cpp's own converter does.

Weights keep our (out, in) Linear layout, which is GGUF's; a tied output layer is not stored
(both readers reuse ``token_embd``). Norms and biases stay float32 at every ``--dtype``; a matrix
whose rows are not whole Q8_0 blocks (32 values) stays float32 in a q8_0 file.

The tokenizer must be byte-level BPE: it is GGUF's ``gpt2`` tokenizer model with llama.cpp's
``gpt-2`` pre-tokenizer (GPT-2's split regex, which ours uses). Character and word vocabularies
have no faithful GGUF encoding and are refused (see ``_refuse_tokenizer``; the test that shows
why is in tests/test_gguf.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.hf import PAD_TOKENS
from lmforge.hf_config import GPT2, LLAMA, hf_family
from lmforge.model import GPT, GPTConfig
from lmforge.outputs import atomic_path
from lmforge.tokenizer import UNK_TOKEN

DTYPES = ("f32", "f16", "q8_0")
Q8_0_BLOCK = 32
# GGUF token types (llama.cpp's llama_token_type).
NORMAL, CONTROL, UNUSED = 1, 3, 5
LINEAGE_PREFIX = "lmforge."


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LmforgeError("the gguf package is not installed; run `pip install 'lmforge[gguf]'`.") from None
    return gguf


# ---------------------------------------------------------------------------------------------
# What can be exported
# ---------------------------------------------------------------------------------------------


def gguf_family(config: GPTConfig) -> str:
    """``"gpt2"`` or ``"llama"``: the GGUF architecture that computes ``config`` exactly.

    Raises LmforgeError with one sentence naming the settings that have no GGUF counterpart.
    """
    family = hf_family(config)  # refuses sinusoidal positions, RoPE with LayerNorm, ...
    if family == GPT2 and config.mlp != "gelu_tanh":
        raise LmforgeError(
            f"model.mlp={config.mlp} (exact erf GELU) has no GGUF counterpart: llama.cpp and transformers run a "
            "gpt2 GGUF model with the tanh-approximate GELU; train with model.mlp=gelu_tanh."
        )
    if family == GPT2 and config.mlp_hidden_size != 4 * config.n_embd:
        raise LmforgeError(
            f"model.mlp_hidden={config.mlp_hidden} has no GGUF gpt2 counterpart (transformers' GGUF loader "
            f"assumes 4 * n_embd = {4 * config.n_embd}); train with model.mlp_hidden=null."
        )
    if family == LLAMA and config.bias:
        raise LmforgeError(
            "model.bias=true with positions=rope, norm=rmsnorm, mlp=swiglu has no GGUF llama counterpart "
            "(llama GGUF files carry no MLP biases); train with model.bias=false."
        )
    return family


def _refuse_tokenizer(kind: str, tokenizer_json: dict) -> None:
    """Raise unless the tokenizer is byte-level BPE, which GGUF's ``gpt2`` tokenizer reproduces."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    byte_level = (
        tokenizer_json.get("model", {}).get("type") == "BPE"
        and tokenizer_json.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space", False)
        and pre.get("use_regex", True)
    )
    if byte_level:
        return
    why = {
        # Measured with llama.cpp 0.3.36 (tests/test_gguf.py): as GGUF's byte-level BPE, characters
        # outside the vocabulary vanish; as SentencePiece, tokenizing them aborts the process.
        "char": "llama.cpp drops characters outside the vocabulary (byte-level BPE) or aborts on them "
                "(SentencePiece) where lmforge gives <unk>",
        "word": "no GGUF tokenizer drops the spaces between words and splits off punctuation as lmforge's "
                "word tokenizer does",
    }.get(kind, "GGUF's tokenizers reproduce byte-level BPE only")
    raise LmforgeError(
        f"a tokenizer.kind={kind} vocabulary has no faithful GGUF encoding: {why}; "
        "train with tokenizer=bpe to export to GGUF."
    )


# ---------------------------------------------------------------------------------------------
# Tensors: our names <-> GGUF names
# ---------------------------------------------------------------------------------------------


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head from rotate-half order (i, i + d/2) to llama.cpp's pair order (2i, 2i+1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of ``rope_permute``."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_tensors(model: GPT, family: str) -> dict[str, np.ndarray]:
    """Our weights as float32 numpy arrays under llama.cpp's tensor names, in GGUF's row layout."""
    c = model.config
    ours = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": ours["transformer.wte.weight"]}
    for i in range(c.n_layer):
        src, dst = f"transformer.h.{i}.", f"blk.{i}."
        if family == GPT2:  # GPT-2 always has biases: bias=false exports zeros (the same function)
            pieces = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up",
                      "mlp.c_proj": "ffn_down", "ln_1": "attn_norm", "ln_2": "ffn_norm"}
            for ours_name, name in pieces.items():
                weight = ours[f"{src}{ours_name}.weight"]
                out[f"{dst}{name}.weight"] = weight
                out[f"{dst}{name}.bias"] = ours.get(f"{src}{ours_name}.bias", np.zeros(weight.shape[0], np.float32))
        else:
            q_rows, kv_rows = c.n_head * c.head_dim, c.kv_heads * c.head_dim
            q, k, v = np.split(ours[f"{src}attn.c_attn.weight"], [q_rows, q_rows + kv_rows])
            gate, up = np.split(ours[f"{src}mlp.c_fc.weight"], 2)
            out.update({
                f"{dst}attn_norm.weight": ours[f"{src}ln_1.weight"],
                f"{dst}attn_q.weight": rope_permute(q, c.n_head),
                f"{dst}attn_k.weight": rope_permute(k, c.kv_heads),
                f"{dst}attn_v.weight": v,
                f"{dst}attn_output.weight": ours[f"{src}attn.c_proj.weight"],
                f"{dst}ffn_norm.weight": ours[f"{src}ln_2.weight"],
                f"{dst}ffn_gate.weight": gate,
                f"{dst}ffn_up.weight": up,
                f"{dst}ffn_down.weight": ours[f"{src}mlp.c_proj.weight"],
            })
    out["output_norm.weight"] = ours["transformer.ln_f.weight"]
    if family == GPT2:
        out["position_embd.weight"] = ours["transformer.wpe.weight"]
        out["output_norm.bias"] = ours.get("transformer.ln_f.bias", np.zeros(c.n_embd, np.float32))
    if not c.tie_embeddings:
        out["output.weight"] = ours["lm_head.weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def from_gguf_tensors(tensors: dict[str, np.ndarray], config: GPTConfig, family: str,
                      source: Path) -> dict[str, torch.Tensor]:
    """The inverse of ``to_gguf_tensors``: GGUF tensors (float32 numpy) under our names, as torch tensors."""
    c = config

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise LmforgeError(f"{source} has no tensor '{name}'; the file is not a complete {family} model.")
        return tensors[name]

    out = {"transformer.wte.weight": take("token_embd.weight"), "transformer.ln_f.weight": take("output_norm.weight")}
    for i in range(c.n_layer):
        src, dst = f"blk.{i}.", f"transformer.h.{i}."
        if family == GPT2:
            pieces = {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc",
                      "ffn_down": "mlp.c_proj", "attn_norm": "ln_1", "ffn_norm": "ln_2"}
            for name, ours_name in pieces.items():
                out[f"{dst}{ours_name}.weight"] = take(f"{src}{name}.weight")
                out[f"{dst}{ours_name}.bias"] = take(f"{src}{name}.bias")
        else:
            out[f"{dst}attn.c_attn.weight"] = np.concatenate([
                rope_unpermute(take(f"{src}attn_q.weight"), c.n_head),
                rope_unpermute(take(f"{src}attn_k.weight"), c.kv_heads),
                take(f"{src}attn_v.weight"),
            ])
            out[f"{dst}attn.c_proj.weight"] = take(f"{src}attn_output.weight")
            out[f"{dst}mlp.c_fc.weight"] = np.concatenate([take(f"{src}ffn_gate.weight"), take(f"{src}ffn_up.weight")])
            out[f"{dst}mlp.c_proj.weight"] = take(f"{src}ffn_down.weight")
            out[f"{dst}ln_1.weight"] = take(f"{src}attn_norm.weight")
            out[f"{dst}ln_2.weight"] = take(f"{src}ffn_norm.weight")
    if family == GPT2:
        out["transformer.wpe.weight"] = take("position_embd.weight")
        out["transformer.ln_f.bias"] = take("output_norm.bias")
    out["lm_head.weight"] = out["transformer.wte.weight"] if c.tie_embeddings else take("output.weight")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in out.items()}


def _tensor_dtype(gguf, array: np.ndarray, dtype: str):
    # As llama.cpp's converter: vectors (norms, biases) stay float32; a q8_0 matrix needs whole
    # 32-value blocks along its rows, else it stays float32 too.
    if dtype == "f32" or array.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    if dtype == "f16":
        return gguf.GGMLQuantizationType.F16
    if array.shape[-1] % Q8_0_BLOCK:
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType.Q8_0


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_gguf(model_dir: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    """Write the model directory ``model_dir`` as the GGUF file ``out`` (``dtype``: f32, f16, q8_0).

    The file holds the hyperparameters, the tokenizer and the lineage keys (``lmforge.*``) that
    llama.cpp and ``transformers`` need and nothing else. Written atomically: a refusal or an
    error leaves no file. Returns ``out``; LmforgeError for what has no GGUF counterpart.
    """
    from lmforge.modeldir import load_model_dir

    if dtype not in DTYPES:
        raise LmforgeError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}.")
    loaded = load_model_dir(model_dir)
    config = loaded.model.config
    family = gguf_family(config)
    tokenizer_json = json.loads(loaded.tokenizer.to_str())
    _refuse_tokenizer(loaded.config["tokenizer"].get("kind", "unknown"), tokenizer_json)
    gguf = _gguf()
    tensors = to_gguf_tensors(loaded.model, family)
    out = Path(out)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), family)
        _write_hyperparameters(writer, gguf, config, family, loaded.path.name, dtype)
        _write_tokenizer(writer, tokenizer_json, config.vocab_size, loaded.eot_id)
        for key, value in lineage(loaded).items():
            writer.add_string(LINEAGE_PREFIX + key, value)
        for name, array in tensors.items():
            qtype = _tensor_dtype(gguf, array, dtype)
            if qtype == gguf.GGMLQuantizationType.Q8_0:
                writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            else:
                float_type = np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32
                writer.add_tensor(name, array.astype(float_type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def _write_hyperparameters(writer, gguf, config: GPTConfig, family: str, name: str, dtype: str) -> None:
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    writer.add_name(name)
    writer.add_file_type(file_type)
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.mlp_hidden_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    if family == GPT2:
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)


def _write_tokenizer(writer, tokenizer_json: dict, vocab_size: int, eot_id: int) -> None:
    """GGUF's ``gpt2`` tokenizer: tokens by id, merges, token types and the special ids."""
    vocab = dict(tokenizer_json["model"]["vocab"])
    special = {t["content"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
    for added in tokenizer_json.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    by_id = {i: token for token, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise LmforgeError(f"the tokenizer has ids up to {max(by_id)} but model.vocab_size={vocab_size}; "
                           "the model directory is inconsistent (retrain or re-import it).")
    # Ids the tokenizer never produces (a model wider than its vocabulary) are named as llama.cpp names them.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [UNUSED if i not in by_id else CONTROL if by_id[i] in special else NORMAL for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, which our ByteLevel pre-tokenizer uses
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eot_id)
    writer.add_eos_token_id(eot_id)
    writer.add_add_bos_token(False)  # our models were trained on documents without a leading token
    writer.add_add_eos_token(False)
    if UNK_TOKEN in vocab:
        writer.add_unk_token_id(vocab[UNK_TOKEN])
    pad = next((t for t in PAD_TOKENS if t in vocab), None)
    if pad is not None:
        writer.add_pad_token_id(vocab[pad])


def lineage(loaded) -> dict[str, str]:
    """The model's lineage as GGUF string values: its MLflow run (``run.json``) and, where that
    run's store is a local SQLite file, the run's commit and data hashes (``lmforge runs show``).
    """
    run = loaded.run()
    if not run:
        return {}
    keys = {f"mlflow.{k}": str(v) for k, v in run.items() if k in ("run_id", "experiment_id", "tracking_uri")}
    uri = str(run.get("tracking_uri", ""))
    if uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]).is_file():
        keys.update(_run_tags(uri, run["run_id"]))
    return keys


def _run_tags(uri: str, run_id: str) -> dict[str, str]:
    from lmforge.tracking import quiet_mlflow_env

    quiet_mlflow_env()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        tags = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags
    except MlflowException:
        return {}  # the run is gone from the store: the run id alone still names it
    wanted = {"mlflow.source.git.commit": "git_commit"}
    out = {short: tags[key] for key, short in wanted.items() if key in tags}
    out.update({k[len(LINEAGE_PREFIX):]: v for k, v in tags.items() if k.startswith(LINEAGE_PREFIX)})
    return out


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


def import_gguf(path: str | Path, out: str | Path) -> Path:
    """Turn a GGUF file of the ``gpt2`` or ``llama`` family into the model directory ``out``.

    f32 and f16 tensors load as they are; quantized ones (q8_0, ...) are dequantized to float32.
    The tokenizer must be GGUF's ``gpt2`` (byte-level BPE) model. Returns ``out``; LmforgeError
    with one sentence naming the file for anything truncated, missing or unsupported.
    """
    import tempfile

    from lmforge.modeldir import save_model_dir
    from lmforge.tokenizer import save_tokenizer

    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path} does not exist; give a .gguf file.")
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {name: field.contents() for name, field in reader.fields.items()}
        tensors = {t.name: np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, NotImplementedError) as err:
        raise LmforgeError(f"{path} is not a readable GGUF file, or it is truncated ({type(err).__name__}: {err}); "
                           "re-export or re-download it.") from None
    family, config = config_from_gguf(fields, tensors, path)
    tokenizer, eot_id = tokenizer_from_gguf(fields, path)
    state = from_gguf_tensors(tensors, config, family, path)
    model = GPT(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise LmforgeError(f"{path}: the tensors do not fit the file's own hyperparameters ({first}).") from None
    meta = {"kind": "bpe", "eot_token": tokenizer.id_to_token(eot_id), "eot_id": eot_id}
    lineage_keys = {k[len(LINEAGE_PREFIX):]: v for k, v in fields.items() if k.startswith(LINEAGE_PREFIX)}
    imported_from = {"path": str(path.resolve()), "architecture": f"gguf:{family}",
                     **({"lineage": lineage_keys} if lineage_keys else {})}
    with tempfile.TemporaryDirectory() as scratch:
        save_tokenizer(tokenizer, Path(scratch) / "tokenizer.json")
        return save_model_dir(out, model, Path(scratch) / "tokenizer.json", meta,
                              extra={"imported_from": imported_from})


def config_from_gguf(fields: dict[str, Any], tensors: dict[str, np.ndarray], source: Path) -> tuple[str, GPTConfig]:
    """(family, our config) from a GGUF file's metadata; LmforgeError naming what we cannot reproduce."""
    family = fields.get("general.architecture")
    if family not in (GPT2, LLAMA):
        raise LmforgeError(f"{source}: general.architecture={family!r} is not supported; "
                           "lmforge imports 'gpt2' and 'llama' GGUF files.")

    def need(key: str):
        if f"{family}.{key}" not in fields:
            raise LmforgeError(f"{source} lacks the metadata key {family}.{key}; the file is incomplete.")
        return fields[f"{family}.{key}"]

    if "token_embd.weight" not in tensors:
        raise LmforgeError(f"{source} has no tensor 'token_embd.weight'; the file is not a complete {family} model.")
    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    settings = dict(vocab_size=tensors["token_embd.weight"].shape[0], block_size=int(need("context_length")),
                    n_layer=int(need("block_count")), n_head=n_head, n_embd=n_embd,
                    tie_embeddings="output.weight" not in tensors)
    if family == GPT2:
        settings.update(positions="learned", norm="layernorm", mlp="gelu_tanh", bias=True,
                        norm_eps=_float32(need("attention.layer_norm_epsilon")))
        if int(need("feed_forward_length")) != 4 * n_embd:
            settings["mlp_hidden"] = int(need("feed_forward_length"))
    else:
        if fields.get("llama.rope.scaling.type", "none") != "none":
            raise LmforgeError(f"{source}: llama.rope.scaling.type={fields['llama.rope.scaling.type']!r} "
                               "is not plain RoPE, "
                               "so lmforge cannot reproduce this model exactly.")
        if any(name.endswith(".bias") for name in tensors):
            raise LmforgeError(f"{source} has bias tensors, which lmforge's llama family (model.bias=false) lacks.")
        rope_dims = int(fields.get("llama.rope.dimension_count", n_embd // n_head))
        if rope_dims != n_embd // n_head:
            raise LmforgeError(f"{source}: llama.rope.dimension_count={rope_dims} rotates part of each head; "
                               f"lmforge rotates all {n_embd // n_head} dimensions.")
        kv = int(fields.get("llama.attention.head_count_kv", n_head))
        hidden = int(need("feed_forward_length"))
        default_hidden = GPTConfig(vocab_size=1, n_embd=n_embd, n_head=n_head, mlp="swiglu").mlp_hidden_size
        settings.update(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                        n_kv_head=None if kv == n_head else kv, mlp_hidden=None if hidden == default_hidden else hidden,
                        norm_eps=_float32(need("attention.layer_norm_rms_epsilon")),
                        rope_theta=_float32(fields.get("llama.rope.freq_base", 10000.0)))
    try:
        return family, GPTConfig.from_dict(settings)
    except ValueError as err:
        raise LmforgeError(f"{source}: {err}") from None


def _float32(value) -> float:
    # GGUF stores these as float32: 1e-5 comes back 9.99999974e-06. The shortest decimal that
    # rounds to the same float32 is the value that was written, so a round trip keeps the config.
    return float(str(np.float32(value)))


def tokenizer_from_gguf(fields: dict[str, Any], source: Path):
    """(HuggingFace byte-level BPE Tokenizer, end-of-text id) from GGUF's ``gpt2`` tokenizer metadata."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2" or "tokenizer.ggml.tokens" not in fields:
        raise LmforgeError(f"{source}: tokenizer.ggml.model={kind!r} is not supported; lmforge imports GGUF's 'gpt2' "
                           "(byte-level BPE) tokenizer only.")
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([t for t, kind in zip(tokens, types) if kind == CONTROL])
    eot_id = fields.get("tokenizer.ggml.eos_token_id")
    if eot_id is None or not 0 <= int(eot_id) < len(tokens):
        raise LmforgeError(f"{source} names no valid end-of-text token (tokenizer.ggml.eos_token_id); "
                           "add one and import again.")
    return tokenizer, int(eot_id)
