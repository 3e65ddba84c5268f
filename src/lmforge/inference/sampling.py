"""Sampling settings and the sampler: the one place a setting is read, checked and applied.

``sampling_config(values, prefix, names)`` is the one parser of sampling settings: ``lmforge
generate``'s options, the evaluate stage and ``lmforge check`` (``evaluate.*``), the MLflow pyfunc's
params and the OpenAI API's fields all go through it, each naming its keys its own way (the
``prefix`` and ``names`` arguments) in the one sentence a bad value raises.

The ranges, and what keeps the sampler finite whatever the values. Every number must be finite
(NaN and infinities are refused). ``temperature`` >= 0; below ``GREEDY_BELOW`` it samples greedily,
as 0 does (a float32 logit divided by 1e-300 is infinite). ``top_k`` >= 1. ``top_p`` in (0, 1];
the most likely token is always kept, so a tiny ``top_p`` is greedy. ``repetition_penalty`` from
0.01 to 100 (1: none). ``presence_penalty`` and ``frequency_penalty`` from -2 to 2 (OpenAI's
range). ``logit_bias``: token id -> a bias from -100 to 100 (OpenAI's). ``seed`` from 0 to
2**64 - 1 (what a torch.Generator takes). Logits are shifted so that their largest is 0 before
the temperature divides them, so a small temperature cannot overflow them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.config.values import is_int, is_number
from lmforge.errors import ConfigError

GREEDY_BELOW = 1e-5  # a temperature under this samples greedily
SEED_MAX = 2**64 - 1
LOGIT_BIAS_MAX = 100.0


class SamplingError(ConfigError):
    """A sampling setting out of range; ``key`` is the setting as its caller names it."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


@dataclass
class SamplingConfig:
    """How to pick tokens. ``validate`` checks the ranges (the module docstring lists them)."""

    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # nucleus: keep the fewest tokens whose probability reaches top_p, in (0, 1]
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019); > 1 discourages tokens already present
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from a token the sample has produced
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time the sample has produced the token
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    seed: int | None = None  # None: draw from torch's global generator
    use_cache: bool = True

    def validate(self, prefix: str = "sampling.", names: Mapping[str, str] | None = None) -> None:
        """Raise SamplingError (a ConfigError, a ValueError): one sentence naming the first bad setting
        as ``prefix`` + its name (``names`` maps a field to the caller's name for it)."""
        for name, requirement in _problems(self):
            key = (names or {}).get(name, name)
            raise SamplingError(f"{prefix}{key}={getattr(self, name)!r} {requirement}.", key)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def _problems(c: SamplingConfig):
    """(field, requirement) of each bad setting of ``c``, in field order."""
    if not is_int(c.max_new_tokens) or c.max_new_tokens < 1:
        yield "max_new_tokens", "must be an integer >= 1"
    if not _finite(c.temperature) or c.temperature < 0:
        yield "temperature", "must be a finite number >= 0 (0 means greedy)"
    if c.top_k is not None and (not is_int(c.top_k) or c.top_k < 1):
        yield "top_k", "must be an integer >= 1 or null"
    if c.top_p is not None and (not _finite(c.top_p) or not 0 < c.top_p <= 1):
        yield "top_p", "must be in (0, 1] or null"
    if not _finite(c.repetition_penalty) or not 0.01 <= c.repetition_penalty <= 100:
        yield "repetition_penalty", "must be a number from 0.01 to 100 (1 means no penalty)"
    for name in ("presence_penalty", "frequency_penalty"):
        if not _finite(getattr(c, name)) or not -2 <= getattr(c, name) <= 2:
            yield name, "must be a number from -2 to 2"
    if c.logit_bias is not None and not _good_bias(c.logit_bias):
        yield "logit_bias", f"must map token ids (integers >= 0) to numbers from -{LOGIT_BIAS_MAX:g} to " \
                            f"{LOGIT_BIAS_MAX:g}"
    if c.seed is not None and (not is_int(c.seed) or not 0 <= c.seed <= SEED_MAX):
        yield "seed", "must be an integer from 0 to 2**64 - 1, or null"
    if not isinstance(c.use_cache, bool):
        yield "use_cache", "must be true or false"


def _good_bias(bias) -> bool:
    return isinstance(bias, dict) and all(
        is_int(k) and k >= 0 and _finite(v) and abs(v) <= LOGIT_BIAS_MAX for k, v in bias.items())


FIELDS = tuple(f.name for f in fields(SamplingConfig))


def sampling_config(values: Mapping[str, Any], prefix: str = "sampling.",
                    names: Mapping[str, str] | None = None) -> SamplingConfig:
    """A validated SamplingConfig from ``values`` (SamplingConfig's field names; None or missing:
    the default). A bad value raises SamplingError naming it as ``prefix`` + ``names.get(field, field)``;
    an unknown key raises one naming that key."""
    for key in values:
        if key not in FIELDS:
            raise SamplingError(f"{prefix}{key} is not a sampling setting; the settings are {', '.join(FIELDS)}.", key)
    config = SamplingConfig(**{k: v for k, v in values.items() if v is not None})
    config.validate(prefix, names)
    return config


# --- The sampler ---------------------------------------------------------------------------------


def sample_next(
    logits: Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    previous: Tensor | None = None,
    generated: Tensor | None = None,
) -> Tensor:
    """Pick the next token of each sequence.

    logits: (B, vocab_size) for the last position. previous: (B, T) tokens so far, used by the
    repetition penalty; generated: (B, G) the sample's own tokens so far, used by the presence
    and frequency penalties. generator: the torch.Generator to draw from (None: the global one).
    Returns (B, 1) token ids. ``logits`` is not modified. In order: logit bias, repetition
    penalty, presence and frequency penalties, temperature, top-k, top-p, a draw.
    """
    logits = adjusted_logits(logits, cfg, previous, generated)
    if cfg.greedy:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(probabilities(logits, cfg), num_samples=1, generator=generator)


def probabilities(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """The distribution (B, vocab_size) that ``sample_next`` draws from, given adjusted logits (B, vocab_size)
    and a sampling (not greedy) ``cfg``: temperature, top-k, top-p. Row by row, so rows of several
    sequences with the same settings can share one call (the serving engine's batch does)."""
    # Shifted so the largest logit is 0: a small temperature then cannot overflow to inf.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.size(-1):
        logits = _keep_top_k(logits, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        logits = _keep_top_p(logits, cfg.top_p)
    return F.softmax(logits, dim=-1)


def adjusted_logits(logits: Tensor, cfg: SamplingConfig, previous: Tensor | None = None,
                    generated: Tensor | None = None) -> Tensor:
    """``logits`` (float32, a copy) after the logit bias and the repetition, presence and frequency penalties."""
    logits = logits.float()
    if cfg.logit_bias:
        ids = torch.tensor(list(cfg.logit_bias), device=logits.device)
        bias = torch.tensor(list(cfg.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        logits = logits.index_add(-1, ids, bias.expand(logits.size(0), -1))
    if cfg.repetition_penalty != 1.0 and previous is not None and previous.numel():
        logits = _penalise_repeats(logits, previous, cfg.repetition_penalty)
    if (cfg.presence_penalty or cfg.frequency_penalty) and generated is not None and generated.numel():
        counts = torch.zeros_like(logits).scatter_add_(-1, generated, torch.ones_like(generated, dtype=logits.dtype))
        logits = logits - cfg.frequency_penalty * counts - cfg.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _penalise_repeats(logits: Tensor, previous: Tensor, penalty: float) -> Tensor:
    # CTRL: a token already present has its logit divided by the penalty when positive and
    # multiplied when negative, so penalty > 1 always makes it less likely (as HF does).
    seen = logits.gather(-1, previous)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, previous, seen)


def _keep_top_k(logits: Tensor, k: int) -> Tensor:
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _keep_top_p(logits: Tensor, top_p: float) -> Tensor:
    # Holtzman et al. 2019: keep the most likely tokens until their probability reaches top_p.
    # A token is dropped when the tokens before it already reach top_p; the top one always stays
    # (a top_p too small for float32, 1e-300, would otherwise drop every token).
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


# --- The evaluate stage's samples ----------------------------------------------------------------

EVALUATE_SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")


def evaluate_sampling(cfg) -> SamplingConfig:
    """The evaluate stage's sampling settings (``evaluate.*`` of a composed config), validated."""
    return sampling_config({name: cfg.evaluate.get(name) for name in EVALUATE_SETTINGS}, prefix="evaluate.")


def check_sampling(cfg) -> None:
    """``lmforge check``: the evaluate stage's sampling settings are in range (a SamplingError names the key)."""
    evaluate_sampling(cfg)
