"""Tests for lmforge.inference.sampling: the one parser of sampling settings (each caller's key names),
and a sampler that stays finite at the edges of every range."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.inference.sampling import (
    GREEDY_BELOW,
    SEED_MAX,
    SamplingConfig,
    SamplingError,
    check_sampling,
    sample_next,
    sampling_config,
)


def logits(batch: int = 3, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 4


# Values at the edge of each range, or just inside it: the sampler must give a token for each.
EDGES = [dict(temperature=1e-300), dict(temperature=GREEDY_BELOW), dict(temperature=1e-30), dict(temperature=1e300),
         dict(top_p=1e-300), dict(top_p=5e-324), dict(top_p=1.0), dict(top_k=1), dict(top_k=10**30),
         dict(repetition_penalty=0.01), dict(repetition_penalty=100), dict(presence_penalty=-2, frequency_penalty=2),
         dict(presence_penalty=2, frequency_penalty=-2), dict(logit_bias={0: 100.0, 1: -100.0}),
         dict(logit_bias={i: 100.0 for i in range(50)}), dict(seed=0), dict(seed=SEED_MAX),
         dict(temperature=1e-30, top_p=1e-300, top_k=1, repetition_penalty=100)]


@pytest.mark.parametrize("values", EDGES, ids=str)
def test_the_sampler_gives_a_token_at_every_edge_of_the_ranges(values):
    cfg = sampling_config(values)
    generator = torch.Generator().manual_seed(cfg.seed or 0)
    previous = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    drawn = sample_next(logits(), cfg, generator, previous, previous[:, 6:])
    assert drawn.shape == (3, 1) and bool(((drawn >= 0) & (drawn < 50)).all())


def test_tiny_temperatures_and_top_p_are_greedy():
    greedy = logits().argmax(-1, keepdim=True)
    for values in (dict(temperature=1e-300), dict(temperature=GREEDY_BELOW / 2), dict(top_p=1e-300),
                   dict(top_p=1e-9, temperature=1.0)):
        assert torch.equal(sample_next(logits(), sampling_config(values), torch.Generator().manual_seed(0)), greedy)


def test_logit_bias_and_penalties_move_the_choice():
    row = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert sample_next(row, SamplingConfig(temperature=0, logit_bias={3: 10.0})).item() == 3
    assert sample_next(row, SamplingConfig(temperature=0, logit_bias={0: -100.0})).item() == 1
    generated = torch.tensor([[0, 0, 1]])  # token 0 twice, token 1 once
    # frequency: 3 - 2 * 1.5 = 0 and 2 - 1.5 = 0.5: token 2 (1.0) wins.
    assert sample_next(row, SamplingConfig(temperature=0, frequency_penalty=1.5), generated=generated).item() == 2
    # presence: each produced token loses 2 once: 1.0, 0.0, 1.0 (token 2 unchanged): the first maximum, token 0.
    assert sample_next(row, SamplingConfig(temperature=0, presence_penalty=2), generated=generated).item() == 0
    assert sample_next(row, SamplingConfig(temperature=0, presence_penalty=-2), generated=generated).item() == 0


@pytest.mark.parametrize("values, key, fragment", [
    (dict(temperature=math.nan), "temperature", "finite"),
    (dict(temperature=math.inf), "temperature", "finite"),
    (dict(top_p=math.nan), "top_p", "(0, 1]"),
    (dict(top_p=0), "top_p", "(0, 1]"),
    (dict(repetition_penalty=math.nan), "repetition_penalty", "0.01 to 100"),
    (dict(repetition_penalty=1e-300), "repetition_penalty", "0.01 to 100"),
    (dict(repetition_penalty=1e300), "repetition_penalty", "0.01 to 100"),
    (dict(presence_penalty=2.5), "presence_penalty", "-2 to 2"),
    (dict(frequency_penalty=-math.inf), "frequency_penalty", "-2 to 2"),
    (dict(logit_bias={0: 1e308}), "logit_bias", "-100 to 100"),
    (dict(logit_bias={0: math.nan}), "logit_bias", "-100 to 100"),
    (dict(logit_bias={-1: 1.0}), "logit_bias", "token ids"),
    (dict(seed=2**64), "seed", "2**64 - 1"),
    (dict(seed=-(2**70)), "seed", "2**64 - 1"),
    (dict(seed=1.5), "seed", "integer"),
    (dict(max_new_tokens=True), "max_new_tokens", "integer"),
    (dict(beams=4), "beams", "not a sampling setting"),
])
def test_every_hostile_value_is_refused_naming_its_key(values, key, fragment):
    with pytest.raises(SamplingError) as err:
        sampling_config(values)
    assert err.value.key == key and fragment in str(err.value) and str(err.value).startswith(f"sampling.{key}")


def test_each_caller_names_keys_its_own_way():
    with pytest.raises(SamplingError, match=r"^evaluate\.top_p=2 "):
        sampling_config({"top_p": 2}, prefix="evaluate.")
    with pytest.raises(SamplingError) as err:
        sampling_config({"max_new_tokens": 0}, prefix="", names={"max_new_tokens": "max_tokens"})
    assert err.value.key == "max_tokens" and str(err.value).startswith("max_tokens=0 must be")
    assert sampling_config({"top_k": None, "seed": 3}) == SamplingConfig(seed=3)  # None: the default


def test_the_evaluate_stage_settings_are_checked_with_their_keys():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"evaluate": {"max_new_tokens": 20, "temperature": 0.8, "top_k": None, "top_p": 2,
                                         "seed": 1}})
    with pytest.raises(ConfigError, match=r"^evaluate\.top_p=2 must be in \(0, 1\]"):
        check_sampling(cfg)
    cfg.evaluate.top_p = None
    check_sampling(cfg)
