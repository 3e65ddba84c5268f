"""Scaled dot-product attention that keeps float32 arithmetic when the CPU's float32 matmuls run in
bfloat16.

``torch.set_float32_matmul_precision("medium")`` on a CPU lets oneDNN compute float32 matmuls
with bfloat16 inputs and float32 accumulation (``torch.backends.mkldnn.matmul.fp32_precision ==
"bf16"``). Where bf16 is native (AVX512-BF16, AMX) the baby's linear layers then run about 2x
faster, forward and backward. torch's CPU flash attention reads the same setting and takes a
reduced-precision path that is about 10x *slower* at the baby's shapes (head_dim 32, 64 tokens:
2.4 ms against 25.7 ms for forward and backward). ``attention`` therefore runs attention's forward
and backward with IEEE float32 matmuls whenever the setting is on, and calls torch's attention
unchanged otherwise (GPUs, float32 CPUs, and every CPU that lacks native bf16, where oneDNN
ignores the setting).

Under ``torch.compile`` (``trainer.compile=true``) the setting is read once, while tracing: with
float32 matmuls the model is one graph, attention inside it. With bf16 matmuls each attention call
stays outside the compiled graphs (dynamo cannot switch oneDNN's setting), one graph break per
layer; the rest still compiles.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kwargs)``, in IEEE float32 on a CPU whose
    float32 matmuls are set to bf16."""
    if q.device.type == "cpu" and q.dtype == torch.float32 and bf16_matmuls():
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return _Float32Attention.apply(q, k, v, kwargs)
        with ieee_matmuls():  # validation, generation: no backward to keep
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


@torch.compiler.assume_constant_result  # torch.compile: read once while tracing (dynamo cannot read it)
def bf16_matmuls() -> bool:
    """Whether oneDNN runs float32 matmuls in bfloat16 (``float32_matmul_precision`` medium)."""
    return torch.backends.mkldnn.matmul.fp32_precision == "bf16"


@contextlib.contextmanager
def ieee_matmuls():
    """Float32 matmuls in float32 inside the block; the setting is restored after it."""
    backend = torch.backends.mkldnn.matmul
    before = backend.fp32_precision
    backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        backend.fp32_precision = before


class _Float32Attention(torch.autograd.Function):
    """Attention as one autograd node whose forward and backward both run under ``ieee_matmuls``.

    The forward builds torch's own attention graph on detached inputs and keeps it; the backward
    runs that graph's backward. Any attention torch has (masks, dropout, grouped-query heads)
    differentiates exactly as it would outside, only the setting differs.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, kwargs: dict) -> Tensor:
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        with ieee_matmuls(), torch.enable_grad():
            out = F.scaled_dot_product_attention(*inputs, **kwargs)
        ctx.inputs, ctx.out = inputs, out
        return out.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        inputs, out = ctx.inputs, ctx.out
        ctx.inputs = ctx.out = None  # the inner graph is spent after this
        wanted = [t for t in inputs if t.requires_grad]
        with ieee_matmuls():
            grads = iter(torch.autograd.grad(out, wanted, grad))
        return (*(next(grads) if t.requires_grad else None for t in inputs), None)
