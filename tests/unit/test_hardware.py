"""lmforge.hardware: the native-bf16 rule per CPU/GPU kind, precision=auto per device, `lmforge info`.

The capabilities and the probe are forced (monkeypatched), one test per branch; nothing is timed."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.training import hardware


@pytest.fixture
def forced(monkeypatch):
    """Force what the CPU reports: forced(machine=..., capability=..., avx512_bf16=..., amx=..., arm_bf16=...)."""

    def force(machine="x86_64", capability="AVX512", avx512_bf16=False, amx=False, arm_bf16=False, speedup=None):
        monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
        monkeypatch.setattr(hardware, "cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(hardware, "_arm_cpu_has_bf16", lambda: arm_bf16)
        if speedup is not None:
            monkeypatch.setattr(hardware, "autocast_speedup", lambda: speedup)
        hardware.cpu_bf16_native.cache_clear()

    yield force
    hardware.cpu_bf16_native.cache_clear()


@pytest.mark.parametrize("kind, native", [
    (dict(capability="AVX2"), False),                                    # AMD Zen 1-3, Intel Haswell..Ice Lake client
    (dict(capability="AVX2", avx512_bf16=True, amx=True), False),        # a bf16 Xeon forced to AVX2 dispatch
    (dict(capability="AVX512"), False),                                  # Skylake/Cascade Lake: AVX-512, no BF16
    (dict(capability="AVX512", avx512_bf16=True), True),                 # Zen 4/5, Cooper Lake
    (dict(capability="AVX512", amx=True), True),                         # Sapphire Rapids and later
    (dict(machine="aarch64", capability="DEFAULT"), False),              # ARM without BF16 (Apple M1, Graviton 2)
    (dict(machine="aarch64", capability="SVE256", arm_bf16=True), True),  # ARM with BF16 (Graviton 3, Apple M2+)
    (dict(machine="riscv64", capability="DEFAULT"), False),
])
def test_muon_dtype_is_bf16_only_where_the_cpu_computes_it_natively(forced, kind, native):
    forced(**kind)
    assert hardware.cpu_bf16_native() is native
    assert hardware.muon_dtype("cpu") == (torch.bfloat16 if native else torch.float32)


def test_muon_dtype_on_cuda_follows_the_gpus_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, s=supported: s)
        assert hardware.muon_dtype("cuda") == dtype


@pytest.mark.parametrize("kind, speedup, expected", [
    (dict(capability="AVX2"), 0.01, "32"),                          # emulated bf16: never
    (dict(capability="AVX512", amx=True), 1.3, "bf16-mixed"),       # native and a faster step
    (dict(capability="AVX512", amx=True), 0.8, "32"),               # native, but autocast's casts cost more
])
def test_precision_auto_resolves_per_cpu(forced, kind, speedup, expected):
    forced(**kind, speedup=speedup)
    assert hardware.resolve_precision("auto", "cpu") == expected
    assert hardware.resolve_precision("32", "cpu") == "32"  # an explicit setting is kept
    assert hardware.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_precision_auto_resolves_per_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert hardware.resolve_precision("auto", "gpu") == "bf16-mixed"
    assert hardware.resolve_precision("auto", "auto") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # V100, T4
    assert hardware.resolve_precision("auto", "gpu") == "32"
    assert hardware.resolve_precision("auto", "mps") == "32"


def test_the_probes_measure_both_dtypes():
    threads = torch.get_num_threads()
    hardware.bf16_speedup.cache_clear()
    hardware.autocast_speedup.cache_clear()
    assert hardware.bf16_speedup() > 0 and hardware.autocast_speedup() > 0
    assert torch.get_num_threads() == threads  # the probes run on one thread, then restore the count
    gflops = hardware.probe_gflops(seconds=0.2)
    assert gflops["float32"] > 0 and gflops["bfloat16"] > 0


def test_lmforge_info_prints_the_machine_block(capsys):
    from lmforge.cli.main import main

    main(["info", "--probe-seconds", "0.2"])
    out = capsys.readouterr().out
    for word in ("cpu:", "ATen", "native bf16", "torch", "lightning", "mlflow", "dvc", "GFLOP/s", "muon dtype"):
        assert word in out
    main(["info", "--json", "--probe-seconds", "0"])
    info = json.loads(capsys.readouterr().out)
    assert info["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_threads"] == torch.get_num_threads() and "matmul_gflops" not in info
    assert info["muon_dtype"]["cpu"] in ("float32", "bfloat16")


def test_lmforge_info_refuses_a_negative_probe(capsys):
    from lmforge.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--probe-seconds", "-1"])
    assert exit_info.value.code == 1 and "--probe-seconds" in capsys.readouterr().err


@pytest.mark.parametrize("kind, expected", [
    (dict(capability="AVX2"), "highest"),                            # bf16 emulated: oneDNN would ignore medium
    (dict(capability="AVX512"), "highest"),                          # AVX-512 without BF16
    (dict(capability="AVX512", amx=True), "medium"),                 # native: bf16 inputs, float32 sums
    (dict(machine="aarch64", capability="SVE256", arm_bf16=True), "medium"),
])
def test_matmul_precision_auto_resolves_per_cpu(forced, kind, expected):
    forced(**kind)
    assert hardware.resolve_matmul_precision("auto", "cpu") == expected
    for explicit in ("highest", "high", "medium"):  # an explicit setting is kept
        assert hardware.resolve_matmul_precision(explicit, "cpu") == explicit
    assert hardware.training_choices("32", "cpu", "auto")["hardware.float32_matmul_precision"] == expected


def test_matmul_precision_auto_is_tf32_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hardware.resolve_matmul_precision("auto", "gpu") == "high"


def test_the_matmul_precision_is_put_back_even_after_an_error():
    before = torch.get_float32_matmul_precision()
    other = "medium" if before != "medium" else "highest"
    with pytest.raises(RuntimeError), hardware.restored_matmul_precision(other):
        assert torch.get_float32_matmul_precision() == other
        raise RuntimeError("the stage failed")
    assert torch.get_float32_matmul_precision() == before
    with hardware.restored_matmul_precision():  # nothing set: whatever the block sets is undone
        torch.set_float32_matmul_precision(other)
    assert torch.get_float32_matmul_precision() == before


def test_lmforge_info_says_what_float32_matmuls_run_in(capsys):
    from lmforge.cli.main import main

    before = torch.get_float32_matmul_precision()
    main(["info", "--json", "--probe-seconds", "0"])
    info = json.loads(capsys.readouterr().out)
    assert info["matmul_precision_auto"]["cpu"] == hardware.resolve_matmul_precision("auto", "cpu")
    assert torch.get_float32_matmul_precision() == before  # the threads probe ran under auto's, then restored
