"""Tests for lmforge.model: every option builds and trains, attention is causal, the KV cache
changes nothing, GPT-2 sizes and initialisation, config validation, and the HF layouts."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lmforge.model.gpt import GPT, GPTConfig, KVCache
from lmforge.model.positions import sinusoidal_table

POSITIONS = ("learned", "sinusoidal", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "swiglu", "relu2")

LLAMA_STYLE = dict(
    positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, tie_embeddings=False, bias=False
)


# Tiny tensors: one thread is fastest on a shared 2-core machine (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> GPTConfig:
    settings = dict(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_embd=32)
    settings.update(overrides)
    return GPTConfig(**settings)


def build(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config)


@pytest.mark.parametrize(
    "options",
    [dict(positions=p, norm=n, mlp=m) for p, n, m in itertools.product(POSITIONS, NORMS, MLPS)]
    + [LLAMA_STYLE, dict(LLAMA_STYLE, dropout=0.1)],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_every_option_trains(options):
    model = build(tiny(**options))
    idx = torch.randint(0, 32, (2, 16))
    targets = torch.randint(0, 32, (2, 16))
    targets[0, :3] = -100  # ignored positions
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 16, 32)
    assert torch.isfinite(loss)
    assert abs(loss.item() - math.log(32)) < 0.5  # small init: close to uniform
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_no_targets_gives_logits_for_every_position_and_no_loss():
    logits, loss = build(tiny())(torch.randint(0, 32, (3, 7)))
    assert logits.shape == (3, 7, 32) and loss is None


@pytest.mark.parametrize("options", [dict(positions=p) for p in POSITIONS] + [LLAMA_STYLE], ids=str)
def test_attention_is_causal(options):
    model = build(tiny(**options)).eval()
    idx = torch.randint(0, 32, (1, 16))
    changed = idx.clone()
    t = 9
    changed[0, t + 1] = (idx[0, t + 1] + 1) % 32
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


@pytest.mark.parametrize("positions", POSITIONS)
def test_tiny_model_overfits_one_batch(positions):
    torch.manual_seed(0)
    sequence = torch.randint(0, 16, (1, 33))
    x, y = sequence[:, :-1], sequence[:, 1:]
    config = GPTConfig(vocab_size=16, block_size=32, n_layer=2, n_head=4, n_embd=64, positions=positions)
    model = build(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5


@pytest.mark.parametrize("options", [dict(positions=p) for p in POSITIONS] + [LLAMA_STYLE], ids=str)
def test_cached_forward_equals_full_forward(options):
    model = build(tiny(**options)).eval()
    idx = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(2)
        pieces = [model(idx[:, :6], cache=cache)[0]]  # prefill
        pieces.append(model(idx[:, 6:10], cache=cache)[0])  # several tokens after cached ones
        for t in range(10, 16):  # decode one by one
            pieces.append(model(idx[:, t : t + 1], cache=cache)[0])
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_cache_shape_device_and_reset():
    model = build(tiny(n_kv_head=2))
    cache = model.new_kv_cache(3)
    assert isinstance(cache, KVCache)
    assert len(cache.k) == len(cache.v) == 2
    assert cache.k[0].shape == (3, 2, 16, 8) and cache.k[0].dtype == torch.float32
    model(torch.randint(0, 32, (3, 5)), cache=cache)
    assert cache.length == 5
    cache.reset()
    assert cache.length == 0


def test_too_many_tokens_is_a_clear_error():
    model = build(tiny())
    with pytest.raises(ValueError, match="block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_kv_cache(1)
    model(torch.zeros(1, 12, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="12 cached \\+ 5 new tokens exceed model.block_size=16"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="new_kv_cache\\(2\\)"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)


def test_gpt2_small_parameter_count():
    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params(non_embedding=False) == 124_439_808
    assert model.num_params() == 124_439_808 - 1024 * 768  # nanoGPT's "123.65M"
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 12 * 768 * 1024
    mfu = model.estimate_mfu(tokens_per_second=1000.0, peak_flops=model.flops_per_token() * 4000.0)
    assert mfu == pytest.approx(0.25)


def test_tied_embeddings_share_one_tensor():
    tied = build(tiny())
    assert tied.lm_head.weight is tied.transformer.wte.weight
    untied = build(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() - tied.num_params() == 32 * 32
    with torch.no_grad():
        tied.transformer.wte.weight[0, 0] = 5.0
    assert tied.lm_head.weight[0, 0] == 5.0


def test_gpt2_initialisation():
    model = build(GPTConfig(vocab_size=256, block_size=64, n_layer=8, n_head=4, n_embd=256))
    block = model.transformer.h[0]
    residual = [block.attn.c_proj, block.mlp.c_proj]
    assert all(getattr(m, "is_residual_projection", False) for m in residual)
    assert not getattr(block.attn.c_attn, "is_residual_projection", False)
    for linear in residual:
        assert linear.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
        assert (linear.bias == 0).all()
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_gelu_tanh_is_gpt2s_approximation_and_differs_from_exact_gelu():
    from lmforge.model.gpt import MLP

    torch.manual_seed(0)
    mlp = MLP(tiny(mlp="gelu_tanh")).eval()
    x = torch.randn(3, 32)
    h = mlp.c_fc(x)
    gpt2 = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # GPT-2's own code
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.c_proj(gpt2), rtol=0, atol=1e-6)
        mlp.approximate = "none"
        assert (mlp(x) - mlp.c_proj(gpt2)).abs().max() > 1e-5  # the exact GELU is another function
    assert tiny(mlp="gelu_tanh").mlp_hidden_size == 4 * 32


def test_mlp_widths_and_positions_tables():
    assert GPTConfig(vocab_size=8).mlp_hidden_size == 512
    assert GPTConfig(vocab_size=8, mlp="swiglu").mlp_hidden_size == 352  # 341 rounded up to 32s
    assert GPTConfig(vocab_size=8, n_embd=768, n_head=12, mlp="swiglu").mlp_hidden_size == 2048
    assert GPTConfig(vocab_size=8, mlp="swiglu", mlp_hidden=100).mlp_hidden_size == 100
    table = sinusoidal_table(50, 16)
    pos, i = 7, 3
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert sinusoidal_table(4, 5).shape == (4, 5)
    # Fixed tables are not parameters and are not saved.
    model = build(tiny(positions="sinusoidal"))
    assert model.num_params() == model.num_params(non_embedding=False)
    assert not any("pos_table" in k or "rope" in k for k in model.state_dict())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(positions="foo"), "model.positions='foo' is not one of learned, sinusoidal, rope"),
        (dict(norm="batchnorm"), "model.norm='batchnorm' is not one of layernorm, rmsnorm"),
        (dict(mlp="relu"), "model.mlp='relu' is not one of gelu, gelu_tanh, swiglu, relu2"),
        (dict(vocab_size=0), "model.vocab_size=0 must be a positive integer"),
        (dict(block_size=2.5), "model.block_size=2.5 must be a positive integer"),
        (dict(n_layer=True), "model.n_layer=True must be a positive integer"),
        (dict(n_embd=30), "model.n_embd=30 must be divisible by model.n_head=4"),
        (dict(n_kv_head=3), "model.n_kv_head=3 must divide model.n_head=4"),
        (dict(n_kv_head=0), "model.n_kv_head=0 must be a positive integer"),
        (dict(dropout=1.0), "model.dropout=1.0 must be in [0, 1)"),
        (dict(positions="rope", n_embd=12, n_head=4), "model.n_embd=12 must give an even head size"),
        (dict(rope_theta=0.0), "model.rope_theta=0.0 must be a positive number"),
        (dict(norm_eps=-1e-5), "model.norm_eps=-1e-05 must be a positive number"),
        (dict(mlp_hidden=0), "model.mlp_hidden=0 must be a positive integer"),
        (dict(bias="yes"), "model.bias='yes' must be true or false"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    config = tiny(**overrides)
    with pytest.raises(ValueError) as err:
        config.validate()
    assert str(err.value).startswith(message)
    with pytest.raises(ValueError):
        GPT(config)


def test_config_dict_round_trip_and_unknown_keys():
    config = tiny(**LLAMA_STYLE)
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="model.n_layers is not a model setting"):
        GPTConfig.from_dict({"vocab_size": 8, "n_layers": 2})
    with pytest.raises(ValueError, match="model.vocab_size is missing"):
        GPTConfig.from_dict({"n_layer": 2})
    with pytest.raises(ValueError, match="model.norm='ln'"):
        GPTConfig.from_dict({"vocab_size": 8, "norm": "ln"})


def test_config_errors_are_lmforge_errors():
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError):
        tiny(positions="foo").validate()


def test_llama_style_weights_match_hf_llama_without_permutation():
    transformers = pytest.importorskip("transformers")
    config = tiny(block_size=32, n_embd=64, norm_eps=1e-6, **LLAMA_STYLE)
    model = build(config).eval()
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=32,
            hidden_size=64,
            intermediate_size=config.mlp_hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            rms_norm_eps=1e-6,
            rope_theta=config.rope_theta,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        )
    ).eval()
    q_rows, kv_rows = 4 * 16, 2 * 16
    state = {"model.embed_tokens.weight": model.transformer.wte.weight}
    for i, block in enumerate(model.transformer.h):
        p = f"model.layers.{i}."
        q, k, v = block.attn.c_attn.weight.split([q_rows, kv_rows, kv_rows])
        gate, up = block.mlp.c_fc.weight.chunk(2)
        state.update({
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.c_proj.weight,
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": block.mlp.c_proj.weight,
            p + "input_layernorm.weight": block.ln_1.weight,
            p + "post_attention_layernorm.weight": block.ln_2.weight,
        })
    state["model.norm.weight"] = model.transformer.ln_f.weight
    state["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    idx = torch.randint(0, 32, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-5)


def test_gpt2_style_weights_match_hf_gpt2():
    transformers = pytest.importorskip("transformers")
    model = build(tiny()).eval()
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=4, activation_function="gelu"
        )
    ).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            tensor = tensor.t()  # HF GPT-2 uses Conv1D, (in, out)
        state[name] = tensor
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    idx = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-5)


def preset(name: str, vocab_size: int) -> GPTConfig:
    from pathlib import Path

    from omegaconf import OmegaConf

    from lmforge.config.compose import compose_config

    cfg = compose_config([f"model={name}"], conf_dir=Path(__file__).resolve().parents[2] / "conf")
    return GPTConfig.from_dict({**OmegaConf.to_container(cfg.model), "vocab_size": vocab_size})


@pytest.mark.parametrize(
    "name, vocab_size, parameters",
    [
        ("gpt2-small", 50257, 124_439_808),  # GPT-2's 124M
        ("gpt2-medium", 50257, 354_823_168),  # GPT-2's "345M"/"350M"
        ("llama-small", 32000, 100_092_672),
        ("baby", 86, 812_544),
        ("baby-llama", 86, 809_856),  # 809,600 + QK-norm gains (4 layers x 2 x 32)
    ],
)
def test_model_presets(name, vocab_size, parameters):
    with torch.device("meta"):
        model = GPT(preset(name, vocab_size))
    assert model.num_params(non_embedding=False) == parameters


def test_llama_presets_are_llama_style_and_the_baby_ones_compare():
    for name in ("llama-small", "baby-llama"):
        c = preset(name, 86)
        assert (c.positions, c.norm, c.mlp, c.bias) == ("rope", "rmsnorm", "swiglu", False)
        assert c.kv_heads < c.n_head  # grouped-query attention
    baby, llama = GPT(preset("baby", 86)), GPT(preset("baby-llama", 86))
    # The quality comparison at the baby budget needs the same size within 10%.
    assert abs(llama.num_params(False) / baby.num_params(False) - 1) < 0.1


def test_flops_per_token_leave_out_an_untied_input_embedding():
    tied, untied = build(tiny()), build(tiny(tie_embeddings=False))
    assert untied.flops_per_token() == tied.flops_per_token()  # the extra lookup table costs no matmul
    assert untied.num_params() == tied.num_params() + 32 * 32


def test_speedrun_options_qk_norm_softcap_and_zero_residual_init():
    config = tiny(positions="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, logit_softcap=3.0,
                  zero_init_residual=True)
    model = build(config)
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        assert block.attn.q_norm.weight.shape == block.attn.k_norm.weight.shape == (config.head_dim,)
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
        logits, _ = model(torch.randint(0, 32, (2, 8)))
    assert logits.abs().max() <= 3.0  # capped: 3 tanh(x / 3) (reaches 3.0 in float32)
    assert logits.abs().max() > 2.9
