"""Tests for the serving engine's decode step: the same logits, keys, values and lengths as the model's own
forward over KV slots, for every position scheme, norm and MLP, slots at one length or at several, and
weights laid out transposed without a value changing."""

from __future__ import annotations

import pytest
import torch

from lmforge.inference.decode import Decoder, prepare_weights
from lmforge.inference.kv_slots import KVSlots
from tests.helpers import LLAMA_STYLE, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = [dict(positions="learned"), dict(positions="sinusoidal"), dict(mlp="gelu_tanh", bias=False),
           dict(norm="rmsnorm", tie_embeddings=False), LLAMA_STYLE, dict(LLAMA_STYLE, n_kv_head=1),
           dict(LLAMA_STYLE, qk_norm=True, logit_softcap=2.0), dict(mlp="relu2", qk_norm=True, n_kv_head=2)]


def filled_slots(model, lengths: list[int], n_slots: int = 6) -> KVSlots:
    slots = KVSlots.for_model(model, n_slots)
    for row, n in enumerate(lengths):
        seq = torch.randint(0, 32, (1, n), generator=torch.Generator().manual_seed(row))
        model(seq, cache=slots.slot(row))
        slots.lengths[row] = n
    return slots


@pytest.mark.parametrize("lengths", [[5], [4, 4, 4], [3, 9, 1, 6]], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_decoder_computes_what_the_model_computes(options, lengths):
    model = tiny_model(**options)
    ours, theirs = filled_slots(model, lengths), filled_slots(model, lengths)
    decoder = Decoder(model)
    with torch.inference_mode():
        steps(model, decoder, ours, theirs, len(lengths))
    assert ours.lengths.tolist() == theirs.lengths.tolist()
    for k_ours, k_theirs, v_ours, v_theirs in zip(ours.k, theirs.k, ours.v, theirs.v):
        torch.testing.assert_close(k_ours, k_theirs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v_ours, v_theirs, rtol=1e-12, atol=1e-12)


def steps(model, decoder, ours: KVSlots, theirs: KVSlots, B: int) -> None:
    for step in range(3):  # each step one token further; the slots' lengths stay apart (or together)
        idx = torch.randint(0, 32, (B,), generator=torch.Generator().manual_seed(100 + step))
        expected = model(idx[:, None], cache=theirs)[0][:, -1]
        torch.testing.assert_close(decoder(ours, idx), expected, rtol=1e-12, atol=1e-12)


def test_decoder_refuses_a_full_slot():
    model = tiny_model(block_size=8)
    slots = filled_slots(model, [8])
    with pytest.raises(ValueError, match="block_size=8 is full"), torch.inference_mode():
        Decoder(model)(slots, torch.tensor([1]))


@pytest.mark.parametrize("options", [{}, LLAMA_STYLE], ids=str)
def test_prepared_weights_keep_every_value_and_the_models_output(options):
    model = tiny_model(**options)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = model(idx)[0]
    prepare_weights(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    linear = model.transformer.h[0].attn.c_attn.weight
    assert linear.t().is_contiguous() and not linear.is_contiguous()  # laid out transposed
    assert model.transformer.wte.weight.is_contiguous()  # the embedding (tied output layer) as it was
    torch.testing.assert_close(model(idx)[0], expected, rtol=1e-12, atol=1e-12)
    prepare_weights(model)  # again: nothing changes
    assert model.transformer.h[0].attn.c_attn.weight.t().is_contiguous()
