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

ADJUST_LR = ("original", "match_rms_adamw")
NS_SCHEMES = ("torch", "polar_express")


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The learning rate for a matrix of ``shape``, as torch's Muon scales it: ``original`` (Keller
    Jordan: sqrt(max(1, rows / cols))) or ``match_rms_adamw`` (Moonshot: 0.2 sqrt(max(rows, cols)))."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


# Polar Express (Amsel et al. 2025): one quintic per iteration, each the minimax-optimal odd polynomial
# for the singular values the previous ones leave (5 iterations, safety factor 2e-2, cushion 2; the
# iterate is first scaled by 1/(1.02 |G|_F)). A run of fewer iterations takes the first ones.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02


def iteration_coefficients(scheme: str, torch_coefficients: tuple[float, float, float], steps: int
                           ) -> tuple[list[tuple[float, float, float]], float]:
    """The (a, b, c) of each of ``steps`` iterations and the factor on the Frobenius norm the
    gradient is first divided by: ``torch`` repeats torch's one quintic; ``polar_express`` takes
    Polar Express's, repeating its last beyond five."""
    if scheme == "polar_express":
        return [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)], POLAR_EXPRESS_SAFETY
    return [tuple(torch_coefficients)] * steps, 1.0


def zeropower_via_newtonschulz(grad: torch.Tensor, coefficients: list[tuple[float, float, float]], eps: float,
                               dtype: torch.dtype, safety: float = 1.0) -> torch.Tensor:
    """Approximately orthogonal matrices with the singular vectors of each matrix of ``grad``
    (..., rows, cols): U S' V^T, S' near 1, by one quintic Newton-Schulz iteration per entry of
    ``coefficients`` in ``dtype``; returned in ``dtype``.

    torch's ``_zeropower_via_newtonschulz`` with ``dtype`` in place of its fixed bfloat16, over a
    stack of matrices at once (each normalised by ``safety`` times its own norm): one batched
    product per step instead of one per matrix, which is most of Muon's cost at small sizes.
    """
    x = grad.to(dtype)
    tall = grad.size(-2) > grad.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * safety).clamp(min=eps)  # spectral norm at most 1
    batched = x.dim() == 3
    for a, b, c in coefficients:
        gram = x @ x.mT
        if batched:
            update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, update, x, beta=a)
        else:
            update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, update, x, beta=a)
    return x.mT if tall else x


def normalise_neurons(ortho: torch.Tensor, variance: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (Li et al. 2025): ``ortho`` (matrices, rows, cols) with each row (each column when
    the matrices are wide) divided by the root of its running mean square, then all rescaled to
    the Frobenius norm they had. ``variance`` (matrices, rows, 1) or (matrices, 1, cols), float32,
    is updated in place with weight ``1 - beta2``."""
    axis = -1 if ortho.size(-2) >= ortho.size(-1) else -2
    mean_square = ortho.float().square().mean(dim=axis, keepdim=True)
    variance.lerp_(mean_square, 1 - beta2)
    scale = variance.clamp_min(1e-10).rsqrt()
    before = mean_square.sum(dim=(-2, -1), keepdim=True)
    after = (mean_square * scale.square()).sum(dim=(-2, -1), keepdim=True)
    return ortho * (scale * (before / after.clamp_min(1e-20)).sqrt()).to(ortho.dtype)


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` orthogonalising in ``ns_dtype`` (torch's is always bfloat16).

    Takes torch's arguments plus ``ns_dtype``; same update up to the dtype's rounding, same state.
    ``row_blocks`` (parameter id -> row counts) names matrices that join several along their rows
    (fused q|k|v, gate|up): each block is orthogonalised, and its step scaled, as a matrix of its
    own (modded-nanogpt); the momentum is the whole matrix's, so the state is unchanged.
    """

    def __init__(self, params, *args, ns_dtype: torch.dtype = torch.bfloat16,
                 row_blocks: dict[int, tuple[int, ...]] | None = None, ns_scheme: str = "torch",
                 normuon_beta2: float | None = None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype
        self.row_blocks = row_blocks or {}
        self.ns_scheme = ns_scheme
        self.normuon_beta2 = normuon_beta2

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
                if weight_decay:  # a product by 1 changes no bit: skip the pass over the matrix
                    param.mul_(1 - lr * weight_decay)
                rows = self.row_blocks.get(id(param), (param.size(0),))
                variances = self._variances(state, param, rows)
                for block, part, variance in zip(param.split(rows), update.split(rows), variances):
                    by_shape.setdefault(block.shape, []).append((block, part, variance))
            coefficients, safety = iteration_coefficients(self.ns_scheme, group["ns_coefficients"], group["ns_steps"])
            for shape, triples in by_shape.items():
                ortho = zeropower_via_newtonschulz(torch.stack([part for _, part, _ in triples]), coefficients,
                                                   group["eps"], self.ns_dtype, safety)
                if self.normuon_beta2 is not None:
                    variance = torch.stack([v for _, _, v in triples])
                    ortho = normalise_neurons(ortho, variance, self.normuon_beta2)
                    for (_, _, v), new in zip(triples, variance):
                        v.copy_(new)
                step = adjusted_lr(lr, group["adjust_lr_fn"], shape)
                for (block, _, _), matrix in zip(triples, ortho):
                    block.add_(matrix, alpha=-step)
        return loss

    def _variances(self, state: dict, param: torch.Tensor, rows: tuple[int, ...]) -> list[torch.Tensor | None]:
        """NorMuon's running mean squares of ``param``'s row blocks, each a view of one float32
        vector in ``state`` (``variance_buffer``): (rows, 1) for a block at least as tall as wide,
        (1, cols) otherwise. Nones without NorMuon."""
        if self.normuon_beta2 is None:
            return [None] * len(rows)
        cols = param.size(1)
        sizes = [max(r, cols) for r in rows]
        if "variance_buffer" not in state:
            state["variance_buffer"] = torch.zeros(sum(sizes), dtype=torch.float32, device=param.device)
        views = state["variance_buffer"].split(sizes)
        return [v.view(r, 1) if r >= cols else v.view(1, cols) for v, r in zip(views, rows)]
