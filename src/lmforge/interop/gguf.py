"""GGUF interchange: a model directory out as one GGUF file (llama.cpp, Ollama, LM Studio, Candle,
transformers' GGUF loader all read it), and a GGUF file of the same families back in.

The families are ``lmforge.interop.hf_config``'s, under llama.cpp's names:

* ``gpt2``: learned positions, LayerNorm, fused qkv, tanh-approximate GELU. llama.cpp and
  transformers compute a gpt2 GGUF model's GELU with the tanh approximation, so only
  ``model.mlp=gelu_tanh`` exports; the exact-GELU ``gelu`` would come out a different function.
* ``llama``: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases.

The tensor names and layouts are ``lmforge.interop.weights``' table, the tokenizer and its
pre-tokenizer ``lmforge.interop.gguf_vocab``'s. The file is written as llama.cpp's converter
(convert_hf_to_gguf.py) writes one: the same metadata keys that hubs and GUIs read
(``general.type``, ``general.size_label``, ``general.quantization_version``, a Llama's
``attention.key_length``/``value_length``), the same choice of type per tensor (``tensor_type``)
and GPT-2's tied output matrix stored as its own tensor. Lineage keys (``lmforge.*``) name the
MLflow run and the data hashes, never a path on the machine that wrote the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch

from lmforge.config.paths import TOKENIZER_FILE
from lmforge.errors import LmforgeError, missing_extra
from lmforge.interop.gguf_vocab import pre_tokenizer_name, tokenizer_from_gguf, write_tokenizer
from lmforge.interop.hf_config import GPT2, LLAMA, QWEN3, hf_family
from lmforge.interop.weights import GGUF, export_weights, import_weights
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.outputs import atomic_path
from lmforge.tokenization.chat import template_and_ends

DTYPES = ("f32", "f16", "q8_0")
LINEAGE_PREFIX = "lmforge."


def _gguf(command: str):
    try:
        import gguf  # the optional `gguf` extra
    except ImportError:
        raise missing_extra(command, "gguf") from None
    return gguf


# ---------------------------------------------------------------------------------------------
# What can be exported
# ---------------------------------------------------------------------------------------------


def gguf_family(config: GPTConfig) -> str:
    """``"gpt2"``, ``"llama"`` or ``"qwen3"``: the GGUF architecture that computes ``config`` exactly.

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


def gguf_pre_tokenizer(kind: str, tokenizer_json: dict) -> str:
    """The ``tokenizer.ggml.pre`` name of the model's tokenizer; LmforgeError when GGUF has none."""
    pre = pre_tokenizer_name(tokenizer_json)
    if pre is not None:
        return pre
    why = {
        # Measured with llama.cpp 0.3.36 (tests/integration/test_gguf.py): as GGUF's byte-level BPE,
        # characters outside the vocabulary vanish; as SentencePiece, tokenizing them aborts the process.
        "char": "llama.cpp drops characters outside the vocabulary (byte-level BPE) or aborts on them "
                "(SentencePiece) where lmforge gives <unk>",
        "word": "no GGUF tokenizer drops the spaces between words and splits off punctuation as lmforge's "
                "word tokenizer does",
    }.get(kind, "GGUF's tokenizers reproduce byte-level BPE with one of llama.cpp's named pre-tokenizers only")
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
    llama.cpp and ``transformers`` need, and the metadata hubs show. Written atomically: a
    refusal or an error leaves no file. Returns ``out``; LmforgeError for what has no GGUF counterpart.
    """
    from lmforge.model.directory import load_model_dir

    if dtype not in DTYPES:
        raise LmforgeError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}.")
    gguf = _gguf("lmforge export --format gguf")
    loaded = load_model_dir(model_dir)
    config = loaded.model.config
    family = gguf_family(config)
    tokenizer_json = json.loads(loaded.tokenizer.to_str())
    pre = gguf_pre_tokenizer(loaded.config["tokenizer"].get("kind", "unknown"), tokenizer_json)
    tensors = {k: v.numpy() for k, v in export_weights(loaded.model, family, GGUF).items()}
    out = Path(out)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), family)
        write_hyperparameters(writer, gguf, config, family, loaded.path.name, dtype)
        write_tokenizer(writer, tokenizer_json, pre, config.vocab_size, loaded.eot_id)
        chat, ends = template_and_ends(loaded.path, loaded.tokenizer, loaded.eot_id)
        if chat is not None:  # llama.cpp renders it with Jinja and stops at the end of turn (EOT)
            writer.add_chat_template(chat.source)
            if len(ends) > 1:
                writer.add_eot_token_id(ends[1])
        for key, value in lineage(loaded).items():
            writer.add_string(LINEAGE_PREFIX + key, value)
        for name, array in tensors.items():
            data, qtype = quantize(gguf, name, array, dtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def write_hyperparameters(writer, gguf, config: GPTConfig, family: str, name: str, dtype: str) -> None:
    """The ``general.*`` and ``<family>.*`` keys llama.cpp's converter writes for this model."""
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
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
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)


def quantize(gguf, name: str, array: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(stored data, GGML type) of the tensor ``name`` in a ``dtype`` file, by the rules of llama.cpp's
    converter (convert_hf_to_gguf.py, ``ModelBase.prepare_tensors``): vectors, norms, biases and
    the position embedding stay F32; other matrices take the file's type, and a matrix whose rows
    q8_0 cannot take (not whole 32-value blocks) falls back to F16."""
    types = gguf.GGMLQuantizationType
    if array.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") \
            or name == "position_embd.weight":
        qtype = types.F32
    else:
        qtype = {"f32": types.F32, "f16": types.F16, "q8_0": types.Q8_0}[dtype]
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(array, types.F16), types.F16


def lineage(loaded) -> dict[str, str]:
    """The model's lineage as GGUF string values: its MLflow run (``run.json``) and, where that
    run's store is a local SQLite file, the run's commit and data hashes (``lmforge runs show``).

    A file meant to be shared carries no local paths: a local store's URI (``sqlite:``, ``file:``,
    a path) and absolute paths are left out, a server's URI loses any user name and password.
    """
    run = loaded.run()
    if not run:
        return {}
    keys = {f"mlflow.{k}": str(v) for k, v in run.items() if k in ("run_id", "experiment_id", "tracking_uri")}
    uri = str(run.get("tracking_uri", ""))
    if uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]).is_file():
        keys.update(_run_tags(uri, run["run_id"]))
    shared = {key: shareable(value) for key, value in keys.items()}
    return {key: value for key, value in shared.items() if value is not None}


def shareable(value: str) -> str | None:
    """``value`` as it may travel in a shared file: None for a local path or a local store's URI,
    a server URI without its credentials, anything else unchanged."""
    parts = urlsplit(value)
    if parts.scheme in ("http", "https", "databricks"):
        return urlunsplit(parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")))
    if parts.scheme and not re.fullmatch(r"[A-Za-z]", parts.scheme):  # sqlite:, file:, postgresql://user:pw@, ...
        return None
    if value.startswith(("/", "~", "\\")) or re.match(r"[A-Za-z]:[\\/]", value):  # an absolute path
        return None
    return value


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


def import_gguf(path: str | Path, out: str | Path, force: bool = False) -> Path:
    """Turn a GGUF file of the ``gpt2``, ``llama`` or ``qwen3`` family into the model directory ``out``.

    f32 and f16 tensors load as they are; quantized ones (q8_0, ...) are dequantized to float32.
    The tokenizer must be GGUF's ``gpt2`` (byte-level BPE) model with a pre-tokenizer lmforge
    implements. An existing ``out`` is replaced only with ``force`` (atomically). Returns ``out``;
    LmforgeError with one sentence naming the file for anything truncated, missing or unsupported.
    """
    import tempfile

    from lmforge.model.directory import check_tokenizer_fits, refuse_existing, save_model_dir
    from lmforge.tokenization.tokenizer import save_tokenizer

    gguf = _gguf("lmforge import --format gguf")
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path} does not exist; give a .gguf file.")
    refuse_existing(out, force)
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {name: field.contents() for name, field in reader.fields.items()}
        tensors = {t.name: np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, NotImplementedError) as err:
        raise LmforgeError(f"{path} is not a readable GGUF file, or it is truncated ({type(err).__name__}: {err}); "
                           "re-export or re-download it.") from None
    family, config = config_from_gguf(fields, tensors, path)
    tokenizer, eot_id = tokenizer_from_gguf(fields, path)
    check_tokenizer_fits(tokenizer, config.vocab_size, f"{path}'s tokenizer.ggml.tokens",
                         "its token_embd.weight")
    model = GPT(config)
    weights = {name: torch.from_numpy(np.array(array)) for name, array in tensors.items()}  # writable copies
    model.load_state_dict(import_weights(weights, config, family, GGUF, path), strict=True)
    meta = {"kind": "bpe", "eot_token": tokenizer.id_to_token(eot_id), "eot_id": eot_id}
    lineage_keys = {k[len(LINEAGE_PREFIX):]: v for k, v in fields.items() if k.startswith(LINEAGE_PREFIX)}
    imported_from = {"path": str(path.resolve()), "architecture": f"gguf:{family}",
                     **({"lineage": lineage_keys} if lineage_keys else {})}
    with tempfile.TemporaryDirectory() as scratch:
        save_tokenizer(tokenizer, Path(scratch) / TOKENIZER_FILE)
        return save_model_dir(out, model, Path(scratch) / TOKENIZER_FILE, meta,
                              extra={"imported_from": imported_from})


def config_from_gguf(fields: dict[str, Any], tensors: dict[str, np.ndarray], source: Path) -> tuple[str, GPTConfig]:
    """(family, our config) from a GGUF file's metadata; LmforgeError naming what we cannot reproduce."""
    family = fields.get("general.architecture")
    if family not in (GPT2, LLAMA, QWEN3):
        raise LmforgeError(f"{source}: general.architecture={family!r} is not supported; "
                           "lmforge imports 'gpt2', 'llama' and 'qwen3' GGUF files.")

    def need(key: str):
        if f"{family}.{key}" not in fields:
            raise LmforgeError(f"{source} lacks the metadata key {family}.{key}; the file is incomplete.")
        return fields[f"{family}.{key}"]

    if "token_embd.weight" not in tensors:
        raise LmforgeError(f"{source} has no tensor 'token_embd.weight'; the file is not a complete {family} model.")
    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    # A GPT-2 file stores its tied output as a copy (llama.cpp's converter does): equal means tied.
    tied = "output.weight" not in tensors or np.array_equal(tensors["output.weight"], tensors["token_embd.weight"])
    settings = dict(vocab_size=tensors["token_embd.weight"].shape[0], block_size=int(need("context_length")),
                    n_layer=int(need("block_count")), n_head=n_head, n_embd=n_embd, tie_embeddings=bool(tied))
    if family == GPT2:
        settings.update(positions="learned", norm="layernorm", mlp="gelu_tanh", bias=True,
                        norm_eps=_float32(need("attention.layer_norm_epsilon")))
        if int(need("feed_forward_length")) != 4 * n_embd:
            settings["mlp_hidden"] = int(need("feed_forward_length"))
    else:
        settings.update(_llama_settings(fields, tensors, source, n_embd, n_head, need), qk_norm=family == QWEN3)
    try:
        return family, GPTConfig.from_dict(settings)
    except ValueError as err:
        raise LmforgeError(f"{source}: {err}") from None


def _llama_settings(fields: dict[str, Any], tensors: dict[str, np.ndarray], source: Path, n_embd: int, n_head: int,
                    need) -> dict:
    """The settings of a llama or qwen3 file (the same keys under its architecture's name)."""
    arch = fields["general.architecture"]
    if fields.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise LmforgeError(f"{source}: {arch}.rope.scaling.type={fields[f'{arch}.rope.scaling.type']!r} "
                           "is not plain RoPE, so lmforge cannot reproduce this model exactly.")
    if any(name.endswith(".bias") for name in tensors):
        raise LmforgeError(f"{source} has bias tensors, which lmforge's llama family (model.bias=false) lacks.")
    head_dim = n_embd // n_head
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        value = int(fields.get(f"{arch}.{key}", head_dim))
        if value != head_dim:
            raise LmforgeError(f"{source}: {arch}.{key}={value} differs from embedding_length / head_count = "
                               f"{head_dim}, which lmforge's attention assumes.")
    kv = int(fields.get(f"{arch}.attention.head_count_kv", n_head))
    hidden = int(need("feed_forward_length"))
    default_hidden = GPTConfig(vocab_size=1, n_embd=n_embd, n_head=n_head, mlp="swiglu").mlp_hidden_size
    return dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                n_kv_head=None if kv == n_head else kv, mlp_hidden=None if hidden == default_hidden else hidden,
                norm_eps=_float32(need("attention.layer_norm_rms_epsilon")),
                rope_theta=_float32(fields.get(f"{arch}.rope.freq_base", 10000.0)))


def _float32(value) -> float:
    # GGUF stores these as float32: 1e-5 comes back 9.99999974e-06. The shortest decimal that
    # rounds to the same float32 is the value that was written, so a round trip keeps the config.
    return float(str(np.float32(value)))
