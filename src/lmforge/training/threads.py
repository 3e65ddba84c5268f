"""How many torch threads a CPU training run uses: ``trainer.num_threads``, and what ``auto`` measures.

``auto`` times this model's training step (forward and backward, at the run's micro-batch and
precision) on this machine at 1, 2, 4, ... threads up to the cores, the counts taking turns
so that load from other processes falls on each alike, and keeps the fewest threads within
``MARGIN`` of the fastest (best of ``ROUNDS``). The answer is remembered per machine, torch version,
model, batch and precision in ``$LMFORGE_CACHE_DIR/threads.json`` (default
``~/.cache/lmforge``): torch's CPU kernels do not give the same bits at every thread count (the
baby-llama's gradients agree at 1 and 2 threads but not at 3 or 4; wider models differ at 2), so
two runs of one config must not choose differently because one probe met a busy moment. For the
same reason the count never changes during a run, and a resumed run keeps the count it started with.

What keeps the choice good when load arrives later is OpenMP's wait policy (``lmforge/__init__``):
with ``OMP_WAIT_POLICY=PASSIVE`` threads that wait sleep instead of spinning, so two threads beside
a process that holds one core still beat one thread. This module knows nothing about Lightning.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.config.paths import CACHE_DIR_ENV, THREADS_CACHE_FILE

THREADS_AUTO = "auto"
# More threads must make the step this much faster to be chosen: fewer threads leave cores to the
# rest of the machine, and a marginal gain is within what a busier moment takes away.
MARGIN = 1.10
ROUNDS = 3  # timed steps per count (after one untimed): the best of them
PROBE_BUDGET_SECONDS = 20.0  # a large model on a slow CPU stops the rounds early


@dataclass(frozen=True)
class ThreadChoice:
    """The torch thread count a run uses, why (one phrase for ``lmforge info`` and the logs), and
    the probe's best step time per count when one was taken (from the cache or just now)."""

    threads: int
    reason: str
    seconds: dict[int, float] = field(default_factory=dict)


def candidates(cores: int) -> list[int]:
    """The counts ``auto`` tries on ``cores`` cores: 1, 2, 4, ... below ``cores``, then ``cores``."""
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return counts + [max(cores, 1)]


def fewest_within(seconds: dict[int, float], margin: float = MARGIN) -> int:
    """The fewest threads whose step time is within ``margin`` times the fastest one's."""
    best = min(seconds.values())
    return min(n for n, s in seconds.items() if s <= best * margin)


def time_counts(step: Callable[[], None], counts: list[int], rounds: int = ROUNDS,
                clock: Callable[[], float] = time.perf_counter,
                budget: float = PROBE_BUDGET_SECONDS) -> dict[int, float]:
    """Best wall seconds of ``step()`` at each thread count in ``counts``: one untimed step per
    count, then ``rounds`` rounds in which the counts take turns; rounds stop once ``budget``
    seconds have gone (never before the first timed round). torch's thread count is restored."""
    before = torch.get_num_threads()
    best = {n: float("inf") for n in counts}
    start = clock()
    try:
        for n in counts:  # warm-up: allocation, oneDNN kernel creation, the pool's threads
            torch.set_num_threads(n)
            step()
        for r in range(rounds):
            if r and clock() - start > budget:
                break
            for n in counts:
                torch.set_num_threads(n)
                t0 = clock()
                step()
                best[n] = min(best[n], clock() - t0)
    finally:
        torch.set_num_threads(before)
    return best


def model_step(model_config: dict, batch_size: int, autocast: bool = False) -> Callable[[], None]:
    """One forward and backward pass of a GPT of ``model_config`` on a random micro-batch of
    ``batch_size`` x ``block_size`` tokens (in bf16 autocast when ``autocast``). Built without
    touching torch's global random state, so that the run's seeds see none of it."""
    from lmforge.model.gpt import GPT, GPTConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_dict(model_config))
    gen = torch.Generator().manual_seed(0)
    shape = (batch_size, int(model_config["block_size"]))
    x, y = (torch.randint(0, int(model_config["vocab_size"]), shape, generator=gen) for _ in range(2))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss = model(x, y)
        loss.backward()

    return step


def cache_file() -> Path:
    """Where ``auto``'s answers are remembered: ``$LMFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lmforge``,
    else ``~/.cache/lmforge``."""
    base = os.environ.get(CACHE_DIR_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"
    return Path(base) / THREADS_CACHE_FILE


def cache_key(model_config: dict, batch_size: int, precision: str, cores: int) -> str:
    """What an answer depends on: the CPU and its cores, torch and its kernels' SIMD level,
    the wait policy, the model, the micro-batch, the precision and how float32 matmuls run now
    (``torch.set_float32_matmul_precision``: the probe runs under it)."""
    from lmforge.training.hardware import cpu_capability, cpu_model

    return json.dumps({"cpu": cpu_model(), "cores": cores, "torch": torch.__version__,
                       "capability": cpu_capability(), "wait_policy": wait_policy(),
                       "matmul": torch.backends.mkldnn.matmul.fp32_precision,
                       "model": model_config, "batch_size": batch_size, "precision": precision}, sort_keys=True)


def _read_cache(path: Path) -> dict:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measure again and rewrite it
    return found if isinstance(found, dict) else {}


def _write_cache(path: Path, key: str, threads: int, seconds: dict[int, float]) -> None:
    from lmforge.outputs import write_json

    entries = _read_cache(path)
    entries[key] = {"threads": threads, "seconds": {str(n): s for n, s in seconds.items()},
                    "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, entries)
    except OSError:
        pass  # a read-only home: the next run measures again


def measured_choice(model_config: dict, batch_size: int, precision: str,
                    measure: Callable[[list[int]], dict[int, float]] | None = None,
                    cores: int | None = None, cache: Path | None = None) -> ThreadChoice:
    """``auto`` on the CPU: the remembered answer for this machine and model, else a probe
    (``measure(counts) -> best seconds per count``; by default ``time_counts`` of ``model_step``)
    whose answer is remembered."""
    # Every core, not the affinity mask: counts a mask leaves no room for lose the probe anyway.
    cores = (os.cpu_count() or 1) if cores is None else cores
    if cores <= 1:
        return ThreadChoice(1, "auto: one core")
    cache = cache_file() if cache is None else cache
    key = cache_key(model_config, batch_size, precision, cores)
    known = _read_cache(cache).get(key)
    if isinstance(known, dict) and isinstance(known.get("threads"), int) and known["threads"] >= 1:
        seconds = {int(n): float(s) for n, s in known.get("seconds", {}).items()}
        return ThreadChoice(known["threads"], f"auto: measured on {known.get('measured', '?')}, "
                                              f"remembered in {cache}; {_timings(seconds)}", seconds)
    if measure is None:
        step = model_step(model_config, batch_size, autocast=precision.startswith("bf16"))
        measure = lambda counts: time_counts(step, counts)  # noqa: E731
    seconds = measure(candidates(cores))
    threads = fewest_within(seconds)
    _write_cache(cache, key, threads, seconds)
    return ThreadChoice(threads, f"auto: measured now; {_timings(seconds)}", seconds)


def _timings(seconds: dict[int, float]) -> str:
    shown = ", ".join(f"{n} -> {s * 1000:.0f} ms" for n, s in sorted(seconds.items()))
    return f"step at {shown}" if shown else "no timings kept"


def resolve_threads(setting, device_type: str, model_config: dict, batch_size: int, precision: str,
                    **probe) -> ThreadChoice:
    """``trainer.num_threads`` as a count: a number as given, null as torch's default, ``auto`` as
    ``measured_choice`` on the CPU and torch's default elsewhere (a GPU's step does not run on
    these threads). ``probe``: ``measured_choice``'s ``measure``, ``cores`` and ``cache``."""
    if setting is None:
        return ThreadChoice(torch.get_num_threads(), "torch's default")
    if str(setting) != THREADS_AUTO:
        return ThreadChoice(int(setting), "trainer.num_threads")
    if device_type != "cpu":
        return ThreadChoice(torch.get_num_threads(), f"auto on {device_type}: torch's default")
    return measured_choice(model_config, batch_size, precision, **probe)


def wait_policy() -> str:
    """OpenMP's wait policy for torch's threads: ``passive`` as lmforge sets it before torch loads,
    what the user's ``OMP_WAIT_POLICY`` says, or ``active`` (the runtime's default: spin, then sleep)
    where torch was imported before lmforge."""
    import lmforge

    return lmforge.WAIT_POLICY


def auto_for_info(params_path: Path = Path("params.yaml")) -> dict:
    """What ``auto`` resolves to for ``lmforge info``: for the model, batch and precision of
    ``params_path`` when it is there (at the vocabulary of its token files, else 86), else for the
    baby at a batch of 12; with the reason, the probe's timings and the wait policy."""
    from omegaconf import OmegaConf

    from lmforge.training.hardware import (
        PROBE_MODEL,
        resolve_matmul_precision,
        resolve_precision,
        restored_matmul_precision,
    )

    model, batch, precision, source = dict(PROBE_MODEL), 12, resolve_precision("auto", "cpu"), "the baby, batch 12"
    matmul = "auto"
    if params_path.is_file():
        from lmforge.config.compose import load_config
        from lmforge.tokenization.shards import INDEX_FILE

        cfg = load_config(params_path=params_path)
        index = Path(cfg.paths.tokens) / INDEX_FILE
        vocab = json.loads(index.read_text(encoding="utf-8"))["vocab_size"] if index.is_file() else 86
        model = {**OmegaConf.to_container(cfg.model, resolve=True), "vocab_size": vocab}
        batch, precision = int(cfg.train.batch_size), resolve_precision(str(cfg.trainer.precision), "cpu")
        matmul = str(cfg.trainer.get("float32_matmul_precision", "highest"))
        source = f"{params_path}'s model, batch {batch}"
    with restored_matmul_precision(resolve_matmul_precision(matmul, "cpu")):  # as the train stage will
        choice = measured_choice(model, batch, precision)
    return {"threads": choice.threads, "reason": choice.reason, "for": source,
            "seconds": {str(n): s for n, s in choice.seconds.items()}, "wait_policy": wait_policy()}
