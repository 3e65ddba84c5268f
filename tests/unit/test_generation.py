"""Tests for lmforge.generation: the cache and the window rule change nothing, seeding,
batching, the sampling filters, validation and streaming."""

from __future__ import annotations

import pytest
import torch

from lmforge.inference.generation import SamplingConfig, generate, generate_tokens, sample_next
from tests.helpers import BLOCK, CHAR_TEXT, LLAMA_STYLE, VOCAB, make_model_dir, run_cli, tiny_model

# Tiny tensors: one thread is fastest on a shared 2-core machine (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")




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
        (dict(temperature=-0.5), "sampling.temperature=-0.5 must be a finite number >= 0"),
        (dict(temperature=float("nan")), "sampling.temperature=nan must be a finite number >= 0"),
        (dict(top_k=0), "sampling.top_k=0 must be an integer >= 1"),
        (dict(top_p=0.0), "sampling.top_p=0.0 must be in (0, 1]"),
        (dict(top_p=1.5), "sampling.top_p=1.5 must be in (0, 1]"),
        (dict(repetition_penalty=0.0), "sampling.repetition_penalty=0.0 must be a number from 0.01 to 100"),
        (dict(repetition_penalty=1e-300), "sampling.repetition_penalty=1e-300 must be a number from 0.01 to 100"),
        (dict(seed="x"), "sampling.seed='x' must be an integer from 0 to 2**64 - 1"),
        (dict(seed=2**64), f"sampling.seed={2**64} must be an integer from 0 to 2**64 - 1"),
        (dict(seed=-1), "sampling.seed=-1 must be an integer from 0 to 2**64 - 1"),
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


# --- Text in, text out: model directories, stop strings, batches, the command line ---





@pytest.fixture
def model_dir(tmp_path):
    return make_model_dir(tmp_path / "model")


def test_stop_string_ends_the_text_before_it(model_dir):
    from lmforge.inference.generation import complete
    from lmforge.model.directory import load_model_dir

    loaded = load_model_dir(model_dir)
    greedy = SamplingConfig(max_new_tokens=40, temperature=0.0)
    full = complete(loaded, "the king", greedy)
    assert len(full) >= 12
    stop = full[5:8]  # a string the greedy continuation produces
    assert complete(loaded, "the king", greedy, stop=[stop]) == full[: full.index(stop)]
    assert complete(loaded, "the king", greedy, stop=["never produced \u2603"]) == full


def test_samples_of_one_batch_differ_and_repeat_with_the_seed(model_dir):
    from lmforge.inference.generation import complete_samples
    from lmforge.model.directory import load_model_dir

    loaded = load_model_dir(model_dir)
    cfg = SamplingConfig(max_new_tokens=30, seed=5)
    first = complete_samples(loaded, "good", cfg, num_samples=3)
    assert len(first) == 3 and len(set(first)) == 3
    assert complete_samples(loaded, "good", cfg, num_samples=3) == first
    greedy = SamplingConfig(max_new_tokens=30, temperature=0.0)
    assert len(set(complete_samples(loaded, "good", greedy, num_samples=3))) == 1


def test_text_tail_holds_back_partial_stop_strings_and_incomplete_characters():
    from lmforge.inference.generation import _TextTail
    from lmforge.tokenization.vocab import build_tokenizer

    tokenizer = build_tokenizer({"kind": "bpe", "vocab_size": 300, "min_frequency": 1,
                                 "special_tokens": ["<|endoftext|>"]}, ["plain text"])
    ids = tokenizer.encode("ab\u00e9XYcd", add_special_tokens=False).ids  # é is two bytes, two tokens
    tail = _TextTail(tokenizer, eot_id=0, stop=["XYZ"])
    pieces = [tail.push(i) for i in ids]
    assert "".join(pieces) + tail.finish() == "ab\u00e9XYcd"
    assert all("\ufffd" not in p for p in pieces)
    after_x = ids.index(tokenizer.token_to_id("X")) + 1
    assert "".join(pieces[:after_x]) == "ab"  # "\u00e9X" could still begin "XYZ": held back
    tail = _TextTail(tokenizer, eot_id=0, stop=["XY"])
    assert "".join(tail.push(i) for i in ids) == "ab\u00e9" and tail.done




def test_generate_command_streams_and_batches_samples(model_dir, capsys):
    from lmforge.inference.generation import complete, complete_samples
    from lmforge.model.directory import load_model_dir

    loaded = load_model_dir(model_dir)
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=20, seed=3)
    base = ["generate", "--model", model_dir, "--prompt", "the", "--max-new-tokens", 20, "--temperature", 1.0,
            "--top-k", 20, "--seed", 3]
    code, out, err = run_cli(base, capsys)
    assert code == 0 and out == "the" + complete(loaded, "the", cfg) + "\n"
    code, out, _ = run_cli([*base, "--num-samples", 3], capsys)
    samples = complete_samples(loaded, "the", cfg, num_samples=3)
    assert code == 0 and out == "".join(f"--- sample {i + 1} ---\nthe{s}\n" for i, s in enumerate(samples))


def test_interactive_loop_survives_a_bad_prompt(model_dir, capsys, monkeypatch):
    answers = iter(["the", "fair \u00e9", "good", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    code, out, err = run_cli(["generate", "--model", model_dir, "--interactive", "--max-new-tokens", 5,
                              "--temperature", 0], capsys)
    assert code == 0
    assert out.startswith("the") and "\ngood" in out
    assert "error: the prompt has characters outside the model's vocabulary ('\u00e9')" in err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--top-p", "1.5"], "error: sampling.top_p=1.5 must be in (0, 1] or null."),
        (["--top-p", "0"], "error: sampling.top_p=0.0 must be in (0, 1] or null."),
        (["--temperature", "-1"], "error: sampling.temperature=-1.0 must be a finite number >= 0 (0 means greedy)."),
        (["--temperature", "nan"], "error: sampling.temperature=nan must be a finite number >= 0 (0 means greedy)."),
        (["--max-new-tokens", "0"], "error: sampling.max_new_tokens=0 must be an integer >= 1."),
        (["--num-samples", "0"], "error: --num-samples 0 must be at least 1."),
        (["--prompt", "caf\u00e9 \u2603"], "error: the prompt has characters outside the model's vocabulary"),
    ],
)
def test_generate_command_rejects_bad_input_in_one_line(model_dir, capsys, options, message):
    code, out, err = run_cli(["generate", "--model", model_dir, "--prompt", "the", *options], capsys)
    assert code == 1
    assert err.startswith(message) and err.count("\n") == 1


@pytest.mark.parametrize("damage", ["missing config", "missing weights", "truncated weights", "garbage weights"])
def test_broken_model_directory_is_one_clear_line(model_dir, capsys, damage):
    weights = model_dir / "model.safetensors"
    if damage == "missing config":
        (model_dir / "config.json").unlink()
        expected = f"error: {model_dir / 'config.json'} is missing"
    elif damage == "missing weights":
        weights.unlink()
        expected = f"error: {weights} is missing"
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = f"error: {weights} is corrupt or truncated"
    else:
        weights.write_bytes(b"\x00" * 64)
        expected = f"error: {weights} is corrupt or truncated"
    code, out, err = run_cli(["generate", "--model", model_dir, "--prompt", "the"], capsys)
    assert code == 1 and out == ""
    assert err.startswith(expected) and err.count("\n") == 1




@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_incremental_decoding_equals_decoding_the_whole_sample(kind):
    import random

    from lmforge.inference.generation import _TextTail
    from lmforge.tokenization.tokenizer import DEFAULT_SPECIAL_TOKENS
    from lmforge.tokenization.vocab import build_tokenizer

    text = CHAR_TEXT * 3 + "caf\u00e9, na\u00efve \u2603 \u65e5\u672c\n"
    tokenizer = build_tokenizer({"kind": kind, "special_tokens": DEFAULT_SPECIAL_TOKENS[kind], "vocab_size": 400,
                                 "min_frequency": 1}, [text])
    rng = random.Random(0)
    samples = [tokenizer.encode(text, add_special_tokens=False).ids]
    samples += [[rng.randrange(tokenizer.get_vocab_size()) for _ in range(40)] for _ in range(30)]  # any ids
    for ids in samples:
        ids = [i for i in ids if i != 0]  # 0 plays the end-of-text token here
        tail = _TextTail(tokenizer, eot_id=0, stop=[])
        assert "".join(tail.push(i) for i in ids) + tail.finish() == tokenizer.decode(ids, skip_special_tokens=False)


def test_unescape_reads_escapes_and_keeps_non_ascii():
    from lmforge.inference.generation import unescape

    assert unescape("\\n\\n") == "\n\n"
    assert unescape("caf\u00e9\\t\u20ac\\u00e9") == "caf\u00e9\t\u20ac\u00e9"  # é stays é, not Ã©


def test_stop_option_takes_backslash_escapes(model_dir, capsys):
    # README: `lmforge generate ... --stop "\n\n"`: the shell passes a backslash and an n.
    from lmforge.inference.generation import complete, unescape
    from lmforge.model.directory import load_model_dir

    loaded = load_model_dir(model_dir)
    greedy = SamplingConfig(max_new_tokens=60, temperature=0)
    full = complete(loaded, "the", greedy)
    stop = full.index(full[3])  # where a character the greedy continuation produces first appears
    typed = f"\\u{ord(full[3]):04x}"  # typed as an escape, as `--stop "\n"` is
    code, out, _ = run_cli(["generate", "--model", model_dir, "--prompt", "the", "--max-new-tokens", 60,
                            "--temperature", 0, "--stop", typed], capsys)
    assert code == 0 and out == "the" + full[:stop] + "\n"
    assert unescape("\\n\\n") == "\n\n"


def test_interactive_escapes_keep_non_ascii(model_dir, capsys, monkeypatch):
    answers = iter(["fair \u00e9", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    code, _, err = run_cli(["generate", "--model", model_dir, "--interactive", "--escapes", "--max-new-tokens", 5],
                           capsys)
    assert code == 0 and "('\u00e9')" in err  # the character itself was refused, not 'Ã©'
