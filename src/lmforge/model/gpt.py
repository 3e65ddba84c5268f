"""A GPT: decoder-only transformer language model, in one file that reads top to bottom.

The pieces in the order the forward pass meets them: normalisation, causal self-attention (with a
KV cache for generation), the MLP, the pre-norm block, and the model; the position schemes are in
``lmforge.model.positions`` and the settings they read are ``GPTConfig`` (``lmforge.model.config``).
The defaults are GPT-2 (Radford et al. 2019, as in nanoGPT); the options ``positions="rope"``,
``norm="rmsnorm"``, ``mlp="swiglu"``, ``n_kv_head`` and ``bias=False`` give a Llama-style model,
``qk_norm`` adds Qwen3's query and key norms; ``mlp="gelu_tanh"`` is GPT-2's own tanh-approximate
GELU. ``mlp="relu2"``, ``logit_softcap`` and ``zero_init_residual`` are speedrun options
(modded-nanogpt) that ``benchmarks/recipes.py`` measures.

Parameter names follow GPT-2 (``transformer.wte``, ``transformer.h.0.attn.c_attn``, ``ln_1`` ... also
when the norm is RMSNorm) so that a GPT-2 export is a transpose of the Conv1D weights, and the
tensor layouts follow HuggingFace Llama so that a Llama export needs slicing only (see
``CausalSelfAttention`` and ``SwiGLU``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.model.attention import attention
from lmforge.model.config import GPTConfig
from lmforge.model.positions import apply_rope, rope_tables, sinusoidal_table

# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * weight over the last dimension;
    no centring, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 and cast back before the gain, as HF's LlamaRMSNorm does, so an
        # exported model gives the same numbers in half precision too.
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of the tokens seen so far, for incremental decoding.

    ``k[layer]`` and ``v[layer]`` are preallocated (batch_size, n_kv_head, block_size, head_dim)
    tensors; the first ``length`` positions hold data. ``GPT.forward(..., cache=cache)`` writes the
    new tokens' keys and values in place and advances ``length``, so a decode step allocates no
    cache memory. Make one with ``GPT.new_kv_cache(batch_size)``.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        block_size: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        shape = (batch_size, n_kv_head, block_size, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.batch_size = batch_size
        self.block_size = block_size
        self.length = 0

    def reset(self) -> None:
        """Forget the stored tokens (the memory is kept and overwritten by the next forward)."""
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new (B, n_kv_head, T, head_dim) keys/values after the first ``length`` positions.

        Returns views of all keys and values of ``layer`` including the new ones. ``length`` is
        not advanced here: every layer writes at the same offset and the model advances it once.
        """
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, with grouped-query heads and an optional KV cache.

    q, k and v come from one fused projection ``c_attn`` whose output rows are
    [n_head query heads | n_kv_head key heads | n_kv_head value heads], head_dim rows per head:
    one matmul per layer, GPT-2's own layout when n_kv_head == n_head, and Llama's q_proj,
    k_proj and v_proj are its three row blocks.
    """

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.layer_idx = layer_idx  # which of the cache's layers is ours
        self.dropout = config.dropout
        self.c_attn = nn.Linear(
            config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias
        )
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True  # GPT-2 scales its init; see GPT._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:  # QK-norm (Henry et al. 2020; OLMo 2, Qwen3): bounded attention logits
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """(B, T, n_embd) -> (B, T, n_embd).

        ``rope``: cos/sin of the T new positions, shaped (T, 1, head_dim), or None.
        ``cache``: keys/values of earlier tokens; the new ones are appended.
        ``attn_mask``: (T, past + T) boolean mask, needed only when T > 1 tokens follow cached ones.
        """
        B, T, _ = x.shape
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.c_attn(x).view(B, T, nh + 2 * nkv, self.head_dim)
        qk = qkv[:, :, : nh + nkv]
        if hasattr(self, "q_norm"):  # before the rotation, as Qwen3; both norms in one pass over q and k
            gains = torch.cat((self.q_norm.weight.expand(nh, -1), self.k_norm.weight.expand(nkv, -1)))
            qk = gains * F.rms_norm(qk.float(), (self.head_dim,), eps=self.q_norm.eps).type_as(qk)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # query and key heads are adjacent, so one rotation covers both
        q, k = qk[:, :, :nh], qk[:, :, nh:]
        v = qkv[:, :, nh + nkv :]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)

        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # is_causal aligns the mask top-left, which is right only when the queries start at
        # position 0 (as many keys as queries); after cached tokens, one query sees everything
        # and several need attn_mask.
        y = attention(  # F.scaled_dot_product_attention, in float32 if matmuls are bf16
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and k.size(2) == T,
            enable_gqa=nkv != nh,  # query head h reads kv head h // (nh / nkv), as HF's repeat_kv
        )
        y = y.transpose(1, 2).reshape(B, T, nh * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


# ---------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """GPT-2's feed-forward layer: c_proj(GELU(c_fc(x))).

    GELU is exact (erf) for ``mlp="gelu"``; for ``mlp="gelu_tanh"`` it is the tanh approximation
    (Hendrycks & Gimpel 2016, section 2) that GPT-2 was trained with, transformers' ``gelu_new``
    and llama.cpp's GELU, so GPT-2 checkpoints and GGUF files compute the same function.
    ``mlp="relu2"`` is ReLU squared (So et al. 2021, Primer; modded-nanogpt) in its place.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"
        self.relu2 = config.mlp == "relu2"
        hidden = config.mlp_hidden_size
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate=self.approximate)
        return self.dropout(self.c_proj(h))


class SwiGLU(nn.Module):
    """Gated feed-forward layer (Shazeer 2020), Llama's MLP: c_proj(silu(gate(x)) * up(x)).

    gate and up share one matmul: ``c_fc``'s output rows are [gate | up], so Llama's gate_proj
    and up_proj are its two halves and c_proj is its down_proj.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_hidden_size
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


def make_mlp(config: GPTConfig) -> nn.Module:
    return SwiGLU(config) if config.mlp == "swiglu" else MLP(config)


# ---------------------------------------------------------------------------------------------
# Block and model
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = make_mlp(config)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


def segment_positions(segments: Tensor) -> tuple[Tensor, Tensor]:
    """(positions restarting at 0 where each segment starts, (B, 1, T, T) attention mask: causal and
    within the segment) for (B, T) segment ids of packed records."""
    B, T = segments.shape
    index = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    positions = index - torch.where(starts, index, 0).cummax(dim=1).values
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return positions, (same & causal)[:, None]


def softcap(logits: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(logits / cap)`` (Gemma 2; modded-nanogpt): logits bounded by +-cap; None: unchanged."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


def _loss(logits: Tensor, targets: Tensor | None) -> Tensor | None:
    """Mean cross-entropy over the targets that are not -100 (None without targets)."""
    if targets is None:
        return None
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


class GPT(nn.Module):
    """The language model: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        modules: dict[str, nn.Module] = {"wte": nn.Embedding(config.vocab_size, config.n_embd)}
        if config.positions == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules["drop"] = nn.Dropout(config.dropout)
        modules["h"] = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        modules["ln_f"] = make_norm(config)
        self.transformer = nn.ModuleDict(modules)
        # Fixed tables are buffers, not parameters, and are rebuilt rather than saved.
        if config.positions == "sinusoidal":
            table = sinusoidal_table(config.block_size, config.n_embd)
            self.register_buffer("pos_table", table, persistent=False)
        elif config.positions == "rope":
            cos, sin = rope_tables(config.block_size, config.head_dim, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere, zero biases, and the projections that write into the
        # residual stream scaled by 1/sqrt(2 * n_layer) (two per block), so the stream's variance
        # does not grow with depth.
        # zero_init_residual: those projections start at zero instead, so every block starts as the
        # identity (modded-nanogpt).
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std = 0.0 if self.config.zero_init_residual else 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        cache: KVCache | None = None,
        segments: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits for every position of ``idx``, and the loss when ``targets`` are given.

        idx: (B, T) token ids. targets: (B, T) next-token ids, -100 where no loss is wanted.
        cache: when given, ``idx`` continues the tokens already in it (positions start at
        ``cache.length``); their keys/values are appended and ``cache.length`` grows by T. With
        ``lmforge.inference.kv_slots.KVSlots``, idx is (B, 1): one token for each of the first B slots.
        segments: (B, T) ids of the packed records each position belongs to (non-decreasing along a
        row; ``lmforge.tokenization.packing``): a token attends only within its segment and its
        position restarts at 0 there, as if each record were alone. Not with a cache.
        Returns (logits (B, T, vocab_size), mean cross-entropy or None).
        Raises ValueError when the tokens would pass block_size positions.
        """
        B, T = idx.shape
        if hasattr(cache, "decode_inputs"):  # KVSlots: one token for each of B slots, each at its own position
            pos, attn_mask = cache.decode_inputs(B, T)
            logits = self._run(idx, pos, cache, attn_mask)
            cache.lengths[:B] += 1
            return logits, None
        past = 0
        if cache is not None:
            past = cache.length
            if cache.batch_size != B:
                raise ValueError(
                    f"the KV cache holds {cache.batch_size} sequences but idx has {B}; "
                    f"make one with new_kv_cache({B})."
                )
        if past + T > self.config.block_size:
            raise ValueError(
                f"{past} cached + {T} new tokens exceed model.block_size={self.config.block_size}; "
                "crop the input or reset the cache."
            )

        if segments is not None:
            positions, attn_mask = segment_positions(segments)
            logits = self._run(idx, positions, None, attn_mask)
            return logits, _loss(logits, targets)
        attn_mask = None
        if past > 0 and T > 1:
            # New token i (position past + i) sees every cached token and new tokens 0..i.
            attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=idx.device).tril(diagonal=past)
        logits = self._run(idx, slice(past, past + T), cache, attn_mask)
        if cache is not None:
            cache.length = past + T
        return logits, _loss(logits, targets)

    def _run(self, idx: Tensor, pos: slice | Tensor, cache, attn_mask: Tensor | None) -> Tensor:
        # pos: a slice of positions shared by every row, or a (B, T) tensor of each row's own.
        x = self.transformer.wte(idx)
        rope = None
        if self.config.positions == "learned":
            x = x + self.transformer.wpe.weight[pos]
        elif self.config.positions == "sinusoidal":
            x = x + self.pos_table[pos]
        else:  # rope rotates q and k inside attention; shaped to broadcast over (B, T, heads, head_dim)
            rope = (self.rope_cos[pos, None], self.rope_sin[pos, None])
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, cache, attn_mask)
        return softcap(self.lm_head(self.transformer.ln_f(x)), self.config.logit_softcap)

    def new_kv_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KVCache for ``batch_size`` sequences on the model's device (dtype: the model's)."""
        weight = self.transformer.wte.weight
        c = self.config
        return KVCache(
            c.n_layer, batch_size, c.kv_heads, c.block_size, c.head_dim, weight.device, dtype or weight.dtype
        )

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (tied weights counted once).

        non_embedding=True subtracts the learned position table, as nanoGPT does; the token
        embedding stays in because, tied, it is also the output layer.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.positions == "learned":
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token: 6 N + 12 n_layer n_embd block_size.

        The PaLM appendix B / nanoGPT estimate: 6 per parameter for the matmuls, plus the
        attention scores and weighted sum over a full context. N is num_params() less an untied
        input embedding, which is a lookup, not a matmul (tied, it is also the output layer).
        """
        c = self.config
        n = self.num_params()
        if not c.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s as a fraction of ``peak_flops``."""
        return self.flops_per_token() * tokens_per_second / peak_flops
