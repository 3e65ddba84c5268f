"""nanoGPT's model and training loop at the CPU "baby" config: the outside reference for step costs.

A minimal reimplementation of Andrej Karpathy's nanoGPT (https://github.com/karpathy/nanoGPT,
MIT licence: ``model.py`` and ``train.py``), kept to what its baby run executes, for
``benchmarks/step_cost.py`` to time beside lmforge's trainer on the same machine, thread count and
token file. What it keeps of nanoGPT, because each costs time per step: the model (pre-LayerNorm
blocks, one fused q/k/v projection, ``scaled_dot_product_attention`` with ``is_causal``, GELU MLP
4x wide, learned positions, tied embeddings, no biases: ``bias=False`` as ``train.py`` sets it),
its initialisation, AdamW with decay on the >= 2-D tensors (not fused on CPU, as nanoGPT chooses),
its cosine schedule with warmup set every iteration, ``get_batch`` re-opening ``np.memmap`` per
batch and fetching the next batch after the forward pass, clipping at 1.0 and ``loss.item()`` at
every step (``--log_interval=1``). On CPU nanoGPT runs float32 (no autocast). The baby config:

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class BabyConfig:
    block_size: int = 64
    vocab_size: int = 86
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    batch_size: int = 12
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: BabyConfig):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.resid_dropout = nn.Dropout(c.dropout)
        self.n_head, self.n_embd, self.dropout = c.n_head, c.n_embd, c.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, c: BabyConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, c: BabyConfig):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(c.n_embd, c.bias), CausalSelfAttention(c)
        self.ln_2, self.mlp = LayerNorm(c.n_embd, c.bias), MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c: BabyConfig):
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd), wpe=nn.Embedding(c.block_size, c.n_embd),
            drop=nn.Dropout(c.dropout), h=nn.ModuleList([Block(c) for _ in range(c.n_layer)]),
            ln_f=LayerNorm(c.n_embd, c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)

    def forward(self, idx, targets):
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def configure_optimizers(self, c: BabyConfig):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=c.learning_rate, betas=c.betas)  # fused only on CUDA in nanoGPT


def get_lr(it: int, c: BabyConfig) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to ``min_lr`` at ``lr_decay_iters``."""
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    if it > c.lr_decay_iters:
        return c.min_lr
    ratio = (it - c.warmup_iters) / (c.lr_decay_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)


def train_steps(train_bin: Path, vocab_size: int, steps: int, on_step=lambda step: None, seed: int = 1337) -> float:
    """nanoGPT's training loop for ``steps`` iterations on the uint16 token file ``train_bin``;
    ``on_step(i)`` is called after iteration i's update (for timing). Returns the last loss."""
    c = BabyConfig(vocab_size=vocab_size)
    torch.manual_seed(seed)
    # nanoGPT on a CPU runs torch's defaults: IEEE float32 matmuls, whatever a train stage timed
    # earlier in this process set (trainer.float32_matmul_precision).
    torch.set_float32_matmul_precision("highest")

    def get_batch():
        data = np.memmap(train_bin, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - c.block_size, (c.batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + c.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + c.block_size].astype(np.int64)) for i in ix])
        return x, y

    model = GPT(c)
    optimizer = model.configure_optimizers(c)
    X, Y = get_batch()
    lossf = float("nan")
    for it in range(steps):
        lr = get_lr(it, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        _, loss = model(X, Y)
        X, Y = get_batch()  # nanoGPT fetches the next batch between forward and backward
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lossf = loss.item()  # --log_interval=1: printed every iteration
        on_step(it + 1)
    return lossf
