"""What the machine computes natively, measured once per process: the dtype choices that follow.

Three choices depend on the hardware rather than on the recipe, and all are decided here:

- **Muon's orthogonalisation dtype** (``muon_dtype``): bfloat16 where the device multiplies
  bfloat16 matrices natively (CUDA GPUs with bf16, x86 CPUs with AVX512-BF16 or AMX, ARM CPUs with
  the BF16 extension), float32 elsewhere. A CPU without bf16 instructions emulates bf16 matmuls,
  and at the baby's sizes that is 18-27x slower than float32 (an AVX2 EPYC, and this project's
  Xeon restricted to AVX2), which made Muon's step 6x nanoGPT's.
- **``trainer.float32_matmul_precision: auto``** (``resolve_matmul_precision``): ``medium`` on a
  CPU where bf16 is native: oneDNN then multiplies float32 matrices with bfloat16 inputs and
  float32 sums, weights, activations and everything else staying float32 (attention excepted:
  ``lmforge.model.attention``). The baby's linear layers run about 2x faster that way, forward
  and backward, with none of autocast's casts. ``highest`` on other CPUs (oneDNN would ignore
  the setting there anyway), ``high`` (TF32) on CUDA.
- **``trainer.precision: auto``** (``resolve_precision``): ``bf16-mixed`` where bf16 is native
  *and* a short probe (``autocast_speedup``) measures the baby GPT's training step faster under
  bf16 autocast than in float32; ``32`` elsewhere. A faster matmul is not enough: on this
  project's Xeon (AMX) a bf16 matmul at the baby's sizes is 4-6x faster than float32, yet the
  baby's step is 10-20% slower under autocast, which casts around every matmul.

Native support is read from the capabilities torch itself dispatches on (ATen's CPU capability,
cpuinfo's flags, ``torch.cuda.is_bf16_supported``), so ``ATEN_CPU_CAPABILITY=avx2`` makes a
bf16-capable Xeon answer as an AVX2-only CPU does. ``machine_info`` is the block ``lmforge info``
prints and every benchmark records. This module knows nothing about models or training.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import time
from importlib import metadata

import torch

PRECISION_AUTO = "auto"
# bf16 autocast must beat float32 by this much on the probe's training step to be chosen: a
# marginal gain there is within what the rest of a real step (optimizer, data) can undo.
MIN_BF16_SPEEDUP = 1.15
MATMUL_PRECISIONS = ("auto", "highest", "high", "medium")  # torch.set_float32_matmul_precision's, and auto
# The baby's largest matmul: a micro-batch (12 x 64 tokens) through the 128 -> 384 MLP projection.
PROBE_SHAPE = (768, 128, 384)


# ---------------------------------------------------------------------------------------------
# Native bfloat16
# ---------------------------------------------------------------------------------------------


def cpu_capability() -> str:
    """The SIMD level ATen dispatches CPU kernels to ("AVX2", "AVX512", "DEFAULT", "SVE256", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def _arm_cpu_has_bf16() -> bool:
    if platform.system() == "Darwin":  # Apple M2 and later; M1 has no BF16 instructions
        import subprocess

        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        return out.stdout.strip() == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("Features") and " bf16" in line for line in f)
    except OSError:
        return False


@functools.cache
def cpu_bf16_native() -> bool:
    """True when this CPU multiplies bfloat16 matrices in hardware, as torch will run them.

    x86: AVX512-BF16 or AMX in the CPU *and* ATen dispatching at AVX512 (an AVX2 dispatch, forced
    by ``ATEN_CPU_CAPABILITY=avx2`` or chosen by torch, emulates bf16). ARM: the BF16 extension.
    """
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        has_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        return has_bf16 and cpu_capability().startswith("AVX512")
    if machine in ("arm64", "aarch64"):
        return _arm_cpu_has_bf16()
    return False


def bf16_native(device_type: str) -> bool:
    """True when ``device_type`` ("cpu", "cuda", ...) computes bfloat16 matmuls natively."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return cpu_bf16_native()
    return False


# ---------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------


def matmul_seconds(dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = 20) -> float:
    """CPU seconds of the calling thread for one (m x k) @ (k x n) matmul in ``dtype`` on one torch
    thread: the best of ``repeats``. Thread CPU time does not count the time another process holds
    the core, so a busy machine measures what an idle one does (wall time of two threads did not:
    one preempted thread stalls the other at every barrier, and the ratio swung from 0.6 to 4)."""
    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matmul then runs on this thread, which thread_time measures
    try:
        best = float("inf")
        for _ in range(repeats + 2):  # the first two warm up (allocation, oneDNN kernel creation)
            start = time.thread_time()
            a @ b
            best = min(best, time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return best


# The probe's model: the baby (4 layers, 4 heads, 128 wide, 64 tokens), a batch of 12 windows.
PROBE_MODEL = {"vocab_size": 86, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128}


def _train_step_seconds(autocast: bool, repeats: int = 4) -> float:
    """Thread CPU seconds of one forward and backward pass of a baby GPT on a batch of 12 x 64
    tokens, in float32 or under bf16 autocast, on one torch thread: the best of ``repeats``."""
    from lmforge.model.gpt import GPT, GPTConfig

    gen = torch.Generator().manual_seed(0)
    model = GPT(GPTConfig.from_dict(PROBE_MODEL))
    x, y = (torch.randint(0, PROBE_MODEL["vocab_size"], (12, 64), generator=gen) for _ in range(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(repeats + 1):  # the first warms up (allocation, oneDNN kernel creation)
            start = time.thread_time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                _, loss = model(x, y)
            loss.backward()
            best = min(best, time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return best


@functools.cache
def autocast_speedup() -> float:
    """How many times faster a baby GPT's training step (forward and backward) runs under bf16
    autocast than in float32 on one core of this CPU; measured once per process, about 1 s. What
    ``precision: auto`` asks: autocast casts around every matmul, which a matmul probe does not see."""
    return _train_step_seconds(autocast=False) / _train_step_seconds(autocast=True)


@functools.cache
def bf16_speedup() -> float:
    """How many times faster a bfloat16 matmul is than a float32 one at the baby's sizes on one
    core of this CPU (measured once per process: about 10 ms where bf16 is native)."""
    return matmul_seconds(torch.float32) / matmul_seconds(torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# The choices
# ---------------------------------------------------------------------------------------------


def muon_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype Muon's Newton-Schulz iterations run in on ``device``: bfloat16 where native (as
    ``torch.optim.Muon`` always does), float32 where bf16 would be emulated."""
    device_type = torch.device(device).type
    return torch.bfloat16 if bf16_native(device_type) else torch.float32


def device_type_for(accelerator: str) -> str:
    """The torch device type Lightning will train on for ``trainer.accelerator``."""
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(accelerator)


def resolve_precision(precision: str, accelerator: str) -> str:
    """``trainer.precision`` as Lightning takes it: ``auto`` becomes ``bf16-mixed`` where bf16 is
    native and measured faster (CPU: ``autocast_speedup`` at least ``MIN_BF16_SPEEDUP``; CUDA: any GPU
    with bf16 tensor cores), else ``32``. Any other setting is returned as given."""
    if str(precision) != PRECISION_AUTO:
        return str(precision)
    device_type = device_type_for(accelerator)
    if not bf16_native(device_type):
        return "32"
    if device_type == "cpu" and autocast_speedup() < MIN_BF16_SPEEDUP:
        return "32"
    return "bf16-mixed"


def resolve_matmul_precision(value: str, accelerator: str) -> str:
    """``trainer.float32_matmul_precision`` as torch takes it: ``auto`` becomes ``medium`` on a CPU
    with native bf16 (float32 matmuls in bfloat16 with float32 sums), ``highest`` on other CPUs
    and ``high`` (TF32) on CUDA. Any other setting is returned as given."""
    if str(value) != PRECISION_AUTO:
        return str(value)
    device_type = device_type_for(accelerator)
    if device_type == "cuda":
        return "high"
    return "medium" if device_type == "cpu" and bf16_native("cpu") else "highest"


@contextlib.contextmanager
def restored_matmul_precision(setting: str | None = None):
    """Within the block, torch's float32 matmul precision is ``setting`` (as torch takes it:
    ``resolve_matmul_precision``'s result) when given; on exit it is put back as it was, so that a
    notebook or a test session computes as before."""
    before = torch.get_float32_matmul_precision()
    if setting is not None:
        torch.set_float32_matmul_precision(setting)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# Dense bf16 tensor-core peak FLOP/s by device name (NVIDIA data sheets); MFU is measured against
# it. The first pattern that matches torch.cuda.get_device_name() wins; unknown devices (and CPUs)
# get no MFU rather than a wrong one.
PEAK_BF16_FLOPS = (
    (r"H100.*PCIe", 756e12),
    (r"H100 NVL", 835e12),
    (r"H100|H200|GH200", 989e12),  # SXM (HBM3 / HBM3e)
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"\bL4\b", 121e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s from ``PEAK_BF16_FLOPS``, or None when unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for pattern, flops in PEAK_BF16_FLOPS if re.search(pattern, name)), None)


# ---------------------------------------------------------------------------------------------
# The machine block (``lmforge info``, every benchmark)
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's marketing name ("Intel(R) Xeon(R) Processor", "AMD EPYC 7B12", "Apple M2")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    return [{"name": torch.cuda.get_device_name(i),
             "bf16": torch.cuda.get_device_capability(i) >= (8, 0)} for i in range(torch.cuda.device_count())]


def probe_gflops(seconds: float = 5.0) -> dict[str, float]:
    """Matmul GFLOP/s of one core in float32 and bfloat16 at the baby's sizes (``PROBE_SHAPE``):
    about ``seconds`` in all, split between the two dtypes. Counted in the thread's CPU time, so
    that other processes on a shared machine do not lower it (wall time is capped at 4x)."""
    m, k, n = PROBE_SHAPE
    flops = 2 * m * k * n
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            a @ b
            count, cpu0, wall0 = 0, time.thread_time(), time.perf_counter()
            while time.thread_time() - cpu0 < seconds / 2 and time.perf_counter() - wall0 < 2 * seconds:
                a @ b
                count += 1
            out[str(dtype).removeprefix("torch.")] = flops * count / (time.thread_time() - cpu0) / 1e9
    finally:
        torch.set_num_threads(threads)
    return out


def machine_info(probe_seconds: float = 5.0) -> dict:
    """The block that says which machine a figure came from: CPU, SIMD level, cores, threads, GPUs,
    versions, the dtype choices above and (``probe_seconds`` > 0) the matmul probe."""
    info = {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "aten_cpu_capability": cpu_capability(),
        "cpu_bf16_native": cpu_bf16_native(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": _gpus(),
        "versions": {p: _version(p) for p in ("torch", "lightning", "mlflow", "dvc")},
        "precision_auto": {"cpu": resolve_precision(PRECISION_AUTO, "cpu")},
        # the measured reason (None where bf16 is emulated: no probe then)
        "cpu_autocast_speedup": autocast_speedup() if cpu_bf16_native() else None,
        "muon_dtype": {"cpu": str(muon_dtype("cpu")).removeprefix("torch.")},
        "matmul_precision_auto": {"cpu": resolve_matmul_precision(PRECISION_AUTO, "cpu")},
        "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
    }
    if torch.cuda.is_available():
        info["precision_auto"]["cuda"] = resolve_precision(PRECISION_AUTO, "cuda")
        info["muon_dtype"]["cuda"] = str(muon_dtype("cuda")).removeprefix("torch.")
        info["matmul_precision_auto"]["cuda"] = resolve_matmul_precision(PRECISION_AUTO, "cuda")
    if probe_seconds > 0:
        info["matmul_gflops"] = probe_gflops(probe_seconds)
    return info


def format_info(info: dict) -> str:
    """``machine_info``'s block as the lines ``lmforge info`` and the benchmarks print."""
    gpus = ", ".join(f"{g['name']} (bf16 {'yes' if g['bf16'] else 'no'})" for g in info["gpus"]) or "none"
    forced = f"  [forced: {' '.join(f'{k}={v}' for k, v in info['env'].items())}]" if info["env"] else ""
    native = "yes" if info["cpu_bf16_native"] else "no"
    lines = [
        f"cpu:          {info['cpu']} ({info['machine']}), {info['cores']} cores, "
        f"torch threads {info['torch_threads']}",
        f"capability:   ATen {info['aten_cpu_capability']}, native bf16 on CPU: {native}{forced}",
        f"gpus:         {gpus}",
        "versions:     " + ", ".join(f"{k} {v or '-'}" for k, v in info["versions"].items()),
        "precision:    auto -> " + ", ".join(f"{d}: {p}" for d, p in info["precision_auto"].items())
        + (f" (baby step under bf16 autocast: {info['cpu_autocast_speedup']:.2f}x the float32 speed on CPU)"
           if info["cpu_autocast_speedup"] else ""),
        "muon dtype:   " + ", ".join(f"{d}: {t}" for d, t in info["muon_dtype"].items()),
    ]
    if "matmul_precision_auto" in info:  # absent from the records of benchmarks run before it existed
        lines.append("float32 mm:   auto -> " + ", ".join(
            f"{d}: {p}{MATMUL_MEANING.get(p, '')}" for d, p in info["matmul_precision_auto"].items()))
    if "num_threads_auto" in info:  # lmforge info adds it (lmforge.training.threads.auto_for_info)
        t = info["num_threads_auto"]
        lines.append(f"threads:      auto -> {t['threads']} for {t['for']} ({t['reason']}); "
                     f"OpenMP wait policy {t['wait_policy']}")
    if "matmul_gflops" in info:
        m, k, n = PROBE_SHAPE
        g = info["matmul_gflops"]
        lines.append(f"matmul:       {m}x{k} @ {k}x{n}, one core: float32 {g['float32']:.1f} GFLOP/s, "
                     f"bfloat16 {g['bfloat16']:.1f} GFLOP/s ({g['bfloat16'] / g['float32']:.2f}x)")
    return "\n".join(lines)


MATMUL_MEANING = {"highest": " (IEEE float32)", "high": " (TF32 on NVIDIA GPUs)",
                  "medium": " (bfloat16 inputs, float32 sums; attention in float32)"}


def training_choices(precision: str, accelerator: str, matmul_precision: str = "highest") -> dict[str, str]:
    """What a training run on this machine resolves, as MLflow params: ``hardware.precision`` (the
    precision Lightning gets), ``hardware.float32_matmul_precision`` (torch's, for
    ``matmul_precision``), ``hardware.muon_dtype``, ``hardware.cpu`` and its ATen capability."""
    device_type = device_type_for(accelerator)
    return {"hardware.precision": resolve_precision(precision, accelerator),
            "hardware.float32_matmul_precision": resolve_matmul_precision(matmul_precision, accelerator),
            "hardware.muon_dtype": str(muon_dtype(device_type)).removeprefix("torch."),
            "hardware.cpu": cpu_model(), "hardware.aten_cpu_capability": cpu_capability()}
