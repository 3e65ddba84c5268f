"""The serving engine's decode step: one new token for each of the first B KV slots, at small cost.

``GPT.forward(idx, cache=slots)`` is the reference and computes the same logits; this module exists
for speed alone. At serving sizes (one to a few dozen sequences, one token each) a step's matrix
products are tiny, so what a step costs is mostly per-operation overhead: nn.Module calls, views,
transposes, a mask built and applied whether or not it masks anything, keys written through
advanced indexing. ``Decoder`` walks the model's weights with functional calls only, writes the
new keys and values through plain slices when every slot is at the same length (always so for one
sequence), and builds an attention mask only when the slots' lengths differ.

``prepare_weights`` lays each linear layer's weight out transposed in memory (the same values, as a
transposed view of a contiguous copy, so ``weight.t()`` is contiguous): the matrix-vector products of
a decode step run about twice as fast that way on CPU (MKL's gemm with one row), and larger batches
gain too. Memory stays the same. The tied output layer (the token embedding) is left as it is.

What it does not do: prefill (the model's own forward fills a slot), sampling, slots' bookkeeping.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.inference.kv_slots import KVSlots
from lmforge.model.gpt import GPT, RMSNorm, softcap
from lmforge.model.positions import apply_rope


def prepare_weights(model: GPT) -> GPT:
    """Lay out ``model``'s linear weights transposed in memory (values unchanged); returns ``model``."""
    tied = model.transformer.wte.weight
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight is not tied and module.weight.is_contiguous():
            module.weight.data = module.weight.data.t().contiguous().t()
    return model


class Decoder:
    """``decoder(slots, idx)``: the next-token logits of slots 0..B-1 of a KVSlots, for ``model`` in eval mode.

    Reads the model's parameters once, into one flat tuple per layer (nn.Module attribute look-ups cost
    as much as the small operations do); the parameters are used in place, so the decoder follows the
    model's weights as long as they are not replaced by other tensors.
    """

    def __init__(self, model: GPT):
        c = model.config
        self.model, self.config = model, c
        t = model.transformer
        self.wte, self.lm_head = t.wte.weight, model.lm_head.weight
        self.positions = self.rope = None  # the table added to the embeddings, or RoPE's (cos, sin)
        if c.positions == "learned":
            self.positions = t.wpe.weight
        elif c.positions == "sinusoidal":
            self.positions = model.pos_table
        else:
            self.rope = (model.rope_cos, model.rope_sin)
        self.ln_f = _norm_of(t.ln_f)
        self.swiglu, self.relu2 = c.mlp == "swiglu", c.mlp == "relu2"
        self.approximate = "tanh" if c.mlp == "gelu_tanh" else "none"
        self.layers = [(_norm_of(b.ln_1), b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
                        b.attn.c_proj.bias, _norm_of(b.ln_2), b.mlp.c_fc.weight, b.mlp.c_fc.bias,
                        b.mlp.c_proj.weight, b.mlp.c_proj.bias) for b in t.h]
        # QK-norm per layer: (query gain, key gain, eps), or None
        self.qk_norms = [(b.attn.q_norm.weight, b.attn.k_norm.weight, b.attn.q_norm.eps) if c.qk_norm else None
                         for b in t.h]

    def __call__(self, slots: KVSlots, idx: Tensor) -> Tensor:
        """Logits (B, vocab_size) of the next token of slots 0..B-1, each fed ``idx[b]`` (B,) at its own length.

        Appends each slot's new key and value and advances ``slots.lengths[:B]``, as
        ``model(idx[:, None], cache=slots)`` does, whose logits these are. Call it under
        ``torch.inference_mode()`` (the engine's thread runs in it): entering it costs as much as an operation.
        """
        c = self.config
        B = idx.size(0)
        lengths = slots.lengths[:B].tolist()
        span = max(lengths) + 1
        if span > slots.block_size:
            raise ValueError(f"a slot holds {span - 1} tokens already: model.block_size={slots.block_size} is full.")
        same = min(lengths) == span - 1  # every slot at one length: slices, no mask
        at = span - 1 if same else slots.lengths[:B]
        x = self.wte.index_select(0, idx)
        rope = None
        if self.rope is not None:  # (B or 1, 1, head_dim): broadcast over the heads of q and k
            rope = (self.rope[0][at].view(-1, 1, c.head_dim), self.rope[1][at].view(-1, 1, c.head_dim))
        else:
            x = x + self.positions[at]
        mask = rows = None
        if not same:
            keys = torch.arange(span, device=idx.device)
            mask = torch.zeros(B, 1, 1, span, dtype=x.dtype, device=idx.device)
            mask.masked_fill_((keys[None, :] > slots.lengths[:B, None])[:, None, None, :], float("-inf"))
            rows = torch.arange(B, device=idx.device)
        nh, nkv, hd = c.n_head, c.kv_heads, c.head_dim
        gqa = nkv != nh
        for layer, (ln_1, w_qkv, b_qkv, w_o, b_o, ln_2, w_fc, b_fc, w_proj, b_proj) in enumerate(self.layers):
            qkv = F.linear(_norm(ln_1, x), w_qkv, b_qkv).view(B, nh + 2 * nkv, hd)
            qk, v = qkv[:, : nh + nkv], qkv[:, nh + nkv :]
            if self.qk_norms[layer] is not None:  # as the model: one pass over q and k, then each head's gain
                q_gain, k_gain, eps = self.qk_norms[layer]
                qk = F.rms_norm(qk.float(), (hd,), eps=eps).type_as(qk)
                qk[:, :nh] *= q_gain
                qk[:, nh:] *= k_gain
            if rope is not None:
                qk = apply_rope(qk, *rope)
            q, k = qk[:, :nh, None], qk[:, nh:]
            K, V = slots.k[layer], slots.v[layer]
            if same:
                K[:B, :, at] = k
                V[:B, :, at] = v
            else:
                K[rows, :, at] = k
                V[rows, :, at] = v
            y = F.scaled_dot_product_attention(q, K[:B, :, :span], V[:B, :, :span], attn_mask=mask, enable_gqa=gqa)
            x = x + F.linear(y.reshape(B, nh * hd), w_o, b_o)
            h = F.linear(_norm(ln_2, x), w_fc, b_fc)
            if self.swiglu:  # [gate | up]
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            elif self.relu2:
                h = F.relu(h).square()
            else:
                h = F.gelu(h, approximate=self.approximate)
            x = x + F.linear(h, w_proj, b_proj)
        slots.lengths[:B] += 1
        return softcap(F.linear(_norm(self.ln_f, x), self.lm_head), c.logit_softcap)


def _norm_of(module: nn.Module) -> tuple:
    """(rms, weight, bias, eps) of a norm layer."""
    if isinstance(module, RMSNorm):
        return True, module.weight, None, module.eps
    return False, module.weight, module.bias, module.eps


def _norm(norm: tuple, x: Tensor) -> Tensor:
    rms, weight, bias, eps = norm
    if rms:  # as RMSNorm.forward: normalised in float32, the gain after
        return weight * F.rms_norm(x.float(), (x.size(-1),), eps=eps).type_as(x)
    return torch.layer_norm(x, (x.size(-1),), weight, bias, eps)
