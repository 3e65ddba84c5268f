"""A GPT's settings: ``GPTConfig``, checked as it is read, and the checks settings share.

``GPTConfig`` holds the hyperparameters ``lmforge.model.gpt`` builds a GPT from (GPT-2 defaults,
Llama-style options) and validates them: the range of each number by ``lmforge.config.rules``'s
table (the one ``lmforge check`` uses), the rules between settings here. The model's layers live in
``lmforge.model.gpt``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from lmforge.config.checks import vocabulary
from lmforge.config.rules import problem
from lmforge.errors import ConfigError, LmforgeError

Positions = Literal["learned", "sinusoidal", "rope"]
Norm = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "gelu_tanh", "swiglu", "relu2"]


@dataclass
class GPTConfig:
    """Hyperparameters of a GPT. Defaults are a small GPT-2; ``lmforge.model.gpt`` says which options give Llama."""

    vocab_size: int
    block_size: int = 64  # context length: the most tokens the model attends over
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: int | None = None  # grouped-query attention (Ainslie et al. 2023); None: n_head
    dropout: float = 0.0
    bias: bool = True  # bias in Linear layers and LayerNorm (RMSNorm never has one)
    positions: Positions = "learned"
    rope_theta: float = 10000.0
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    mlp: MLPKind = "gelu"  # "gelu": exact (erf) GELU; "gelu_tanh": GPT-2's approximation; "swiglu": Shazeer 2020
    mlp_hidden: int | None = None  # None: see mlp_hidden_size
    tie_embeddings: bool = True  # lm_head shares wte's weight (Press & Wolf 2017)
    qk_norm: bool = False  # RMSNorm (with a gain) on each query and key head before the rotation
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap); None: no cap
    zero_init_residual: bool = False  # the projections into the residual stream start at zero

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads: ``n_kv_head``, or ``n_head`` (plain multi-head) when None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_hidden_size(self) -> int:
        """Width of the MLP's hidden layer.

        ``mlp_hidden`` when set; otherwise 4 * n_embd for GELU, and for SwiGLU Llama's rule:
        2/3 of 4 * n_embd (keeping the parameter count of the 4x GELU MLP, as SwiGLU has three
        matrices), rounded up to a multiple of 32. n_embd=128 gives 352, n_embd=768 gives 2048.
        """
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp != "swiglu":
            return 4 * self.n_embd
        multiple_of = 32
        hidden = int(2 * 4 * self.n_embd / 3)
        return multiple_of * ((hidden + multiple_of - 1) // multiple_of)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GPTConfig:
        """Build and validate a config from a mapping (e.g. the ``model`` section of params.yaml).

        Raises ConfigError (a ValueError) naming an unknown key, a missing vocab_size, or a bad value.
        """
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise ConfigError(f"model.{key} is not a model setting; known settings: {', '.join(known)}.")
        if "vocab_size" not in d:
            raise ConfigError("model.vocab_size is missing; set it to the tokenizer's vocabulary size.")
        config = cls(**dict(d))
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict; ``GPTConfig.from_dict(c.to_dict()) == c``."""
        return asdict(self)

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) with one sentence naming the first bad setting."""

        def fail(name: str, requirement: str) -> None:
            raise ConfigError(f"model.{name}={getattr(self, name)!r} {requirement}.")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "dropout",
                     "rope_theta", "norm_eps", "mlp_hidden", "logit_softcap"):
            found = problem(f"model.{name}", getattr(self, name))  # the range table of every setting
            if found:
                raise ConfigError(found)
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            fail("n_kv_head", f"must divide model.n_head={self.n_head}")
        if self.n_embd % self.n_head:
            fail("n_embd", f"must be divisible by model.n_head={self.n_head}")
        for name, kind in (("positions", Positions), ("norm", Norm), ("mlp", MLPKind)):
            if getattr(self, name) not in get_args(kind):
                fail(name, f"is not one of {', '.join(get_args(kind))}")
        if self.positions == "rope" and self.head_dim % 2:
            fail("n_embd", f"must give an even head size (n_embd / n_head) for rope, not {self.head_dim}")
        for name in ("bias", "tie_embeddings", "qk_norm", "zero_init_residual"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")


def check_model(cfg) -> None:
    """The ``model`` settings of a composed config make a model (``GPTConfig.validate``) at the
    vocabulary size the checks assume (``config.checks.vocabulary``)."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg.model, resolve=True)
    config["vocab_size"] = vocabulary(cfg)[0]
    try:
        GPTConfig.from_dict(config).validate()
    except (ValueError, TypeError) as err:
        raise LmforgeError(str(err).rstrip(".").replace("config.", "model.") + ".") from None
