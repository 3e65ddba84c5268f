"""KV cache slots: many independent sequences decoded in one forward pass, each at its own length.

``GPT.forward(idx, cache=slots)`` recognises a KVSlots (by its ``decode_inputs``) and decodes one
token for each of the first B slots, at that slot's own position, attending only to that slot's
tokens. ``lmforge.inference.batching`` keeps its active requests in the first slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.model.gpt import GPT, KVCache


class KVSlots:
    """Keys and values of up to ``n_slots`` independent sequences, each at its own length.

    For serving many requests in one forward pass (``lmforge.inference.batching``): the first B slots are
    the active ones, and ``GPT.forward(idx, cache=slots)`` with idx (B, 1) appends one token to
    each, at that slot's own position, attending only to that slot's tokens. A slot is filled
    (prefilled) on its own through ``slot(i)``, a KVCache whose tensors are views of slot i.
    """

    @classmethod
    def for_model(cls, model: GPT, n_slots: int, dtype: torch.dtype | None = None) -> KVSlots:
        """Empty slots for ``n_slots`` sequences of ``model``, on its device (dtype: the model's)."""
        weight = model.transformer.wte.weight
        c = model.config
        return cls(c.n_layer, n_slots, c.kv_heads, c.block_size, c.head_dim, weight.device, dtype or weight.dtype)

    def __init__(self, n_layer: int, n_slots: int, n_kv_head: int, block_size: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        shape = (n_slots, n_kv_head, block_size, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.lengths = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.n_slots = n_slots
        self.block_size = block_size

    def slot(self, i: int) -> KVCache:
        """A batch-1 KVCache writing into slot ``i`` from position 0; set ``lengths[i]`` after using it."""
        view = KVCache.__new__(KVCache)
        view.k = [k[i : i + 1] for k in self.k]
        view.v = [v[i : i + 1] for v in self.v]
        view.batch_size, view.block_size, view.length = 1, self.block_size, 0
        return view

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` (keys, values, length) into slot ``dst``: keeps the active slots first."""
        n = int(self.lengths[src])
        for k, v in zip(self.k, self.v):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        self.lengths[dst] = n

    def decode_inputs(self, B: int, T: int) -> tuple[Tensor, Tensor]:
        """Positions (B, 1) of the new tokens of slots 0..B-1 and their additive (B, 1, 1, S) attention mask."""
        if T != 1 or not 0 < B <= self.n_slots:
            raise ValueError(f"KVSlots decodes one token for 1..{self.n_slots} slots, not idx of shape ({B}, {T}).")
        lengths = self.lengths[:B]
        span = int(lengths.max()) + 1
        if span > self.block_size:
            raise ValueError(f"a slot holds {span - 1} tokens already: model.block_size={self.block_size} is full.")
        keys = torch.arange(span, device=lengths.device)
        # Where every layer writes this step, worked out once. The mask is additive (0 or -inf):
        # a boolean one would be converted by every layer's attention.
        self._write = (torch.arange(B, device=lengths.device), lengths.clone(), span)
        mask = torch.zeros(B, 1, 1, span, dtype=self.k[0].dtype, device=lengths.device)
        mask.masked_fill_((keys[None, :] > lengths[:, None])[:, None, None, :], float("-inf"))
        return lengths[:, None], mask

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store each active slot's new (1-token) key/value at its own length; return keys/values to attend over.

        Used inside ``GPT.forward``, after ``decode_inputs`` worked out the step's positions.
        """
        rows, lengths, span = self._write
        self.k[layer][rows, :, lengths] = k[:, :, 0]
        self.v[layer][rows, :, lengths] = v[:, :, 0]
        return self.k[layer][: len(rows), :, :span], self.v[layer][: len(rows), :, :span]
