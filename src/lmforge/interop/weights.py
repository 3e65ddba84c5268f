"""One weight-name table per model family: our parameter names beside ``transformers``' and GGUF's.

HF export and import (``lmforge.interop.hf``) and GGUF export and import (``lmforge.interop.gguf``)
all read ``TABLES``; nothing else spells a weight name. A row names one of our modules and the
module (or, for a fused matrix, the modules in row order) that each format stores it as:

* GPT-2's ``transformers`` Conv1D stores a Linear weight transposed (in, out);
* Llama's fused ``c_attn`` rows are [q | k | v] and ``c_fc`` rows are [gate | up]: slices;
* llama.cpp rotates adjacent pairs (2i, 2i+1) where we rotate halves (i, i + head_dim/2), so a
  GGUF Llama's q and k rows are permuted on the way out and back on the way in, as llama.cpp's
  own converter (convert_hf_to_gguf.py, ``LlamaModel.permute``) does; its qwen3 rotates halves;
* GPT-2 always has biases in both formats, so a model with ``bias=False`` exports zero biases
  (the same function);
* a tied output matrix is stored once, under the embedding, except in a GPT-2 GGUF: llama.cpp's
  converter writes GPT-2's ``output.weight`` as a copy of ``token_embd`` (``GPT2Model.modify_tensors``),
  and llama.cpp builds of early 2025 refuse a gpt2 file without it.

Weights travel as float32 torch tensors in our (out, in) layout, which is GGUF's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.interop.hf_config import GPT2, LLAMA, QWEN3
from lmforge.model.gpt import GPT, GPTConfig

HF, GGUF = "hf", "gguf"
# Tensors in transformers checkpoints that are buffers, not weights (llama.cpp's converter skips them too).
HF_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True)
class Row:
    """One of our modules and its names in each format; ``{i}`` is the block index.

    ``split``: how our rows divide among several names ("qkv" or "gate_up"); ``conv1d``: stored
    transposed by transformers; ``rope``: GGUF pieces whose rows are permuted to llama.cpp's
    pair order; ``biased``: the formats always carry a bias here, zeros where we have none.
    """

    ours: str
    hf: tuple[str, ...]
    gguf: tuple[str, ...]
    split: str | None = None
    conv1d: bool = False
    rope: tuple[bool, ...] = ()
    biased: bool = False

    def names(self, fmt: str) -> tuple[str, ...]:
        return self.hf if fmt == HF else self.gguf


def _row(ours: str, hf: str | tuple[str, ...], gguf: str | tuple[str, ...], **kw) -> Row:
    return Row(ours, (hf,) if isinstance(hf, str) else hf, (gguf,) if isinstance(gguf, str) else gguf, **kw)


H, L, B = "transformer.h.{i}.", "model.layers.{i}.", "blk.{i}."
TABLES: dict[str, tuple[Row, ...]] = {
    GPT2: (
        #    ours                        transformers                 GGUF
        _row("transformer.wte",          "transformer.wte",           "token_embd"),
        _row("transformer.wpe",          "transformer.wpe",           "position_embd"),
        _row(H + "ln_1",                 H + "ln_1",                  B + "attn_norm", biased=True),
        _row(H + "attn.c_attn",          H + "attn.c_attn",           B + "attn_qkv", conv1d=True, biased=True),
        _row(H + "attn.c_proj",          H + "attn.c_proj",           B + "attn_output", conv1d=True, biased=True),
        _row(H + "ln_2",                 H + "ln_2",                  B + "ffn_norm", biased=True),
        _row(H + "mlp.c_fc",             H + "mlp.c_fc",              B + "ffn_up", conv1d=True, biased=True),
        _row(H + "mlp.c_proj",           H + "mlp.c_proj",            B + "ffn_down", conv1d=True, biased=True),
        _row("transformer.ln_f",         "transformer.ln_f",          "output_norm", biased=True),
        _row("lm_head",                  "lm_head",                   "output"),
    ),
    LLAMA: (
        _row("transformer.wte",          "model.embed_tokens",        "token_embd"),
        _row(H + "ln_1",                 L + "input_layernorm",       B + "attn_norm"),
        _row(H + "attn.c_attn",
             (L + "self_attn.q_proj", L + "self_attn.k_proj", L + "self_attn.v_proj"),
             (B + "attn_q", B + "attn_k", B + "attn_v"), split="qkv", rope=(True, True, False)),
        _row(H + "attn.c_proj",          L + "self_attn.o_proj",      B + "attn_output"),
        _row(H + "ln_2",                 L + "post_attention_layernorm", B + "ffn_norm"),
        _row(H + "mlp.c_fc",             (L + "mlp.gate_proj", L + "mlp.up_proj"),
             (B + "ffn_gate", B + "ffn_up"), split="gate_up"),
        _row(H + "mlp.c_proj",           L + "mlp.down_proj",         B + "ffn_down"),
        _row("transformer.ln_f",         "model.norm",                "output_norm"),
        _row("lm_head",                  "lm_head",                   "output"),
    ),
}
# Qwen3: Llama's rows with the query and key norms; llama.cpp's qwen3 rotates halves, as we do (no permutation).
TABLES[QWEN3] = tuple(
    Row(r.ours, r.hf, r.gguf, r.split, r.conv1d, (False, False, False), r.biased) if r.rope else r
    for r in TABLES[LLAMA]
) + (
    _row(H + "attn.q_norm",              L + "self_attn.q_norm",      B + "attn_q_norm"),
    _row(H + "attn.k_norm",              L + "self_attn.k_norm",      B + "attn_k_norm"),
)
OUTPUT = "lm_head"
EMBEDDING = "transformer.wte"


def _expand(family: str, n_layer: int):
    """(row, concrete our-name, concrete names per format) for every module of every block."""
    for row in TABLES[family]:
        for i in range(n_layer) if "{i}" in row.ours else (0,):
            names = {HF: tuple(n.format(i=i) for n in row.hf), GGUF: tuple(n.format(i=i) for n in row.gguf)}
            yield row, row.ours.format(i=i), names


def _split_rows(row: Row, config: GPTConfig) -> list[int] | None:
    if row.split == "qkv":
        return [config.n_head * config.head_dim] + [config.kv_heads * config.head_dim] * 2
    if row.split == "gate_up":
        return [config.mlp_hidden_size] * 2
    return None


def _heads(config: GPTConfig, piece: int) -> int:
    return config.n_head if piece == 0 else config.kv_heads  # q, then k (v is never permuted)


def rope_permute(w: Tensor, n_head: int) -> Tensor:
    """Rows of each head from rotate-half order (i, i + d/2) to llama.cpp's pair order (2i, 2i+1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_unpermute(w: Tensor, n_head: int) -> Tensor:
    """The inverse of ``rope_permute``."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tied_output_stored(family: str, fmt: str) -> bool:
    """Whether ``fmt`` stores a tied output matrix as its own tensor (only a GPT-2 GGUF does)."""
    return fmt == GGUF and family == GPT2


# ---------------------------------------------------------------------------------------------
# Out: our weights under a format's names
# ---------------------------------------------------------------------------------------------


def hf_modules(config: GPTConfig, family: str) -> dict[str, tuple[tuple[str, ...], list[int] | None, bool]]:
    """Each of our modules -> (its transformers module names, how our rows split among them or None,
    whether transformers stores it transposed): where an adapter on it goes (``interop.adapter``)."""
    return {name: (formats[HF], _split_rows(row, config), row.conv1d) for row, name, formats in
            _expand(family, config.n_layer)}


def export_weights(model: GPT, family: str, fmt: str) -> dict[str, Tensor]:
    """Our weights under ``fmt``'s names (``"hf"`` or ``"gguf"``), float32, in that format's layout."""
    c = model.config
    ours = {k: v.detach().float() for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    for row, name, formats in _expand(family, c.n_layer):
        if name == OUTPUT and c.tie_embeddings and not tied_output_stored(family, fmt):
            continue
        for param in ("weight", "bias"):
            value = ours.get(f"{name}.{param}")
            if value is None and param == "bias" and row.biased:
                value = torch.zeros(ours[f"{name}.weight"].shape[0])
            if value is None:
                continue
            rows = _split_rows(row, c)
            pieces = value.split(rows) if rows else (value,)
            for k, (target, piece) in enumerate(zip(formats[fmt], pieces)):
                if fmt == HF and row.conv1d and param == "weight":
                    piece = piece.t()
                if fmt == GGUF and row.rope and row.rope[k]:
                    piece = rope_permute(piece, _heads(c, k))
                out[f"{target}.{param}"] = piece.contiguous().clone()
    return out


# ---------------------------------------------------------------------------------------------
# In: a format's tensors under our names
# ---------------------------------------------------------------------------------------------


def import_weights(tensors: Mapping[str, Tensor], config: GPTConfig, family: str, fmt: str,
                   source: Path) -> dict[str, Tensor]:
    """The inverse of ``export_weights``: ``tensors`` (``fmt``'s names) as our float32 state dict.

    Biases our model has but the file lacks (a Llama with only one of attention_bias/mlp_bias)
    are zeros; a tied output is the embedding (as ``transformers`` ties it, whatever the file
    stores). LmforgeError naming ``source`` for a missing or misshapen weight, or a tensor no row
    of the table accounts for (it would be silently dropped).
    """
    with torch.device("meta"):  # our parameter names and shapes, without allocating the model
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    used: set[str] = set()
    state: dict[str, Tensor] = {}
    for row, name, formats in _expand(family, config.n_layer):
        for param in ("weight", "bias"):
            key = f"{name}.{param}"
            if key not in expected:
                _zero_biases(tensors, formats[fmt], param, row, used)
                continue
            if name == OUTPUT and config.tie_embeddings:
                state[key] = state[f"{EMBEDDING}.weight"]
                used.update(n for n in (f"{t}.{param}" for t in formats[fmt]) if n in tensors)
                continue
            state[key] = _gather(tensors, row, formats[fmt], param, config, fmt, source, used, expected[key])
    unused = sorted(k for k in tensors if k not in used and not (fmt == HF and k.endswith(HF_BUFFERS)))
    if unused:
        raise LmforgeError(f"{source} has the tensor '{unused[0]}', which lmforge's {family} model does not have "
                           "(it would be dropped), so lmforge cannot reproduce this model exactly.")
    return state


def _zero_biases(tensors: Mapping[str, Tensor], targets: tuple[str, ...], param: str, row: Row,
                 used: set[str]) -> None:
    """Accept the biases a GPT-2 file always carries where our model has none, if they are zeros."""
    for name in (f"{t}.{param}" for t in targets if param == "bias" and row.biased):
        if name in tensors and torch.count_nonzero(tensors[name]) == 0:
            used.add(name)


def _gather(tensors: Mapping[str, Tensor], row: Row, targets: tuple[str, ...], param: str, config: GPTConfig,
            fmt: str, source: Path, used: set[str], shape: torch.Size) -> Tensor:
    """One of our parameters from its piece(s) in ``tensors``, undoing the format's layout."""
    rows = _split_rows(row, config) or [shape[0]]
    pieces = []
    for k, target in enumerate(targets):
        name = f"{target}.{param}"
        if name not in tensors:
            if param == "bias":  # a half our single bias switch has and the file lacks
                pieces.append(torch.zeros(rows[k]))
                continue
            raise LmforgeError(f"{source} has no weight '{name}'; the file does not match its own configuration.")
        used.add(name)
        pieces.append(tensors[name].float())
    try:
        if fmt == HF and row.conv1d and param == "weight":
            pieces = [piece.t() for piece in pieces]
        if fmt == GGUF and row.rope:
            pieces = [rope_unpermute(p, _heads(config, k)) if row.rope[k] else p for k, p in enumerate(pieces)]
        value = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    except RuntimeError:  # pieces whose shapes do not fit together or the heads
        value = None
    if value is None or value.shape != shape:
        shapes = ", ".join(str(tuple(p.shape)) for p in pieces)
        raise LmforgeError(f"{source}: '{targets[0]}.{param}' ({len(pieces)} piece(s) of shape {shapes}) does not "
                           f"give the {tuple(shape)} its configuration needs; the file is inconsistent.")
    return value.contiguous()
