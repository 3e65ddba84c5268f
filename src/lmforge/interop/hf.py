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
``config.json`` mapping, are ``lmforge.interop.hf_config``'s; the weight names are
``lmforge.interop.weights``' table; here are the directories.

The written files are plain: ``config.json`` and ``model.safetensors`` in the layout
``transformers`` saves, plus the tokenizer as ``PreTrainedTokenizerFast`` files. Neither export
nor import needs ``transformers`` itself (the tests use it to check the logits); weights are
read only from safetensors, never from pickled ``.bin`` files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.interop.hf_config import ARCHITECTURES, GPT2, from_hf_config, hf_family, to_hf_config
from lmforge.interop.weights import HF, export_weights, import_weights
from lmforge.model.gpt import GPT
from lmforge.outputs import atomic_path
from lmforge.tokenization.chat import template_and_ends
from lmforge.tokenization.tokenizer import UNK_TOKEN, hf_eos_token

PAD_TOKENS = ("<pad>", "<|pad|>")


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_hf(model_dir: str | Path, out: str | Path) -> Path:
    """Write the model directory ``model_dir`` as a ``transformers`` directory ``out``; return it.

    ``out`` holds config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the
    model's ``chat_template``, if it has one), generation_config.json and special_tokens_map.json,
    and loads offline with ``AutoModelForCausalLM.from_pretrained(out)``
    and ``AutoTokenizer.from_pretrained(out)``. Written atomically.
    """
    from lmforge.model.directory import TOKENIZER, load_model_dir

    loaded = load_model_dir(model_dir)
    config = loaded.model.config
    family = hf_family(config)
    out = Path(out)
    with atomic_path(out, directory=True) as tmp:
        save_file(export_weights(loaded.model, family, HF), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", to_hf_config(config, family, loaded.eot_id))
        shutil.copyfile(loaded.path / TOKENIZER, tmp / TOKENIZER)
        eot_token = loaded.config["tokenizer"]["eot_token"]
        special = {"bos_token": eot_token, "eos_token": eot_token}
        if loaded.tokenizer.token_to_id(UNK_TOKEN) is not None:
            special["unk_token"] = UNK_TOKEN
        pad = next((t for t in PAD_TOKENS if loaded.tokenizer.token_to_id(t) is not None), None)
        if pad is not None:
            special["pad_token"] = pad
        chat, eos_ids = template_and_ends(loaded.path, loaded.tokenizer, loaded.eot_id)
        if chat is not None:  # the strings the template was rendered with in training
            special.update({k: v for k, v in chat.tokens.items() if k in ("bos_token", "eos_token", "unk_token",
                                                                          "pad_token")})
        _write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": config.block_size,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            **special,
            **({"chat_template": chat.source} if chat is not None else {}),
        })
        _write_json(tmp / "special_tokens_map.json", special)
        _write_json(tmp / "generation_config.json", {"bos_token_id": loaded.eot_id,
                                                     "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0]})
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


def import_hf(hf_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """Turn a local ``transformers`` GPT-2 or Llama directory into the model directory ``out``.

    ``hf_dir`` needs config.json, safetensors weights (model.safetensors, or shards listed in
    model.safetensors.index.json) and tokenizer.json. The end-of-text token is the tokenizer's
    eos token. An existing ``out`` is replaced only with ``force`` (atomically). Returns ``out``;
    LmforgeError naming the file for anything missing, unsupported or inconsistent.
    """
    from lmforge.model.directory import refuse_existing, save_model_dir

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise LmforgeError(f"{hf_dir} is not a directory; give a local transformers model directory.")
    refuse_existing(out, force)
    model, tokenizer_path, eot_token, eot_id = read_hf_dir(hf_dir)
    meta = {"kind": "imported", "eot_token": eot_token, "eot_id": eot_id}
    return save_model_dir(out, model, tokenizer_path, meta,
                          extra={"imported_from": {"path": str(hf_dir.resolve()),
                                                   "architecture": ARCHITECTURES[hf_family(model.config)]}})


def read_hf_dir(hf_dir: Path) -> tuple[GPT, Path, str, int]:
    """The network of a local ``transformers`` directory as our GPT, its tokenizer.json, and the
    end-of-text token and id (``import_hf`` and fine-tuning's base, ``lmforge.interop.base``)."""
    from lmforge.model.directory import check_tokenizer_fits
    from lmforge.tokenization.tokenizer import load_tokenizer

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
    check_tokenizer_fits(tokenizer, config.vocab_size, tokenizer_path,
                         f"the embedding table ({config_path} vocab_size)")
    eot_token, eot_id = hf_eos_token(hf_dir, hf_config, tokenizer)

    weights = _read_weights(hf_dir)
    if family == GPT2:  # checkpoints saved from GPT2Model have no "transformer." prefix
        weights = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v
                   for k, v in weights.items()}
    model = GPT(config)
    model.load_state_dict(import_weights(weights, config, family, HF, hf_dir), strict=True)
    return model, tokenizer_path, eot_token, eot_id


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
