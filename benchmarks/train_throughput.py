"""Training throughput for the baby configuration on CPU: our trainer against a bare PyTorch loop.

"trainer" is the real train stage (``lmforge.training.stage.train``: Lightning, the MLflow logging every
``train.log_every`` steps, checkpoints, NaN watch, tokens/s), in a temporary project on the
project's token files. "bare" is a plain loop over the same model, batches, optimizer (fused
AdamW), schedule, clipping and autocast, with no Lightning: what the trainer costs is the gap.
Each is timed over ``--steps`` optimizer steps after ``--warmup`` steps (compilation included
there), eager and compiled, in every ``--precisions``, in wall time and in CPU time (the work
alone: on a shared machine it does not count the time another process holds the core; with one
thread it is the steadier measure). The sides run round-robin, ``--rounds`` times, in one
process, so that load from other processes hits every side alike; medians are compared.

    python benchmarks/train_throughput.py [--steps 200] [--rounds 3] [--threads N]
                                          [--precisions 32 bf16-mixed] [--no-compile]

Needs the prepared, vocabulary and token files of the default corpus (``dvc repro tokenize``). Prints the
machine block (``lmforge info``) and a table, and writes both to
``benchmarks/results/train_throughput.json``. nanoGPT's 16,000 tokens/s (fp32, eager, 2 threads,
measured alone on this kind of machine) is the outside anchor; the bare fp32 eager loop, which
is nanoGPT's loop on nanoGPT's model, is the same anchor measured under today's load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NANOGPT_TOKENS_PER_SECOND = 16_000  # ../shared/NOTES.md: nanoGPT, baby config, CPU eager, 2 threads


def base_config(overrides: list[str]):
    from lmforge.config.compose import compose_config

    return compose_config(["model=baby", "optimizer=adamw", "trainer=cpu", *overrides], conf_dir=ROOT / "conf")


class StepTimer:
    """Wall time and this process's CPU time from the end of optimizer step ``start`` to the end
    of step ``stop``. CPU time counts only the work done, not the time spent waiting for a core
    that another process holds: on a shared machine it is the fairer measure of overhead."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self.t0 = self.t1 = None

    def at(self, step: int) -> None:
        if step == self.start:
            self.t0 = (time.perf_counter(), time.process_time())
        elif step == self.stop:
            self.t1 = (time.perf_counter(), time.process_time())

    def tokens_per_second(self, tokens: int) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second) over the timed steps."""
        return tokens / (self.t1[0] - self.t0[0]), tokens / (self.t1[1] - self.t0[1])


def trainer_side(data: Path, precision: str, compiled: bool, warmup: int, steps: int) -> tuple[float, float]:
    """Tokens per second of the train stage over steps warmup..warmup+steps."""
    import lightning as L

    from lmforge.training.stage import train_stage

    timer = StepTimer(warmup, warmup + steps)

    class Timing(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not pl_module.mid_step:
                timer.at(trainer.global_step)

    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        cfg = base_config([
            f"train.max_steps={warmup + steps}", f"train.eval_interval={warmup + steps}",
            f"trainer.precision={precision}", f"trainer.compile={str(compiled).lower()}",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db", "tracking.log_model=false",
        ])
        for stage in ("prepared", "vocab", "tokens"):
            cfg.paths[stage] = str(data / stage)
        cfg.trainer.num_threads = torch.get_num_threads()
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            train_stage(cfg, callbacks=[Timing()])
    return timer.tokens_per_second(steps * cfg.train.batch_size * cfg.model.block_size)


def bare_side(data: Path, precision: str, compiled: bool, warmup: int, steps: int) -> tuple[float, float]:
    """Tokens per second of a plain PyTorch loop: same model, batches, optimizer, schedule, clipping."""
    from omegaconf import OmegaConf

    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.tokenization.shards import TokenStream, read_index
    from lmforge.training.data import RandomWindows
    from lmforge.training.optim import build_optimizer, lr_factor

    cfg = base_config([])
    t, opt_cfg = cfg.train, cfg.optimizer
    tokens = data / "tokens"
    torch.manual_seed(cfg.seed)
    model_config = {**OmegaConf.to_container(cfg.model), "vocab_size": read_index(tokens)["vocab_size"]}
    model = GPT(GPTConfig.from_dict(model_config))
    if precision == "bf16-true":
        model = model.bfloat16()
    optimizer = build_optimizer(model, opt_cfg, fused=True)
    if compiled:
        model.compile()
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16-mixed"
                else contextlib.nullcontext)
    batches = iter(RandomWindows(TokenStream(tokens, "train"), cfg.model.block_size, t.batch_size, cfg.seed))
    timer = StepTimer(warmup, warmup + steps)
    model.train()
    for step in range(warmup + steps):
        x, y = next(batches)
        with autocast():
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = opt_cfg.lr * lr_factor(step, opt_cfg, t.max_steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.at(step + 1)
    return timer.tokens_per_second(steps * t.batch_size * cfg.model.block_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed optimizer steps per side and round")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation happens here)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16-mixed"])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="holds prepared/, vocab/ and tokens/")
    args = parser.parse_args()
    if not (args.data / "tokens/index.json").is_file():
        sys.exit(f"error: {args.data}/tokens/index.json not found; run `dvc repro tokenize` first (or pass --data).")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    from lmforge.training.hardware import format_info, machine_info, resolve_precision

    machine = machine_info()
    print(format_info(machine) + "\n", flush=True)
    args.precisions = [resolve_precision(p, "cpu") for p in args.precisions]  # auto: what this CPU gets

    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    sides = [(p, m, s) for p in args.precisions for m in modes for s in ("trainer", "bare")]
    results: dict[tuple, list[tuple[float, float]]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for precision, mode, side in sides:
            run = trainer_side if side == "trainer" else bare_side
            wall, cpu = run(args.data.resolve(), precision, mode == "compiled", args.warmup, args.steps)
            results[(precision, mode, side)].append((wall, cpu))
            print(f"round {r + 1}: {side:7s} {mode:8s} {precision:10s} {wall:9,.0f} tokens/s  {cpu:9,.0f} tokens/CPU-s",
                  flush=True)

    def median(key, i):
        return statistics.median(x[i] for x in results[key])

    anchor = ("32", "eager", "bare") if ("32", "eager", "bare") in results else None
    rows = []
    for precision in args.precisions:
        for mode in modes:
            trainer, bare = (precision, mode, "trainer"), (precision, mode, "bare")
            rows.append({
                "precision": precision, "mode": mode,
                "trainer_tokens_per_second": median(trainer, 0), "bare_tokens_per_second": median(bare, 0),
                "trainer_tokens_per_cpu_second": median(trainer, 1), "bare_tokens_per_cpu_second": median(bare, 1),
                "trainer_over_bare_wall": median(trainer, 0) / median(bare, 0),
                "trainer_over_bare_cpu": median(trainer, 1) / median(bare, 1),
                "trainer_over_nanogpt_16k": median(trainer, 0) / NANOGPT_TOKENS_PER_SECOND,
                "trainer_over_bare_fp32_eager_cpu": median(trainer, 1) / median(anchor, 1) if anchor else None,
                "trainer_rounds": results[trainer], "bare_rounds": results[bare],
            })
    print()
    print("| precision | mode | trainer tok/s | bare tok/s | trainer tok/CPU-s | bare tok/CPU-s | trainer / bare (CPU) "
          "| trainer / bare (wall) | trainer / bare fp32 eager (CPU) | trainer / nanoGPT 16k (wall) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ratio = row["trainer_over_bare_fp32_eager_cpu"]
        vs_anchor = f"{ratio:.2f}x" if ratio else "-"
        print(f"| {row['precision']} | {row['mode']} | {row['trainer_tokens_per_second']:,.0f} | "
              f"{row['bare_tokens_per_second']:,.0f} | {row['trainer_tokens_per_cpu_second']:,.0f} | "
              f"{row['bare_tokens_per_cpu_second']:,.0f} | {row['trainer_over_bare_cpu']:.3f} | "
              f"{row['trainer_over_bare_wall']:.3f} | {vs_anchor} | {row['trainer_over_nanogpt_16k']:.2f}x |")
    out = ROOT / "benchmarks/results/train_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "load_average": os.getloadavg(), "nanogpt_tokens_per_second": NANOGPT_TOKENS_PER_SECOND}
    out.write_text(json.dumps({"machine": machine, "meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
