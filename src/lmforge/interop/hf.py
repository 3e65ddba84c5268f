"""HuggingFace ``transformers`` interchange: a model directory out as a ``transformers`` model,
and a local ``transformers`` GPT-2 or Llama-family directory in as a model directory.

Two families are representable both ways (lmforge's parameter names follow GPT-2 and its tensor
layouts follow Llama, see ``lmforge.model.gpt``):

* ``GPT2LMHeadModel``: learned positions, LayerNorm, GELU MLP (exact ``gelu`` or GPT-2's own
  tanh approximation ``gelu_tanh``, transformers' ``gelu_new``), multi-head attention.
  GPT-2's Conv1D weights are our Linear weights transposed. GPT-2 always has biases, so a model
  with ``bias=False`` exports zero biases (the same function).
* ``LlamaForCausalLM``: RoPE (rotate-half layout), RMSNorm, SwiGLU, grouped-query attention.
  Our fused ``c_attn`` rows are [q | k | v] and ``c_fc`` rows are [gate | up]: slices, no
  permutation. ``bias=True`` is Llama's ``attention_bias`` and ``mlp_bias``.

Anything else (sinusoidal positions, RoPE with LayerNorm, ...) has no counterpart in either
family and is refused with a LmforgeError naming the setting. Which family, and the
``config.json`` mapping, are ``lmforge.interop.hf_config``'s; here are the weights and the directories.

The written files are plain: ``config.json`` and ``model.safetensors`` in the layout
``transformers`` saves, plus the tokenizer as ``PreTrainedTokenizerFast`` files. Neither export
nor import needs ``transformers`` itself (the tests use it to check the logits); weights are
read only from safetensors, never from pickled ``.bin`` files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.interop.hf_config import ARCHITECTURES, GPT2, from_hf_config, hf_family, to_hf_config
from lmforge.model.config import GPTConfig
from lmforge.model.gpt import GPT
from lmforge.outputs import atomic_path
from lmforge.tokenization.tokenizer import UNK_TOKEN

PAD_TOKENS = ("<pad>", "<|pad|>")


# ---------------------------------------------------------------------------------------------
# Weights: our names <-> transformers names
# ---------------------------------------------------------------------------------------------


def to_hf_state_dict(model: GPT, family: str) -> dict[str, Tensor]:
    """Our weights renamed (and for GPT-2 transposed) to the ``transformers`` family's names.

    Tied output weights are stored once, under the embedding's name, as ``transformers`` does.
    """
    c = model.config
    ours = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    if family == GPT2:
        for i in range(c.n_layer):
            for linear in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                name = f"transformer.h.{i}.{linear}"
                weight = ours[f"{name}.weight"]
                out[f"{name}.weight"] = weight.t().contiguous()  # Conv1D stores (in, out)
                out[f"{name}.bias"] = ours.get(f"{name}.bias", torch.zeros(weight.size(0)))
            for norm in ("ln_1", "ln_2"):
                _copy_layernorm(ours, out, f"transformer.h.{i}.{norm}")
        _copy_layernorm(ours, out, "transformer.ln_f")
        out["transformer.wte.weight"] = ours["transformer.wte.weight"]
        out["transformer.wpe.weight"] = ours["transformer.wpe.weight"]
    else:
        q_rows, kv_rows = c.n_head * c.head_dim, c.kv_heads * c.head_dim
        for i in range(c.n_layer):
            src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
            pieces = {
                "c_attn": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), [q_rows, kv_rows, kv_rows]),
                "c_fc": (("mlp.gate_proj", "mlp.up_proj"), [c.mlp_hidden_size] * 2),
            }
            for param in ("weight", "bias") if c.bias else ("weight",):
                for fused, (names, rows) in pieces.items():
                    module = "attn" if fused == "c_attn" else "mlp"
                    for name, part in zip(names, ours[f"{src}{module}.{fused}.{param}"].split(rows)):
                        out[f"{dst}{name}.{param}"] = part.contiguous()
                out[f"{dst}self_attn.o_proj.{param}"] = ours[f"{src}attn.c_proj.{param}"]
                out[f"{dst}mlp.down_proj.{param}"] = ours[f"{src}mlp.c_proj.{param}"]
            out[f"{dst}input_layernorm.weight"] = ours[f"{src}ln_1.weight"]
            out[f"{dst}post_attention_layernorm.weight"] = ours[f"{src}ln_2.weight"]
        out["model.embed_tokens.weight"] = ours["transformer.wte.weight"]
        out["model.norm.weight"] = ours["transformer.ln_f.weight"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = ours["lm_head.weight"]
    return out


def _copy_layernorm(ours: dict, out: dict, name: str) -> None:
    weight = ours[f"{name}.weight"]
    out[f"{name}.weight"] = weight
    out[f"{name}.bias"] = ours.get(f"{name}.bias", torch.zeros_like(weight))


def from_hf_state_dict(hf: dict[str, Tensor], config: GPTConfig, family: str, source: Path) -> dict[str, Tensor]:
    """The inverse of ``to_hf_state_dict``: ``transformers`` weights under our names, float32.

    Biases our config has but the file lacks (Llama with only one of attention_bias/mlp_bias)
    are zeros. Raises LmforgeError naming ``source`` when a weight is missing.
    """
    c = config
    if family == GPT2:  # checkpoints saved from GPT2Model have no "transformer." prefix
        hf = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v for k, v in hf.items()}

    def take(name: str, rows: int | None = None) -> Tensor:
        if name in hf:
            return hf[name].float()
        if rows is not None and name.endswith(".bias"):
            return torch.zeros(rows)
        raise LmforgeError(f"{source} has no weight '{name}'; the checkpoint does not match its config.json.")

    out: dict[str, Tensor] = {"transformer.wte.weight": take("transformer.wte.weight" if family == GPT2
                                                             else "model.embed_tokens.weight")}
    if family == GPT2:
        out["transformer.wpe.weight"] = take("transformer.wpe.weight")
        for i in range(c.n_layer):
            for linear in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                name = f"transformer.h.{i}.{linear}"
                out[f"{name}.weight"] = take(f"{name}.weight").t().contiguous()
                out[f"{name}.bias"] = take(f"{name}.bias")
            for norm in ("ln_1", "ln_2"):
                out[f"transformer.h.{i}.{norm}.weight"] = take(f"transformer.h.{i}.{norm}.weight")
                out[f"transformer.h.{i}.{norm}.bias"] = take(f"transformer.h.{i}.{norm}.bias")
        out["transformer.ln_f.weight"] = take("transformer.ln_f.weight")
        out["transformer.ln_f.bias"] = take("transformer.ln_f.bias")
    else:
        q_rows, kv_rows, hidden = c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.mlp_hidden_size
        for i in range(c.n_layer):
            src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
            for param in ("weight", "bias") if c.bias else ("weight",):
                bias = param == "bias"
                out[f"{dst}attn.c_attn.{param}"] = torch.cat([
                    take(f"{src}self_attn.q_proj.{param}", q_rows if bias else None),
                    take(f"{src}self_attn.k_proj.{param}", kv_rows if bias else None),
                    take(f"{src}self_attn.v_proj.{param}", kv_rows if bias else None),
                ])
                out[f"{dst}attn.c_proj.{param}"] = take(f"{src}self_attn.o_proj.{param}", c.n_embd if bias else None)
                out[f"{dst}mlp.c_fc.{param}"] = torch.cat([
                    take(f"{src}mlp.gate_proj.{param}", hidden if bias else None),
                    take(f"{src}mlp.up_proj.{param}", hidden if bias else None),
                ])
                out[f"{dst}mlp.c_proj.{param}"] = take(f"{src}mlp.down_proj.{param}", c.n_embd if bias else None)
            out[f"{dst}ln_1.weight"] = take(f"{src}input_layernorm.weight")
            out[f"{dst}ln_2.weight"] = take(f"{src}post_attention_layernorm.weight")
        out["transformer.ln_f.weight"] = take("model.norm.weight")
    if c.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    return out


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_hf(model_dir: str | Path, out: str | Path) -> Path:
    """Write the model directory ``model_dir`` as a ``transformers`` directory ``out``; return it.

    ``out`` holds config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json, and loads offline with ``AutoModelForCausalLM.from_pretrained(out)``
    and ``AutoTokenizer.from_pretrained(out)``. Written atomically.
    """
    from lmforge.model.directory import TOKENIZER, load_model_dir

    loaded = load_model_dir(model_dir)
    config = loaded.model.config
    family = hf_family(config)
    out = Path(out)
    with atomic_path(out, directory=True) as tmp:
        save_file(to_hf_state_dict(loaded.model, family), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", to_hf_config(config, family, loaded.eot_id))
        shutil.copyfile(loaded.path / TOKENIZER, tmp / "tokenizer.json")
        eot_token = loaded.config["tokenizer"]["eot_token"]
        special = {"bos_token": eot_token, "eos_token": eot_token}
        if loaded.tokenizer.token_to_id(UNK_TOKEN) is not None:
            special["unk_token"] = UNK_TOKEN
        pad = next((t for t in PAD_TOKENS if loaded.tokenizer.token_to_id(t) is not None), None)
        if pad is not None:
            special["pad_token"] = pad
        _write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": config.block_size,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            **special,
        })
        _write_json(tmp / "special_tokens_map.json", special)
        _write_json(tmp / "generation_config.json", {"bos_token_id": loaded.eot_id, "eos_token_id": loaded.eot_id})
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Turn a local ``transformers`` GPT-2 or Llama directory into the model directory ``out``.

    ``hf_dir`` needs config.json, safetensors weights (model.safetensors, or shards listed in
    model.safetensors.index.json) and tokenizer.json. The end-of-text token is the tokenizer's
    eos token. Returns ``out``; LmforgeError naming the file for anything missing or unsupported.
    """
    from lmforge.model.directory import save_model_dir
    from lmforge.tokenization.tokenizer import load_tokenizer

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise LmforgeError(f"{hf_dir} is not a directory; give a local transformers model directory.")
    config_path = hf_dir / "config.json"
    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{config_path} is missing; {hf_dir} is not a transformers model directory.") from None
    except json.JSONDecodeError as err:
        raise LmforgeError(f"{config_path} is not valid JSON ({err}); re-download or re-save the model.") from None
    family, config = from_hf_config(hf_config, config_path)

    tokenizer_path = hf_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise LmforgeError(
            f"{tokenizer_path} is missing; save the fast tokenizer with "
            "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) and import again."
        )
    tokenizer = load_tokenizer(tokenizer_path)
    eot_token, eot_id = _eos_token(hf_dir, hf_config, tokenizer)
    if eot_id >= config.vocab_size:
        raise LmforgeError(f"{hf_dir}: the eos token id {eot_id} is outside vocab_size={config.vocab_size}.")

    state = from_hf_state_dict(_read_weights(hf_dir), config, family, hf_dir)
    model = GPT(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise LmforgeError(f"{hf_dir}: the weights do not fit the config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")
    meta = {"kind": "imported", "eot_token": eot_token, "eot_id": eot_id}
    return save_model_dir(out, model, tokenizer_path, meta,
                          extra={"imported_from": {"path": str(hf_dir.resolve()),
                                                   "architecture": ARCHITECTURES[family]}})


def _shard_path(hf_dir: Path, name: object, index: Path) -> Path:
    """The shard ``name`` of ``index``: a file name inside ``hf_dir``. A path that leaves it
    (``../x``, ``/etc/x``, a link out) is refused: an index must not make us read other files."""
    path = hf_dir / str(name)
    inside = hf_dir.resolve()
    if (not isinstance(name, str) or Path(name).is_absolute()
            or (path.resolve() != inside and inside not in path.resolve().parents)):
        raise LmforgeError(f"{index} names the shard {name!r}, which is not a file inside {hf_dir}; "
                           "shards must be file names in the model directory.")
    return path


def _read_weights(hf_dir: Path) -> dict[str, Tensor]:
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise LmforgeError(f"{index} is not a valid safetensors index ({err}); re-save the model.") from None
        files = [_shard_path(hf_dir, name, index) for name in shards]
    elif any(hf_dir.glob("*.bin")):
        raise LmforgeError(
            f"{hf_dir} has only pickled .bin weights, which lmforge never loads; convert them with "
            "model.save_pretrained(DIR, safe_serialization=True)."
        )
    else:
        raise LmforgeError(f"{single} is missing; {hf_dir} has no safetensors weights.")
    state: dict[str, Tensor] = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise LmforgeError(f"{path} is missing, corrupt or truncated ({err}); "
                               "re-download or re-save the model.") from None
    return state


def _eos_token(hf_dir: Path, hf_config: dict, tokenizer) -> tuple[str, int]:
    # The tokenizer's own files name the eos token; config.json's eos_token_id is the fallback.
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = hf_dir / name
        if path.is_file():
            token = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
                return token, tokenizer.token_to_id(token)
    eos_id = hf_config.get("eos_token_id")
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    if isinstance(eos_id, int) and tokenizer.id_to_token(eos_id) is not None:
        return tokenizer.id_to_token(eos_id), eos_id
    raise LmforgeError(
        f"{hf_dir} names no end-of-text token (eos_token in tokenizer_config.json or eos_token_id in "
        "config.json); add one and import again."
    )
