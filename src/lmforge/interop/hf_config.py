"""Which ``transformers`` family represents a model, and our ``GPTConfig`` <-> its ``config.json``.

GPT-2 (``GPT2LMHeadModel``), Llama (``LlamaForCausalLM``) or, for a Llama-style model with QK-norm,
Qwen3 (``Qwen3ForCausalLM``: Llama's layers with an RMSNorm on each query and key head before the
rotation); ``lmforge.interop.hf`` maps the weights and writes and reads the directories,
``lmforge.interop.gguf`` reuses the family choice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.model.config import GPTConfig

GPT2 = "gpt2"
LLAMA = "llama"
QWEN3 = "qwen3"
ARCHITECTURES = {GPT2: "GPT2LMHeadModel", LLAMA: "LlamaForCausalLM", QWEN3: "Qwen3ForCausalLM"}
# Our GPT-2 MLP kinds <-> transformers' activation_function names (one function each way;
# "gelu_pytorch_tanh" is the same tanh approximation computed by PyTorch's kernel).
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
GPT2_ACTIVATIONS_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


# ---------------------------------------------------------------------------------------------
# Which family
# ---------------------------------------------------------------------------------------------


def hf_family(config: GPTConfig) -> str:
    """``"gpt2"``, ``"llama"`` or ``"qwen3"``: the ``transformers`` family that represents ``config`` exactly.

    Raises LmforgeError naming the settings that no family has.
    """
    if config.logit_softcap is not None:
        raise LmforgeError(
            f"model.logit_softcap={config.logit_softcap} has no counterpart in GPT2LMHeadModel, LlamaForCausalLM "
            "or Qwen3ForCausalLM (nor in their GGUF files); train with model.logit_softcap=null to export."
        )
    gpt2 = {"positions": ("learned",), "norm": ("layernorm",), "mlp": tuple(GPT2_ACTIVATIONS)}
    llama = {"positions": ("rope",), "norm": ("rmsnorm",), "mlp": ("swiglu",)}
    for family, wanted in ((GPT2, gpt2), (LLAMA, llama)):
        if not all(getattr(config, k) in v for k, v in wanted.items()):
            continue
        if family == GPT2 and config.kv_heads != config.n_head:
            raise LmforgeError(
                f"model.n_kv_head={config.n_kv_head} (grouped-query attention) has no GPT-2 counterpart; "
                "only the Llama family (positions=rope, norm=rmsnorm, mlp=swiglu) exports it."
            )
        if family == GPT2 and config.qk_norm:
            raise LmforgeError(
                "model.qk_norm=true has no GPT-2 counterpart; Qwen3ForCausalLM has it with positions=rope, "
                "norm=rmsnorm, mlp=swiglu."
            )
        if config.qk_norm and config.bias:
            raise LmforgeError(
                "model.bias=true with model.qk_norm=true has no transformers counterpart (Qwen3's MLP has no "
                "biases); train with model.bias=false."
            )
        return QWEN3 if config.qk_norm else family
    settings = f"positions={config.positions}, norm={config.norm}, mlp={config.mlp}"
    raise LmforgeError(
        f"a model with {settings} cannot be exported to transformers: GPT2LMHeadModel needs "
        "positions=learned, norm=layernorm, mlp=gelu or gelu_tanh and LlamaForCausalLM needs positions=rope, "
        "norm=rmsnorm, mlp=swiglu; train with one of those combinations."
    )


# ---------------------------------------------------------------------------------------------
# Configs: ours <-> transformers config.json
# ---------------------------------------------------------------------------------------------


def to_hf_config(config: GPTConfig, family: str, eot_id: int) -> dict:
    """The ``config.json`` of the ``transformers`` model equal to ``config``."""
    common = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if family == GPT2:
        return {
            **common,
            "n_positions": config.block_size,
            "n_ctx": config.block_size,  # what llama.cpp's converter reads as the context length
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.mlp_hidden_size,
            "activation_function": GPT2_ACTIVATIONS[config.mlp],
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "scale_attn_weights": True,
        }
    llama = {
        **common,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.dropout,
    }
    if family == QWEN3:  # no MLP bias to switch; no sliding window
        del llama["mlp_bias"]
        llama.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    return llama


def from_hf_config(hf: dict, source: Path) -> tuple[str, GPTConfig]:
    """(family, our config) for a ``transformers`` ``config.json`` dict read from ``source``.

    Raises LmforgeError naming the first setting our model cannot reproduce exactly.
    """
    family = hf.get("model_type")

    def refuse(setting: str, why: str) -> LmforgeError:
        return LmforgeError(f"{source}: {setting} {why}, so lmforge cannot reproduce this model exactly.")

    if family == GPT2:
        config = _gpt2_settings(hf, refuse)
    elif family == LLAMA:
        config = _llama_settings(hf, refuse)
    elif family == QWEN3:
        if hf.get("use_sliding_window", False):
            raise refuse("use_sliding_window=true", "limits attention to a window")
        config = dict(_llama_settings(hf, refuse), qk_norm=True, bias=bool(hf.get("attention_bias", False)))
    else:
        raise LmforgeError(
            f"{source}: model_type={family!r} is not supported; lmforge imports 'gpt2' (GPT2LMHeadModel), "
            "'llama' (LlamaForCausalLM) and 'qwen3' (Qwen3ForCausalLM) models."
        )
    try:
        return family, GPTConfig.from_dict(config)
    except ValueError as err:
        raise LmforgeError(f"{source}: {err}") from None


def _gpt2_settings(hf: dict, refuse: Callable[[str, str], LmforgeError]) -> dict:
    """Our model settings for a GPT-2 ``config.json`` (transformers' defaults where a key is absent)."""
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS_IN:
        raise refuse(f"activation_function={activation!r}",
                     f"is none of the GELUs lmforge has ({', '.join(GPT2_ACTIVATIONS_IN)})")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise refuse("the attention scaling", "differs from 1/sqrt(head size)")
    if hf.get("add_cross_attention", False):
        raise refuse("add_cross_attention=true", "adds layers a decoder-only GPT does not have")
    n_embd = hf.get("n_embd", 768)
    inner = hf.get("n_inner")
    return dict(
        vocab_size=hf.get("vocab_size", 50257),
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        dropout=float(hf.get("resid_pdrop", 0.0)),
        bias=True,
        positions="learned",
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        mlp=GPT2_ACTIVATIONS_IN[activation],
        mlp_hidden=None if inner in (None, 4 * n_embd) else inner,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _llama_settings(hf: dict, refuse: Callable[[str, str], LmforgeError]) -> dict:
    """Our model settings for a Llama ``config.json`` (transformers' defaults where a key is absent)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act={hf['hidden_act']!r}", "is not SwiGLU's silu")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise refuse(f"rope type {rope_type!r}", "is not plain RoPE")
    hidden, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    if hf.get("head_dim") not in (None, hidden // heads):
        raise refuse(f"head_dim={hf['head_dim']}",
                     f"differs from hidden_size / num_attention_heads = {hidden // heads}")
    config = dict(
        vocab_size=hf.get("vocab_size", 32000),
        block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf.get("num_hidden_layers", 32),
        n_head=heads,
        n_embd=hidden,
        n_kv_head=hf.get("num_key_value_heads") or heads,
        dropout=float(hf.get("attention_dropout", 0.0)),
        # One switch for all our Linear biases; a missing half is imported as zeros.
        bias=bool(hf.get("attention_bias", False) or hf.get("mlp_bias", False)),
        positions="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        mlp_hidden=hf.get("intermediate_size", 11008),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    # Null where the value is our default, so an exported model comes back with an equal config.
    if config["n_kv_head"] == heads:
        config["n_kv_head"] = None
    if config["mlp_hidden"] == GPTConfig(vocab_size=1, n_embd=hidden, n_head=heads, mlp="swiglu").mlp_hidden_size:
        config["mlp_hidden"] = None
    return config
