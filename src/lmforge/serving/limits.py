"""Every limit of ``lmforge serve``: its default, its flag, and the check of a prompt's size.

Each limit is a flag of ``lmforge serve`` (``--max-body-bytes`` for ``max_body_bytes``, and so on)
and each refusal is an OpenAI-shaped error naming the limit and its flag:

========================  ==========================================  ================================
limit                     default                                     refusal
========================  ==========================================  ================================
max_body_bytes            4 MiB                                       413 before the body is read
max_prompt_tokens         4 x block_size                              400 ``context_length_exceeded``
max_prompt_chars          max_prompt_tokens x the longest token's     400 before the prompt is tokenized
                          characters x 2
max_tokens                block_size (the model's context)            400 naming ``max_tokens``
max_n                     8 (never above --max-batch)                 400 naming ``n`` / ``best_of``
max_prompts               32 prompts in one request                   400 naming ``prompt``
max_queue                 128 requests waiting for slots              503 with ``Retry-After``
queue_timeout             30 s waiting for a slot                     503 with ``Retry-After``
header_timeout            10 s to send the request line and headers   connection closed
body_timeout              30 s to send the body                       408, connection closed
max_connections           1000 open connections                       503 (uvicorn's limit_concurrency)
========================  ==========================================  ================================

Why characters first: a prompt cannot have fewer tokens than its characters divided by the most
characters one token spells, so a prompt over ``max_prompt_chars`` is over ``max_prompt_tokens``
(the factor 2 leaves room for normalisation) and is refused without tokenizing it: a 10 MB prompt
costs a length check, not 10 s of a tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError

DEFAULT_MAX_BODY_BYTES = 4 * 2**20


@dataclass
class Limits:
    """The limits one server enforces (``for_model`` fills the defaults that depend on the model)."""

    max_prompt_tokens: int
    max_prompt_chars: int
    max_tokens: int
    max_n: int = 8
    max_prompts: int = 32
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = 128
    queue_timeout: float = 30.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1000

    @classmethod
    def for_model(cls, loaded, max_batch: int, **given) -> Limits:
        """The limits for ``loaded`` (a ModelDir) served with ``max_batch`` slots; ``given``: flags set
        (None: the default). Raises LmforgeError naming the flag of a value below its minimum."""
        given = {k: v for k, v in given.items() if v is not None}
        for name, value in given.items():
            if value <= 0:
                raise LmforgeError(f"--{name.replace('_', '-')} {value} must be above 0.")
        block_size = loaded.model.config.block_size
        prompt_tokens = given.pop("max_prompt_tokens", 4 * block_size)
        chars = given.pop("max_prompt_chars", prompt_tokens * longest_token_chars(loaded.tokenizer) * 2)
        limits = cls(max_prompt_tokens=prompt_tokens, max_prompt_chars=chars,
                     max_tokens=given.pop("max_tokens", block_size), **given)
        limits.max_n = min(limits.max_n, max_batch)
        return limits


def longest_token_chars(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` spells (a byte-level token's vocabulary entry has
    one character per byte, at least as many as the text it decodes to)."""
    return max((len(token) for token in tokenizer.get_vocab(with_added_tokens=True)), default=1)
