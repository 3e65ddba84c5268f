"""Position schemes of ``lmforge.model.gpt``: the fixed sinusoidal table and rotary embeddings (RoPE)."""

from __future__ import annotations

import torch
from torch import Tensor


def sinusoidal_table(block_size: int, n_embd: int) -> Tensor:
    """The fixed position table of Vaswani et al. 2017, section 3.5: (block_size, n_embd) float32.

    PE[pos, 2i] = sin(pos / 10000^(2i / n_embd)),  PE[pos, 2i+1] = cos(pos / 10000^(2i / n_embd)).
    """
    position = torch.arange(block_size, dtype=torch.float32)[:, None]
    frequency = 1.0 / (10000.0 ** (torch.arange(0, n_embd, 2, dtype=torch.float32) / n_embd))
    angle = position * frequency
    table = torch.zeros(block_size, n_embd)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : n_embd // 2])  # an odd n_embd has one sin column more
    return table


def rope_tables(block_size: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles (Su et al. 2021), each (block_size, head_dim) float32.

    Computed as HuggingFace Llama computes them, in the "rotate half" layout: dimension j and
    j + head_dim/2 form a rotation pair, so weights move to ``LlamaForCausalLM`` unpermuted.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angle = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    angle = torch.cat((angle, angle), dim=-1)
    return angle.cos(), angle.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension's two halves, as HF's ``rotate_half``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each head vector of ``x`` (..., head_dim) by its position's angles (cos/sin broadcast)."""
    return x * cos + rotate_half(x) * sin
