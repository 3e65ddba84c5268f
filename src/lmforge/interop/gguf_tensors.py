"""GGUF tensors: our parameter names and layout <-> GGUF's, per family, and each tensor's stored type.

llama.cpp rotates adjacent pairs (2i, 2i+1) where we rotate halves, so a llama model's q and k
rows are permuted on the way out (``rope_permute``) and back on the way in. The file itself
(metadata, tokenizer, writing and reading) is ``lmforge.interop.gguf``'s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.interop.hf_config import GPT2
from lmforge.model.gpt import GPT, GPTConfig

Q8_0_BLOCK = 32


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


def tensor_dtype(gguf, array: np.ndarray, dtype: str):
    # As llama.cpp's converter: vectors (norms, biases) stay float32; a q8_0 matrix needs whole
    # 32-value blocks along its rows, else it stays float32 too.
    if dtype == "f32" or array.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    if dtype == "f16":
        return gguf.GGMLQuantizationType.F16
    if array.shape[-1] % Q8_0_BLOCK:
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType.Q8_0


