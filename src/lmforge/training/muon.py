"""Muon whose Newton-Schulz orthogonalisation runs in a dtype the device computes natively.

``torch.optim.Muon`` (Jordan et al. 2024) always orthogonalises in bfloat16. On a CPU without
bf16 instructions (AVX2-only x86, Apple M1) every one of those matmuls is emulated, and that was
84% of a default training step. ``Muon`` here is torch's optimizer with one change: the dtype of
the iterations is a constructor argument (``lmforge.training.hardware.muon_dtype`` picks it). The update
is otherwise torch's, operation for operation (Nesterov momentum by ``lerp``, the quintic
iteration with torch's coefficients, decoupled weight decay, the ``adjust_lr_fn`` scaling), and
the state dict is torch's (``momentum_buffer`` per parameter, the same group keys): checkpoints
move between the two. The dtype is a property of the machine, not of the recipe, so it is not
stored in the state dict: a run resumed elsewhere orthogonalises in that machine's dtype.
"""

from __future__ import annotations

import math

import torch


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The learning rate for a matrix of ``shape``, as torch's Muon scales it: ``original`` (Keller
    Jordan: sqrt(max(1, rows / cols))) or ``match_rms_adamw`` (Moonshot: 0.2 sqrt(max(rows, cols)))."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def zeropower_via_newtonschulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                               eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Approximately orthogonal matrices with the singular vectors of each matrix of ``grad``
    (..., rows, cols): U S' V^T, S' near 1, by ``steps`` quintic Newton-Schulz iterations in
    ``dtype``; returned in ``dtype``.

    torch's ``_zeropower_via_newtonschulz`` with ``dtype`` in place of its fixed bfloat16, over a
    stack of matrices at once (each normalised by its own norm): one batched product per step
    instead of one per matrix, which is most of Muon's cost at small sizes.
    """
    a, b, c = coefficients
    x = grad.to(dtype)
    wide = grad.size(-2) > grad.size(-1)
    if wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    batched = x.dim() == 3
    for _ in range(steps):
        gram = x @ x.mT
        if batched:
            update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, update, x, beta=a)
        else:
            update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, update, x, beta=a)
    return x.mT if wide else x


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` orthogonalising in ``ns_dtype`` (torch's is always bfloat16).

    Takes torch's arguments plus ``ns_dtype``; same update up to the dtype's rounding, same state.
    ``row_blocks`` (parameter id -> row counts) names matrices that join several along their rows
    (fused q|k|v, gate|up): each block is orthogonalised, and its step scaled, as a matrix of its
    own (modded-nanogpt); the momentum is the whole matrix's, so the state is unchanged.
    """

    def __init__(self, params, *args, ns_dtype: torch.dtype = torch.bfloat16,
                 row_blocks: dict[int, tuple[int, ...]] | None = None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype
        self.row_blocks = row_blocks or {}

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step on every parameter with a gradient; returns ``closure()``'s loss, if any.

        The momentum and weight decay per parameter, as torch's; the orthogonalisation for all
        matrices (or row blocks) of one shape in one group at once.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, weight_decay, momentum = float(group["lr"]), group["weight_decay"], group["momentum"]
            by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                param.mul_(1 - lr * weight_decay)
                rows = self.row_blocks.get(id(param), (param.size(0),))
                for block, part in zip(param.split(rows), update.split(rows)):
                    by_shape.setdefault(block.shape, []).append((block, part))
            for shape, pairs in by_shape.items():
                ortho = zeropower_via_newtonschulz(torch.stack([part for _, part in pairs]), group["ns_coefficients"],
                                                   group["ns_steps"], group["eps"], self.ns_dtype)
                step = adjusted_lr(lr, group["adjust_lr_fn"], shape)
                for (block, _), matrix in zip(pairs, ortho):
                    block.add_(matrix, alpha=-step)
        return loss
