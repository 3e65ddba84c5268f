"""The OpenAI HTTP API's answers: choices, stream chunks, logprobs blocks and usage, as JSON-ready dicts.

Choice indexes are numbered as OpenAI numbers them: prompt-major, then sample (prompt ``p``'s
sample ``i`` of ``n`` is choice ``p * n + i``). Completion logprobs are the legacy block
(``tokens``, ``token_logprobs``, ``top_logprobs`` as one {token: logprob} object per token,
``text_offset``); with ``echo`` the prompt's tokens come first, the first of them with null
logprob and alternatives. Chat logprobs are ``{"content": [{token, logprob, bytes, top_logprobs}]}``.
"""

from __future__ import annotations

import time
import uuid


def new_id(kind: str) -> str:
    """An answer id: ``cmpl-...`` or ``chatcmpl-...``."""
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenTexts:
    """Each token id's own text (decoded alone), remembered: logprobs name every token."""

    def __init__(self, tokenizer):
        self.tokenizer, self.known = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        text = self.known.get(token_id)
        if text is None:
            text = self.known[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def logprobs_block(kind: str, texts: TokenTexts, ids: list[int], logprobs: list, tops: list | None,
                   offset: int = 0) -> dict:
    """The ``logprobs`` of a choice or chunk: tokens ``ids`` with their ``logprobs`` (None for an echoed
    first token) and, per token, the alternatives ``tops`` ((id, logprob) lists, or None: none asked).
    ``offset``: where the first token's text starts in the choice's text (completions)."""
    tokens = [texts(i) for i in ids]
    if kind == "chat":
        return {"content": [
            {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
             "top_logprobs": [{"token": texts(i), "logprob": v, "bytes": list(texts(i).encode("utf-8"))}
                              for i, v in (tops[k] or [])] if tops else []}
            for k, (t, lp) in enumerate(zip(tokens, logprobs))]}
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top_logprobs = None
    if tops is not None:
        top_logprobs = [None if top is None else {texts(i): v for i, v in top} for top in tops]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def choice(kind: str, index: int, text: str, finish_reason: str | None, logprobs: dict | None,
           chunk: bool = False) -> dict:
    """One entry of ``choices``: of an answer, or (``chunk``) of a stream chunk."""
    if kind == "completion":
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if chunk:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def envelope(kind: str, answer_id: str, model: str, choices: list[dict], chunk: bool = False,
             extra: dict | None = None) -> dict:
    """An answer or a stream chunk around ``choices``."""
    if kind == "completion":
        obj = "text_completion"
    else:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    out = {"id": answer_id, "object": obj, "created": int(time.time()), "model": model,
           "system_fingerprint": None, "choices": choices}
    if extra:
        out.update(extra)
    return out
