"""GGUF interchange: a model directory out as one GGUF file (llama.cpp, Ollama, LM Studio, Candle,
transformers' GGUF loader all read it), and a GGUF file of the same families back in.

The families are ``lmforge.interop.hf_config``'s, under llama.cpp's names:

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

from lmforge.errors import LmforgeError
from lmforge.interop.gguf_tensors import from_gguf_tensors, tensor_dtype, to_gguf_tensors
from lmforge.interop.hf import PAD_TOKENS
from lmforge.interop.hf_config import GPT2, LLAMA, hf_family
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.outputs import atomic_path
from lmforge.tokenization.tokenizer import UNK_TOKEN

DTYPES = ("f32", "f16", "q8_0")
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
# Export
# ---------------------------------------------------------------------------------------------


def export_gguf(model_dir: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    """Write the model directory ``model_dir`` as the GGUF file ``out`` (``dtype``: f32, f16, q8_0).

    The file holds the hyperparameters, the tokenizer and the lineage keys (``lmforge.*``) that
    llama.cpp and ``transformers`` need and nothing else. Written atomically: a refusal or an
    error leaves no file. Returns ``out``; LmforgeError for what has no GGUF counterpart.
    """
    from lmforge.model.directory import load_model_dir

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
            qtype = tensor_dtype(gguf, array, dtype)
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
    from lmforge.tracking.runs import quiet_mlflow_env

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

    from lmforge.model.directory import save_model_dir
    from lmforge.tokenization.tokenizer import save_tokenizer

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
