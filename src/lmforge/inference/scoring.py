"""The log-probabilities of a sequence's own tokens: what an API's ``echo`` with ``logprobs`` returns.

A sequence is scored as ``lmforge evaluate`` scores text (``lmforge.evaluation.metrics.score_tokens``):
in non-overlapping windows of ``block_size`` tokens, the window starting at token ``s`` predicting
tokens ``s + 1 .. s + block_size`` from the tokens before them in that window. So the log-likelihoods
a harness reads from the server sum to the negated loss ``lmforge evaluate`` reports on the same tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TokenScore = tuple  # (logprob or None, [(token id, logprob), ...] or None)


@torch.inference_mode()
def token_logprobs(model, ids: list[int], block_size: int, top: int = 0) -> list[TokenScore]:
    """Per token of ``ids``: (its log-probability given the tokens before it in its window, the
    ``top`` most likely tokens there as (id, logprob)). The first token has (None, None)."""
    device = next(model.parameters()).device
    out: list[TokenScore] = [(None, None)]
    for start in range(0, len(ids) - 1, block_size):
        window = torch.tensor(ids[start : start + block_size + 1], device=device)
        logprobs = F.log_softmax(model(window[None, :-1])[0][0].float(), dim=-1)
        chosen = logprobs.gather(-1, window[1:, None])[:, 0].tolist()
        if top:
            values, best = logprobs.topk(min(top, logprobs.size(-1)), dim=-1)
            alternatives = [list(zip(i, v)) for i, v in zip(best.tolist(), values.tolist())]
        else:
            alternatives = [None] * len(chosen)
        out.extend(zip(chosen, alternatives))
    return out
