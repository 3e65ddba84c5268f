"""Loss, perplexity and bits per byte of a model on a stream of token ids.

The loss is over the whole stream, cut into consecutive windows of ``block_size`` tokens (each
token predicted once). Bits per byte divides the total nats by ln 2 and by the UTF-8 bytes of the
text those tokens encode, so models with different tokenizers compare.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError


@torch.no_grad()
def score_tokens(model, ids: np.ndarray | object, block_size: int, batch_size: int = 64,
                 max_batches: int | None = None, device: str | torch.device = "cpu") -> dict:
    """Sum the next-token loss over ``ids`` (an array or a TokenStream) in non-overlapping windows.

    Returns ``{"nats": total, "predicted": tokens scored, "tokens": len(ids)}``; with ``max_batches``
    only the first ``max_batches * batch_size`` windows are scored.
    """
    n = len(ids)
    if n < 2:
        raise LmforgeError("the evaluation text has fewer than 2 tokens; give it more text.")
    read = ids.read if hasattr(ids, "read") else (
        lambda start, length: np.asarray(ids[start : start + length], dtype=np.int64))
    total, predicted = 0.0, 0
    model.eval()
    for chunk in _batches(list(range(0, n - 1, block_size)), batch_size, max_batches):
        lengths = [min(block_size, n - 1 - s) for s in chunk]
        x = torch.full((len(chunk), block_size), 0, dtype=torch.long)
        y = torch.full((len(chunk), block_size), -100, dtype=torch.long)
        for row, (s, length) in enumerate(zip(chunk, lengths)):
            window = torch.from_numpy(read(s, length + 1))
            x[row, :length] = window[:-1]
            y[row, :length] = window[1:]
        total += _summed_loss(model, x, y, device)
        predicted += sum(lengths)
    return {"nats": total, "predicted": predicted, "tokens": n}


@torch.no_grad()
def score_packed(model, tokens, flags, row_tokens: int, batch_size: int = 64, max_batches: int | None = None,
                 device: str | torch.device = "cpu") -> dict:
    """Sum the loss over the tokens that count (assistant / completion tokens) of every packed row of a
    split: ``tokens`` and ``flags`` are its TokenStreams, read by ``rows_to_batch`` as training reads
    them. Returns ``score_tokens``' dict, ``predicted`` being the tokens that count."""
    from lmforge.tokenization.packing import rows_to_batch

    total, predicted = 0.0, 0
    model.eval()
    for chunk in _batches(list(range(0, len(tokens) // row_tokens * row_tokens, row_tokens)), batch_size, max_batches):
        x, y, segments = rows_to_batch(np.stack([tokens.read(s, row_tokens) for s in chunk]),
                                       np.stack([flags.read(s, row_tokens) for s in chunk]))
        total += _summed_loss(model, x, y, device, segments=segments.to(device))
        predicted += int((y != -100).sum())
    return {"nats": total, "predicted": predicted, "tokens": len(tokens)}


def _batches(starts: list[int], batch_size: int, max_batches: int | None) -> Iterator[list[int]]:
    """``starts`` in batches of ``batch_size``, only the first ``max_batches`` of them when set."""
    if max_batches:
        starts = starts[: max_batches * batch_size]
    for b in range(0, len(starts), batch_size):
        yield starts[b : b + batch_size]


def _summed_loss(model, x: torch.Tensor, y: torch.Tensor, device, **forward) -> float:
    """The summed cross-entropy of ``model`` on inputs ``x`` over the targets ``y`` that count (-100: none)."""
    logits, _ = model(x.to(device), **forward)
    return float(F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.to(device).view(-1),
                                 ignore_index=-100, reduction="sum"))


def summarise(score: dict, text_bytes: int) -> dict:
    """Loss, perplexity and bits per byte from a ``score_tokens`` result and the text's byte count;
    ``tokens`` and ``bytes`` are the whole text's, ``tokens_scored`` those predicted."""
    loss = score["nats"] / score["predicted"]
    # Scale the bytes to the tokens actually predicted (all but the first, or a capped subset).
    covered_bytes = text_bytes * score["predicted"] / max(1, score["tokens"] - 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": score["nats"] / math.log(2) / covered_bytes,
        "tokens": score["tokens"],
        "tokens_scored": score["predicted"],
        "bytes": text_bytes,
    }
