"""lmforge.model.attention: attention stays IEEE float32 when oneDNN's float32 matmuls run in bf16.

Bit-for-bit: under ``float32_matmul_precision=medium`` attention's outputs and gradients are the
very bits it gives under ``highest``, for every kind of attention the model uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.attention import attention, bf16_matmuls


@pytest.fixture
def precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def _inputs(heads=4, kv_heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((3, heads, 16, 8), (3, kv_heads, 16, 8), (3, kv_heads, 16, 8))
    return [torch.randn(*s, generator=gen, requires_grad=True) for s in shapes]


def _run(fn, inputs, **kwargs):
    out = fn(*inputs, **kwargs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    return out.detach(), grads


@pytest.mark.parametrize("kwargs", [
    dict(is_causal=True, enable_gqa=True),
    dict(attn_mask=torch.ones(16, 16, dtype=torch.bool).tril(), enable_gqa=True),
    dict(is_causal=False, enable_gqa=True),
])
def test_attention_under_bf16_matmuls_is_ieee_float32_attention(precision, kwargs):
    precision("highest")
    want = _run(F.scaled_dot_product_attention, _inputs(), **kwargs)
    precision("medium")
    assert bf16_matmuls()  # medium sets oneDNN to bf16 on any CPU; it uses it only where bf16 is native
    got = _run(attention, _inputs(), **kwargs)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(g, w) for g, w in zip(got[1], want[1]))
    assert torch.get_float32_matmul_precision() == "medium"  # the setting is back after forward and backward


def test_attention_is_torchs_own_when_matmuls_are_float32(precision):
    precision("highest")
    want = _run(F.scaled_dot_product_attention, _inputs(), is_causal=True, enable_gqa=True)
    got = _run(attention, _inputs(), is_causal=True, enable_gqa=True)
    assert torch.equal(got[0], want[0]) and all(torch.equal(g, w) for g, w in zip(got[1], want[1]))
    out = attention(*_inputs(), is_causal=True, enable_gqa=True)
    assert out.grad_fn.name().startswith("ScaledDotProduct")  # no wrapper node


def test_attention_without_gradients_and_with_some_inputs_frozen(precision):
    precision("medium")
    q, k, v = _inputs()
    with torch.no_grad():
        out = attention(q, k, v, is_causal=True, enable_gqa=True)
    precision("highest")
    with torch.no_grad():
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    precision("medium")
    frozen = [q, k.detach(), v]  # only q and v need gradients
    out = attention(*frozen, is_causal=True, enable_gqa=True)
    gq, gv = torch.autograd.grad(out.sum(), (q, v))
    assert gq.shape == q.shape and gv.shape == v.shape


def test_torch_compile_traces_the_model_in_one_graph_when_matmuls_are_float32(precision):
    # Reading oneDNN's setting is opaque to dynamo: read live, it broke the compiled graph at every
    # layer, also on CPUs whose matmuls stay float32 (trainer.compile=true: 7 graphs, not one).
    from lmforge.model.gpt import GPT, GPTConfig

    precision("highest")
    torch._dynamo.reset()
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                          positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True))
    idx = torch.randint(0, 20, (2, 16))
    explained = torch._dynamo.explain(lambda x: model(x, x)[1])(idx)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
