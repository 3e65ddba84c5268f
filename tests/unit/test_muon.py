"""lmforge.training.muon.Muon against torch.optim.Muon on random matrices: the same update in bfloat16, the
float32 path within bfloat16's rounding of torch's and closer to a float64 orthogonalisation; Polar Express's
iterations and NorMuon's per-neuron normalisation."""

from __future__ import annotations

import pytest
import torch

from lmforge.training.muon import Muon, iteration_coefficients, normalise_neurons, zeropower_via_newtonschulz

SHAPES = [(128, 384), (384, 128), (64, 64)]  # wide, tall (transposed inside), square
TORCH_QUINTIC = [torch.optim.Muon([torch.nn.Parameter(torch.zeros(2, 2))]).defaults["ns_coefficients"]] * 5


def run_steps(optimizer_class, shape, steps=3, **kwargs):
    """Parameters after ``steps`` Muon steps on fixed random gradients, and the optimizer."""
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(*shape, generator=gen) * 0.02)
    optimizer = optimizer_class([param], lr=0.02, momentum=0.95, weight_decay=0.1, adjust_lr_fn="original", **kwargs)
    for _ in range(steps):
        param.grad = torch.randn(*shape, generator=gen)
        optimizer.step()
    return param.detach().clone(), optimizer


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_path_is_torchs_muon(shape):
    ours, _ = run_steps(Muon, shape, ns_dtype=torch.bfloat16)
    torchs, _ = run_steps(torch.optim.Muon, shape)
    torch.testing.assert_close(ours, torchs, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_path_matches_torchs_muon_up_to_bf16_rounding(shape):
    start, _ = run_steps(Muon, shape, steps=0, ns_dtype=torch.float32)
    ours, _ = run_steps(Muon, shape, ns_dtype=torch.float32)
    torchs, _ = run_steps(torch.optim.Muon, shape)
    step = (torchs - start).abs().max()
    assert step > 0
    # bf16 has 8 bits of mantissa: the two trajectories agree to about 1% of the step taken.
    assert (ours - torchs).abs().max() < 0.02 * step


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_orthogonalisation_is_closer_to_float64_than_bf16(shape):
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = zeropower_via_newtonschulz(grad, TORCH_QUINTIC, 1e-7, torch.float64)
    error = {dtype: (zeropower_via_newtonschulz(grad.float(), TORCH_QUINTIC, 1e-7, dtype).double() - reference).norm()
             for dtype in (torch.float32, torch.bfloat16)}
    assert error[torch.float32] < error[torch.bfloat16] / 10
    # And the result is near-orthogonal: singular values in the quintic's band (about 0.7 to 1.2), but for
    # the few smallest of a square Gaussian matrix, which five iterations do not lift that far.
    singular = torch.linalg.svdvals(zeropower_via_newtonschulz(grad.float(), TORCH_QUINTIC, 1e-7, torch.float32))
    assert singular.quantile(0.05) > 0.5 and singular.max() < 1.5


def test_state_dict_moves_between_ours_and_torchs():
    _, ours = run_steps(Muon, (64, 32), ns_dtype=torch.float32)
    _, torchs = run_steps(torch.optim.Muon, (64, 32))
    assert ours.state_dict()["param_groups"] == torchs.state_dict()["param_groups"]
    param = torch.nn.Parameter(torch.zeros(64, 32))
    loaded = torch.optim.Muon([param])
    loaded.load_state_dict(ours.state_dict())  # a checkpoint of ours resumes under torch's, and back
    Muon([param], ns_dtype=torch.float32).load_state_dict(loaded.state_dict())
    ours_param = ours.param_groups[0]["params"][0]
    torch.testing.assert_close(loaded.state[param]["momentum_buffer"], ours.state[ours_param]["momentum_buffer"])


def test_build_optimizer_uses_the_hardware_dtype(monkeypatch):
    from omegaconf import OmegaConf

    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.training import hardware
    from lmforge.training.optim import build_optimizer

    model = GPT(GPTConfig.from_dict({"vocab_size": 16, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 16}))
    cfg = OmegaConf.create({"name": "muon", "lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1,
                            "muon_lr": 0.01, "muon_momentum": 0.95, "muon_weight_decay": 0.0,
                            "muon_adjust_lr": "original"})
    for dtype in (torch.float32, torch.bfloat16):
        monkeypatch.setattr(hardware, "muon_dtype", lambda device, d=dtype: d)
        optimizer = build_optimizer(model, cfg)
        assert isinstance(optimizer.muon, Muon) and optimizer.muon.ns_dtype == dtype
    # Without the newer keys (a config of an older lmforge): torch's five quintics, no NorMuon.
    assert (optimizer.muon.param_groups[0]["ns_steps"], optimizer.muon.ns_scheme) == (5, "torch")
    assert optimizer.muon.normuon_beta2 is None
    cfg.update({"muon_ns_steps": 3, "muon_ns_scheme": "polar_express", "muon_normuon_beta2": 0.9})
    optimizer = build_optimizer(model, cfg)
    assert (optimizer.muon.param_groups[0]["ns_steps"], optimizer.muon.ns_scheme) == (3, "polar_express")
    assert optimizer.muon.normuon_beta2 == 0.9


def test_a_stack_of_matrices_is_orthogonalised_as_each_alone():
    grads = torch.randn(3, 96, 32, generator=torch.Generator().manual_seed(2))
    stacked = zeropower_via_newtonschulz(grads, TORCH_QUINTIC, 1e-7, torch.float32)
    for grad, ortho in zip(grads, stacked):
        torch.testing.assert_close(ortho, zeropower_via_newtonschulz(grad, TORCH_QUINTIC, 1e-7, torch.float32))


@pytest.mark.parametrize("normuon_beta2", [None, 0.95])
def test_row_blocks_step_as_matrices_of_their_own(normuon_beta2):
    """A fused [q | k | v] matrix with row_blocks takes the steps its three blocks would take apart,
    NorMuon's running mean squares included (a block as tall as wide normalises rows, a wide one columns)."""
    gen = torch.Generator().manual_seed(3)
    fused = torch.nn.Parameter(torch.randn(96, 32, generator=gen) * 0.02)
    apart = [torch.nn.Parameter(block.detach().clone()) for block in fused.split([64, 16, 16])]
    settings = dict(lr=0.02, momentum=0.95, weight_decay=0.1, adjust_lr_fn="original", ns_dtype=torch.float32,
                    normuon_beta2=normuon_beta2)
    ours = Muon([fused], row_blocks={id(fused): (64, 16, 16)}, **settings)
    theirs = Muon(apart, **settings)
    for _ in range(3):
        fused.grad = torch.randn(96, 32, generator=gen)
        for param, grad in zip(apart, fused.grad.split([64, 16, 16])):
            param.grad = grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in apart]))


def singular_spread(ortho: torch.Tensor) -> float:
    """How far the worst singular value of ``ortho`` is from 1."""
    return (torch.linalg.svdvals(ortho.double()) - 1).abs().max().item()


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_express_orthogonalises_closer_than_torchs_quintic(shape):
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    spread = {}
    for scheme in ("torch", "polar_express"):
        coefficients, safety = iteration_coefficients(scheme, TORCH_QUINTIC[0], 5)
        spread[scheme] = singular_spread(zeropower_via_newtonschulz(grad, coefficients, 1e-7, torch.float32, safety))
    # torch's quintic leaves singular values anywhere in about [0.7, 1.2]; Polar Express's five steps hold
    # every one within 0.15 of 1 (its design band for a spectrum down to 1e-3 of the largest).
    assert spread["polar_express"] < 0.15 < spread["torch"]


def test_polar_express_runs_past_five_iterations_on_its_last():
    coefficients, safety = iteration_coefficients("polar_express", TORCH_QUINTIC[0], 7)
    assert len(coefficients) == 7 and coefficients[5] == coefficients[6] == coefficients[4] and safety > 1
    assert iteration_coefficients("torch", TORCH_QUINTIC[0], 3) == ([TORCH_QUINTIC[0]] * 3, 1.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_normuon_equalises_each_neuron_and_keeps_the_norm(shape):
    gen = torch.Generator().manual_seed(5)
    ortho = torch.randn(2, *shape, generator=gen) * torch.rand(2, shape[0], 1, generator=gen)  # uneven rows
    tall = shape[0] >= shape[1]
    variance = torch.zeros(2, shape[0], 1) if tall else torch.zeros(2, 1, shape[1])
    out = normalise_neurons(ortho, variance, 0.95)
    torch.testing.assert_close(out.norm(dim=(-2, -1)), ortho.norm(dim=(-2, -1)))
    # From a zero start the running mean square is the first one scaled: every row (column) ends at one RMS.
    rms = out.square().mean(dim=-1 if tall else -2).sqrt()
    torch.testing.assert_close(rms, rms.mean(dim=-1, keepdim=True).expand_as(rms))
    torch.testing.assert_close(variance.squeeze(), 0.05 * ortho.square().mean(dim=-1 if tall else -2).squeeze())


def test_normuon_state_survives_a_checkpoint(tmp_path):
    """The running mean squares live in the state dict: a run saved and loaded (weights only) steps on as one
    that never stopped."""
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(96, 32, generator=gen) for _ in range(4)]
    settings = dict(lr=0.02, momentum=0.95, ns_dtype=torch.float32, normuon_beta2=0.95, ns_steps=3,
                    row_blocks=None)
    straight = torch.nn.Parameter(torch.zeros(96, 32))
    optimizer = Muon([straight], **settings)
    for grad in grads:
        straight.grad = grad.clone()
        optimizer.step()
    resumed = torch.nn.Parameter(torch.zeros(96, 32))
    first = Muon([resumed], **settings)
    for grad in grads[:2]:
        resumed.grad = grad.clone()
        first.step()
    torch.save(first.state_dict(), tmp_path / "optimizer.pt")
    second = Muon([resumed], **settings)
    second.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert second.state[resumed]["variance_buffer"].shape == (96,)
    for grad in grads[2:]:
        resumed.grad = grad.clone()
        second.step()
    torch.testing.assert_close(resumed.detach(), straight.detach(), rtol=0, atol=0)
