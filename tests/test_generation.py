"""Tests for lmforge.generation: the cache and the window rule change nothing, seeding,
batching, the sampling filters, validation and streaming."""

from __future__ import annotations

import pytest
import torch

from lmforge.generation import SamplingConfig, generate, generate_tokens, sample_next
from lmforge.model import GPT, GPTConfig

LLAMA_STYLE = dict(
    positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False
)
VOCAB = 32
BLOCK = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: one thread is fastest, and two threads spin-waiting on a shared 2-core
    # machine can make a test 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(dtype=torch.float64, seed: int = 0, **overrides) -> GPT:
    # float64 where two computations must pick the same argmax: no near-tie can flip a token.
    settings = dict(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32)
    settings.update(overrides)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**settings)).to(dtype).eval()


def prompt(batch: int = 1, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "options", [dict(positions="learned"), dict(positions="sinusoidal"), LLAMA_STYLE], ids=str
)
def test_cache_gives_the_same_tokens_past_block_size(options):
    model = tiny_model(**options)
    # 5 + 40 tokens: the window restarts several times (at 17, 26, 35 and 44 tokens).
    greedy = SamplingConfig(max_new_tokens=40, temperature=0.0)
    with_cache = generate(model, prompt(2), greedy)
    without = generate(model, prompt(2), SamplingConfig(max_new_tokens=40, temperature=0.0, use_cache=False))
    assert with_cache.shape == (2, 45)
    assert torch.equal(with_cache, without)
    sampled = SamplingConfig(max_new_tokens=40, seed=3, top_k=10)
    no_cache = SamplingConfig(max_new_tokens=40, seed=3, top_k=10, use_cache=False)
    assert torch.equal(generate(model, prompt(2), sampled), generate(model, prompt(2), no_cache))


def test_window_restarts_from_the_last_half_block():
    # Greedy decoding is a function of the window alone, so a fresh generation started from the
    # restart window (the last block_size // 2 tokens) must continue exactly as the long one.
    model = tiny_model()
    greedy = SamplingConfig(max_new_tokens=30, temperature=0.0)
    tokens = generate(model, prompt(length=5), greedy)
    # The window first overflows when token 17 arrives; it restarts as tokens[9:17].
    restarted = generate(model, tokens[:, 9:17], SamplingConfig(max_new_tokens=8, temperature=0.0))
    assert torch.equal(restarted[:, 8:], tokens[:, 17:25])


def test_same_seed_same_sample_different_seed_different():
    model = tiny_model(dtype=torch.float32)
    a = generate(model, prompt(), SamplingConfig(max_new_tokens=30, seed=7))
    b = generate(model, prompt(), SamplingConfig(max_new_tokens=30, seed=7))
    c = generate(model, prompt(), SamplingConfig(max_new_tokens=30, seed=8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batched_generation_matches_one_prompt_at_a_time():
    model = tiny_model()
    prompts = prompt(batch=3, length=4)
    greedy = SamplingConfig(max_new_tokens=20, temperature=0.0)
    out = generate(model, prompts, greedy)
    assert out.shape == (3, 24)
    assert torch.equal(out[:, :4], prompts)
    for row in range(3):
        assert torch.equal(out[row : row + 1], generate(model, prompts[row : row + 1], greedy))


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny_model()
    greedy = generate(model, prompt(2), SamplingConfig(max_new_tokens=20, temperature=0.0))
    top_k = generate(model, prompt(2), SamplingConfig(max_new_tokens=20, top_k=1, seed=0))
    top_p = generate(model, prompt(2), SamplingConfig(max_new_tokens=20, top_p=1e-6, seed=0))
    assert torch.equal(top_k, greedy)
    assert torch.equal(top_p, greedy)


def test_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(2000, 4)
    generator = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, SamplingConfig(top_k=2), generator).unique().tolist()
    assert drawn == [0, 1]
    # 0.5 < 0.6, so the nucleus needs the second token too; 0.5 + 0.3 >= 0.6, so not the third.
    drawn = sample_next(logits, SamplingConfig(top_p=0.6), generator).unique().tolist()
    assert drawn == [0, 1]
    drawn = sample_next(logits, SamplingConfig(top_p=1.0), generator).unique().tolist()
    assert drawn == [0, 1, 2, 3]


def test_repetition_penalty_lowers_repeated_tokens():
    logits = torch.tensor([[2.0, 1.5, -1.0, -1.2]])
    original = logits.clone()
    greedy = SamplingConfig(temperature=0.0, repetition_penalty=2.0)
    seen_top = torch.tensor([[0, 0]])  # a positive logit: 2.0 / 2 = 1.0 < 1.5
    assert sample_next(logits, SamplingConfig(temperature=0.0), previous=seen_top).item() == 0
    assert sample_next(logits, greedy, previous=seen_top).item() == 1
    # A negative logit is multiplied: -1.0 * 2 = -2.0 falls below -1.2.
    only_negative = torch.tensor([[-1.0, -1.2]])
    assert sample_next(only_negative, greedy, previous=torch.tensor([[0]])).item() == 1
    # On the distribution: repeated tokens lose probability, the others gain.
    probs = torch.softmax(logits, -1)
    generator = torch.Generator().manual_seed(0)
    many = logits.expand(4000, 4)
    previous = torch.tensor([[0, 2]]).expand(4000, 2)
    drawn = sample_next(many, SamplingConfig(repetition_penalty=1.5), generator, previous)
    freq = torch.bincount(drawn.flatten(), minlength=4) / 4000
    assert freq[0] < probs[0, 0] - 0.05 and freq[2] < probs[0, 2]
    assert freq[1] > probs[0, 1] + 0.05
    assert torch.equal(logits, original)  # the caller's logits are left alone


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(max_new_tokens=0), "sampling.max_new_tokens=0 must be an integer >= 1"),
        (dict(temperature=-0.5), "sampling.temperature=-0.5 must be a number >= 0"),
        (dict(top_k=0), "sampling.top_k=0 must be an integer >= 1"),
        (dict(top_p=0.0), "sampling.top_p=0.0 must be in (0, 1]"),
        (dict(top_p=1.5), "sampling.top_p=1.5 must be in (0, 1]"),
        (dict(repetition_penalty=0.0), "sampling.repetition_penalty=0.0 must be a number > 0"),
        (dict(seed="x"), "sampling.seed='x' must be an integer"),
    ],
)
def test_sampling_config_rejects_bad_values(overrides, message):
    cfg = SamplingConfig(**overrides)
    with pytest.raises(ValueError) as err:
        cfg.validate()
    assert str(err.value).startswith(message)
    with pytest.raises(ValueError):
        generate(tiny_model(), prompt(), cfg)


@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_longer_than_block_size_is_cropped_to_the_last_block(use_cache):
    model = tiny_model()
    long_prompt = prompt(length=3 * BLOCK + 2)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0, use_cache=use_cache)
    out = generate(model, long_prompt, cfg)
    assert out.shape == (1, 3 * BLOCK + 14)
    assert torch.equal(out[:, : 3 * BLOCK + 2], long_prompt)  # the whole prompt is returned
    cropped = generate(model, long_prompt[:, -BLOCK:], cfg)
    assert torch.equal(out[:, -12:], cropped[:, -12:])


def test_streaming_yields_each_token():
    model = tiny_model(dtype=torch.float32)
    steps = list(generate_tokens(model, prompt(2), SamplingConfig(max_new_tokens=9, seed=0)))
    assert len(steps) == 9
    assert all(step.shape == (2, 1) and step.dtype == torch.long for step in steps)
    collected = generate(model, prompt(2), SamplingConfig(max_new_tokens=9, seed=0))
    assert torch.equal(torch.cat(steps, 1), collected[:, 5:])


def test_stop_ends_generation_after_the_token_that_triggered_it():
    model = tiny_model(dtype=torch.float32)
    lengths = []

    def stop(tokens):
        lengths.append(tokens.shape[1])
        return tokens.shape[1] == 8

    out = generate(model, prompt(), SamplingConfig(max_new_tokens=50, seed=0), stop=stop)
    assert out.shape == (1, 8)
    assert lengths == [6, 7, 8]


def test_model_mode_is_restored_and_no_graph_is_built():
    model = tiny_model(dtype=torch.float32)
    model.train()
    out = generate(model, prompt(), SamplingConfig(max_new_tokens=3))
    assert model.training
    assert not out.requires_grad
    with pytest.raises(ValueError, match="length >= 1"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), SamplingConfig())
