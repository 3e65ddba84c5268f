"""Sampling text from a GPT, one token at a time, with a KV cache.

Each step turns the last position's logits into a token with ``lmforge.inference.sampling``'s
sampler (penalties, temperature, top-k, top-p, a draw; argmax when greedy). ``generate_tokens``
yields the tokens as they come, for streaming; ``generate`` collects them.

The context window. The model attends over at most ``block_size`` tokens, so the tokens it
sees (the window) are a suffix of the sequence, chosen by one rule whether or not the cache is
used, so ``use_cache`` changes the speed and never the tokens:

* A prompt longer than ``block_size`` is cropped to its last ``block_size`` tokens.
* When a new token would make the window longer than ``block_size``, the window restarts as
  the last ``block_size // 2`` tokens (the new one included). With the cache that is a fresh
  prefill of those tokens: positions restart at 0, which suits every position scheme, and the
  re-encode happens once every ``block_size // 2`` tokens instead of at every step.
* Without the cache each step runs the model on the whole current window.

(nanoGPT instead slides the window by one token per step; that would force the cached path to
re-encode at every step once the window is full.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from lmforge.config.values import is_int
from lmforge.errors import LmforgeError
from lmforge.inference.sampling import SamplingConfig, sample_next
from lmforge.model.gpt import GPT
from lmforge.tokenization.tokenizer import UNK_TOKEN

# SamplingConfig and sample_next live in lmforge.inference.sampling; imported here also for the
# callers that take them from this module (``from lmforge.inference.generation import SamplingConfig``).
__all__ = ["SamplingConfig", "sample_next", "generate_tokens", "generate", "encode_prompt", "TextTail",
           "stream_samples", "stream_ids", "complete", "complete_samples", "unescape"]


def unescape(text: str) -> str:
    """Backslash escapes typed on a command line (``\\n``, ``\\t``, ``\\u00e9``) as the characters
    they name; every other character, non-ASCII included, stays as it is (``é`` stays ``é``:
    ``unicode_escape`` alone would read its UTF-8 bytes as Latin-1)."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


# inference_mode rather than no_grad: no version counters or views are tracked, so each token costs less.
@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompt: Tensor,
    cfg: SamplingConfig,
    stop: Callable[[Tensor], bool] | None = None,
) -> Iterator[Tensor]:
    """Yield new tokens one step at a time: each a (B, 1) tensor of token ids, as soon as sampled.

    model: a GPT. prompt: (B, T) token ids, B prompts of equal length, T >= 1 (moved to the
    model's device). cfg: validated here. stop: called after each token with the (B, T + n)
    sequence so far (prompt included; a view, do not modify it); generation ends once it
    returns True, after that token was yielded. At most ``cfg.max_new_tokens`` tokens.

    The context window rule is in the module docstring. The model is put in eval mode while
    sampling and its previous mode is restored when the iterator finishes or is closed.
    Equal ``cfg.seed`` gives equal tokens on the same device. The tokens are inference-mode
    tensors: read them, copy them, but do not modify them in place.
    """
    cfg.validate()
    if prompt.dim() != 2 or prompt.size(1) == 0:
        raise ValueError(
            f"prompt must be a (batch, length) tensor of token ids with length >= 1, not shape {tuple(prompt.shape)}."
        )
    block_size = model.config.block_size
    restart = max(1, block_size // 2)  # window length after a restart
    device = model.transformer.wte.weight.device
    batch, prompt_len = prompt.shape

    # Every token so far, in one preallocated buffer: the window, the repetition penalty and
    # ``stop`` read views of it, so a step concatenates nothing.
    tokens = torch.empty(batch, prompt_len + cfg.max_new_tokens, dtype=torch.long, device=device)
    tokens[:, :prompt_len] = prompt
    n = prompt_len  # tokens so far
    start = max(0, n - block_size)  # the window is tokens[:, start:n]
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)

    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(batch) if cfg.use_cache else None
        logits = model(tokens[:, start:n], cache=cache)[0][:, -1]
        for step in range(cfg.max_new_tokens):
            next_token = sample_next(logits, cfg, generator, tokens[:, :n], tokens[:, prompt_len:n])
            tokens[:, n : n + 1] = next_token
            n += 1
            yield next_token
            if step == cfg.max_new_tokens - 1 or (stop is not None and stop(tokens[:, :n])):
                return
            if n - start > block_size:  # the window is full: restart it
                start = n - restart
                if cache is not None:
                    cache.reset()
            if cache is not None and cache.length > 0:  # the cache holds the window but the new token
                logits = model(next_token, cache=cache)[0][:, -1]
            else:  # encode the whole window (into the cache, when it was just reset)
                logits = model(tokens[:, start:n], cache=cache)[0][:, -1]
    finally:
        model.train(was_training)


def generate(
    model: GPT,
    prompt: Tensor,
    cfg: SamplingConfig,
    stop: Callable[[Tensor], bool] | None = None,
) -> Tensor:
    """Sample a continuation of each prompt; returns (B, T + new) token ids, the prompt first.

    Same arguments as ``generate_tokens``; new <= cfg.max_new_tokens (fewer when ``stop`` fired).
    """
    new = list(generate_tokens(model, prompt, cfg, stop))
    return torch.cat([prompt.to(new[0].device), *new], dim=1)


# --- Text in, text out: what `lmforge generate`, the evaluate stage's samples and serving use. ---


def encode_prompt(loaded, prompt: str) -> Tensor:
    """Encode ``prompt`` for a loaded model directory as a (1, T) id tensor.

    An empty prompt starts from the end-of-text token. A character model refuses characters
    outside its training alphabet (they would silently become ``<unk>``) with a LmforgeError.
    """
    ids = loaded.tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
    refuse_unknown(loaded, prompt, ids)
    if not ids:
        ids = [loaded.eot_id]
    return torch.tensor([ids], dtype=torch.long, device=next(loaded.model.parameters()).device)


def refuse_unknown(loaded, text: str, ids: list[int]) -> None:
    """LmforgeError when a character model's ``ids`` of ``text`` hold ``<unk>``: characters outside its
    training alphabet would silently become it."""
    tokenizer = loaded.tokenizer
    unk = tokenizer.token_to_id(UNK_TOKEN)
    if loaded.config["tokenizer"].get("kind") == "char" and unk is not None and unk in ids:
        unknown = sorted({c for c in text if tokenizer.encode(c, add_special_tokens=False).ids == [unk]})
        if not unknown:  # a chat template's own characters, not the user's
            return
        raise LmforgeError(
            f"the prompt has characters outside the model's vocabulary ({', '.join(map(repr, unknown))}); "
            "a character model knows only its training alphabet, so remove or replace them."
        )


class _TextTail:
    """The text of one sample's new tokens, handed out in pieces as soon as each is final.

    Decoding is incremental: each step decodes only the tokens since the previous step plus those
    of the step before as context (what makes a word tokenizer's joining space or a multi-byte
    character come out right), so a long sample costs no more per token than a short one. A
    piece is held back while it ends in an incomplete UTF-8 character (byte-level BPE) or could
    still grow into one of the ``stop`` strings. The sample ends at the end-of-text token or at a
    stop string, which is not handed out.
    """

    def __init__(self, tokenizer, eot_id: int | Iterable[int], stop: list[str]):
        self.tokenizer = tokenizer
        # The end-of-text id, or several (a chat template's end of turn too: lmforge.inference.chat).
        self.stop_ids = {eot_id} if isinstance(eot_id, int) else set(eot_id)
        self.stop = stop
        self.hold = max((len(s) - 1 for s in stop), default=0)
        self.ids: list[int] = []
        self.context = 0  # ids[context:read] are decoded already, as left context for the next step
        self.read = 0
        self.text = ""  # the decoded text so far
        self.emitted = 0  # characters handed out so far
        self.done = False

    def push(self, token_id: int) -> str:
        """Take the next token; return the text that became final ('' when none, or once done)."""
        if self.done:
            return ""
        if token_id in self.stop_ids:
            return self.finish()
        self.ids.append(token_id)
        before = self._decode(self.ids[self.context : self.read])
        after = self._decode(self.ids[self.context :])
        if after.endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        searched = max(0, len(self.text) - self.hold)  # earlier text was searched already
        self.text += after[len(before) :]
        self.context, self.read = self.read, len(self.ids)
        hit = min((i for i in (self.text.find(s, searched) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            self.done = True
            return self._emit(hit)
        return self._emit(len(self.text) - self.hold)

    def finish(self) -> str:
        """End the sample; return whatever text was still held back."""
        if self.done:
            return ""
        self.done = True
        if self.read < len(self.ids):  # an incomplete character at the very end
            before = self._decode(self.ids[self.context : self.read])
            self.text += self._decode(self.ids[self.context :])[len(before) :]
        return self._emit(len(self.text))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece


TextTail = _TextTail  # the public name, for the serving engine (lmforge.batching)


def stream_samples(loaded, prompt: str, cfg: SamplingConfig, stop: list[str] | None = None,
                   num_samples: int = 1) -> Iterator[tuple[int, str]]:
    """Sample ``num_samples`` continuations of ``prompt`` as one batch; yield ``(sample, piece)``.

    ``sample`` is the index of the continuation (0 .. num_samples - 1) and ``piece`` the text
    that became final for it, as soon as it did. A sample ends at ``cfg.max_new_tokens``, at the
    end-of-text token, or at the first of the ``stop`` strings (not yielded); the batch runs
    until every sample has ended. With ``cfg.seed`` set the whole batch is reproducible, and the
    samples of one batch differ from each other. Bad settings and unencodable prompts raise
    LmforgeError here, before anything is yielded.
    """
    if not is_int(num_samples) or num_samples < 1:
        raise LmforgeError(f"num_samples={num_samples!r} must be an integer >= 1.")
    cfg.validate()
    idx = encode_prompt(loaded, prompt).expand(num_samples, -1)
    stop = [s for s in (stop or []) if s]
    return _stream_samples(loaded, idx, cfg, stop)


def _stream_samples(loaded, idx: Tensor, cfg: SamplingConfig, stop: list[str],
                    stop_ids: Iterable[int] | None = None) -> Iterator[tuple[int, str]]:
    stop_ids = list(stop_ids) if stop_ids is not None else [loaded.eot_id]
    tails = [_TextTail(loaded.tokenizer, stop_ids, stop) for _ in range(idx.size(0))]

    def all_done(_tokens: Tensor) -> bool:
        return all(tail.done for tail in tails)

    for token in generate_tokens(loaded.model, idx, cfg, stop=all_done):
        for sample, (token_id, tail) in enumerate(zip(token[:, 0].tolist(), tails)):
            if not tail.done and (piece := tail.push(token_id)):
                yield sample, piece
    for sample, tail in enumerate(tails):
        if piece := tail.finish():
            yield sample, piece


def stream_ids(loaded, ids: list[int], cfg: SamplingConfig, stop: list[str], stop_ids: Iterable[int]) -> Iterator[str]:
    """The continuation of the token ids ``ids`` (a rendered conversation) in pieces, ending at any
    of ``stop_ids`` or ``stop`` strings; bad settings raise LmforgeError before anything is yielded."""
    cfg.validate()
    idx = torch.tensor([ids], dtype=torch.long, device=next(loaded.model.parameters()).device)
    return (piece for _, piece in _stream_samples(loaded, idx, cfg, stop, stop_ids))


def complete(loaded, prompt: str, cfg: SamplingConfig, stop: list[str] | None = None) -> str:
    """The continuation of ``prompt`` (without the prompt) as one string."""
    return complete_samples(loaded, prompt, cfg, stop)[0]


def complete_samples(loaded, prompt: str, cfg: SamplingConfig, stop: list[str] | None = None,
                     num_samples: int = 1) -> list[str]:
    """``num_samples`` continuations of ``prompt``, sampled as one batch (see ``stream_samples``)."""
    texts = [""] * num_samples
    for sample, piece in stream_samples(loaded, prompt, cfg, stop, num_samples):
        texts[sample] += piece
    return texts
