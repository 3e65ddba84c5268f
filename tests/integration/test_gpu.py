"""On a CUDA GPU (``benchmarks/gpu_check.sh`` runs these with ``-m gpu``): the hardware choices
there, and Muon's orthogonalisation on the GPU against torch's. Skipped where there is no GPU."""

from __future__ import annotations

import pytest
import torch

from lmforge.training import hardware
from lmforge.training.muon import Muon

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_choices_on_this_gpu_follow_its_bf16_support():
    bf16 = torch.cuda.get_device_capability(0) >= (8, 0)
    assert hardware.muon_dtype("cuda") == (torch.bfloat16 if bf16 else torch.float32)
    assert hardware.resolve_precision("auto", "gpu") == ("bf16-mixed" if bf16 else "32")


def test_muon_on_the_gpu_is_torchs_muon():
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(256, 768, device="cuda", generator=gen)) for _ in range(2)]
    ours = Muon([params[0]], lr=0.02, ns_dtype=torch.bfloat16)
    torchs = torch.optim.Muon([params[1]], lr=0.02)
    params[1].data.copy_(params[0].data)
    for _ in range(3):
        grad = torch.randn(256, 768, device="cuda", generator=gen)
        params[0].grad, params[1].grad = grad.clone(), grad.clone()
        ours.step()
        torchs.step()
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=1e-6)
