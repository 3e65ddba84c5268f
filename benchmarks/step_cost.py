"""Cost of a training step, side by side: nanoGPT's baby loop against lmforge's train stage.

Sides, each timed over ``--steps`` steps after ``--warmup`` on the default corpus's token files,
round-robin ``--rounds`` times in one process (so another process's load hits all alike), medians:

- ``nanogpt``: nanoGPT's model and loop at the baby config (``benchmarks/nanogpt_ref.py``), fp32.
- ``baby-adamw``: lmforge's real train stage, ``model=baby optimizer=adamw`` (nanoGPT's recipe).
- ``default``: lmforge's real train stage with the default config (baby-llama + Muon,
  ``trainer.precision=auto``, Muon in ``lmforge.training.hardware.muon_dtype``).
- ``default-bf16-muon`` (``--with-bf16-muon``): the default with Muon orthogonalising in bfloat16
  whatever the CPU, as ``torch.optim.Muon`` does: the default before it followed the hardware.
- ``--side NAME=KEY=VALUE,KEY=VALUE``: the real train stage with those overrides (e.g. an earlier
  default recipe, or one option of ``benchmarks/recipes.py``), as many as given.

Time to nanoGPT's final loss (1.78) is steps-to-1.78 (``--steps-to`` NAME=STEPS, from
``benchmarks/recipes.py``) times the measured cost per step, in CPU seconds and in wall seconds.
``--busy`` measures beside a CPU hog pinned to the last core (``benchmarks/contention.py``'s): on
a machine where other work holds a core, what a user waits is the wall time. Prints ``lmforge
info``'s machine block above the table and records it in ``benchmarks/results/step_cost.json``. To measure what an
AVX2-only CPU does on a CPU with native bfloat16, restrict torch and oneDNN to AVX2:

    python benchmarks/step_cost.py --threads 1
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/step_cost.py --threads 1 --with-bf16-muon
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nanogpt_ref
import torch
from contention import cpu_hog, require_taskset
from train_throughput import StepTimer

ROOT = Path(__file__).resolve().parents[1]
SIDES = {
    "nanogpt": "nanoGPT's baby loop (benchmarks/nanogpt_ref.py), fp32, AdamW",
    "baby-adamw": "lmforge `model=baby optimizer=adamw`",
    "default": "lmforge default (baby-llama + Muon, precision auto)",
    "default-bf16-muon": "lmforge default, Muon in bfloat16 (torch.optim.Muon's dtype)",
}


def lmforge_side(data: Path, overrides: list[str], warmup: int, steps: int,
                 bf16_muon: bool = False) -> tuple[float, float]:
    """(wall, CPU) seconds per step of the real train stage with ``overrides``."""
    import lightning as L

    from lmforge.config.compose import compose_config
    from lmforge.training import hardware
    from lmforge.training.stage import train_stage

    timer = StepTimer(warmup, warmup + steps)

    class Timing(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not pl_module.mid_step:
                timer.at(trainer.global_step)

    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp), contextlib.ExitStack() as stack:
        cfg = compose_config([*overrides, f"train.max_steps={warmup + steps}", f"train.eval_interval={warmup + steps}",
                              "train.checkpoint_every=100000", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                              "tracking.log_model=false"], conf_dir=ROOT / "conf")
        for stage in ("prepared", "vocab", "tokens"):
            cfg.paths[stage] = str(data / stage)
        cfg.trainer.num_threads = torch.get_num_threads()
        if bf16_muon:
            original = hardware.muon_dtype
            hardware.muon_dtype = lambda device: torch.bfloat16
            stack.callback(setattr, hardware, "muon_dtype", original)
        with contextlib.redirect_stdout(open(os.devnull, "w")), contextlib.redirect_stderr(open(os.devnull, "w")):
            train_stage(cfg, callbacks=[Timing()])
    return timer_seconds(timer, steps)


def nanogpt_side(data: Path, warmup: int, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step of nanoGPT's loop on the same train tokens."""
    index = json.loads((data / "tokens/index.json").read_text())
    shards = index["splits"]["train"]["shards"]
    if len(shards) != 1 or index["dtype"] != "uint16":
        sys.exit("error: the nanoGPT side reads one uint16 train shard (nanoGPT's train.bin); "
                 "retokenize with one shard.")
    timer = StepTimer(warmup, warmup + steps)
    nanogpt_ref.train_steps(data / "tokens" / shards[0]["file"], int(index["vocab_size"]), warmup + steps, timer.at)
    return timer_seconds(timer, steps)


def timer_seconds(timer: StepTimer, steps: int) -> tuple[float, float]:
    return (timer.t1[0] - timer.t0[0]) / steps, (timer.t1[1] - timer.t0[1]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the steadiest measure)")
    parser.add_argument("--with-bf16-muon", action="store_true", help="also time the default with bf16 Muon")
    parser.add_argument("--steps-to", nargs="*", default=["nanogpt=2000", "baby-adamw=1929"],
                        metavar="SIDE=STEPS", help="steps to val loss 1.78 per side (benchmarks/recipes.py)")
    parser.add_argument("--side", nargs="*", default=[], metavar="NAME=KEY=VALUE,...",
                        help="more lmforge sides: a name and comma-separated overrides")
    parser.add_argument("--busy", action="store_true",
                        help="measure beside a CPU hog pinned to the last core (benchmarks/contention.py's)")
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="holds prepared/, vocab/ and tokens/")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/step_cost.json")
    args = parser.parse_args()
    if args.busy:
        require_taskset()
    if not (args.data / "tokens/index.json").is_file():
        sys.exit(f"error: {args.data}/tokens/index.json not found; run `dvc repro tokenize` first (or pass --data).")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging
    import warnings

    from lmforge.training.hardware import format_info, machine_info, training_choices

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    machine = machine_info()
    print(format_info(machine) + "\n", flush=True)
    data = args.data.resolve()
    runs = {
        "nanogpt": lambda: nanogpt_side(data, args.warmup, args.steps),
        "baby-adamw": lambda: lmforge_side(data, ["model=baby", "optimizer=adamw"], args.warmup, args.steps),
        "default": lambda: lmforge_side(data, [], args.warmup, args.steps),
    }
    if args.with_bf16_muon:
        runs["default-bf16-muon"] = lambda: lmforge_side(data, [], args.warmup, args.steps, bf16_muon=True)
    for side in args.side:
        name, _, overrides = side.partition("=")
        SIDES[name] = f"lmforge `{' '.join(overrides.split(','))}`"
        runs[name] = lambda overrides=overrides: lmforge_side(data, overrides.split(","), args.warmup, args.steps)
    samples: dict[str, list[tuple[float, float]]] = {side: [] for side in runs}
    with cpu_hog() if args.busy else contextlib.nullcontext():
        for r in range(args.rounds):
            for side, run in runs.items():
                samples[side].append(run())
                wall, cpu = samples[side][-1]
                print(f"round {r + 1}: {side:18s} {wall * 1000:7.1f} ms/step (wall)  {cpu * 1000:7.1f} ms/step (CPU)",
                      flush=True)
    steps_to = {k: float(v) for k, v in (s.split("=", 1) for s in args.steps_to)}
    rows = []
    for side in runs:
        wall = statistics.median(w for w, _ in samples[side])
        cpu = statistics.median(c for _, c in samples[side])
        rows.append({"side": side, "what": SIDES[side], "ms_per_step_wall": wall * 1000, "ms_per_step_cpu": cpu * 1000,
                     "rounds": samples[side], "steps_to_1.78": steps_to.get(side)})
    nano = rows[0]
    choices = training_choices("auto", "cpu")
    condition = f"beside a CPU hog on core {(os.cpu_count() or 1) - 1}" if args.busy else "quiet"
    print(f"\nprecision auto -> {choices['hardware.precision']}, Muon dtype {choices['hardware.muon_dtype']}; "
          f"{args.threads} thread(s), {args.steps} steps x {args.rounds} rounds, medians; {condition}\n")
    print("| run | ms/step (CPU) | vs nanoGPT | ms/step (wall) | steps to 1.78 | time to 1.78 (CPU) | vs nanoGPT "
          "| time to 1.78 (wall) | vs nanoGPT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        row["vs_nanogpt"] = row["ms_per_step_cpu"] / nano["ms_per_step_cpu"]
        to = row["steps_to_1.78"]
        cells = []
        for clock in ("cpu", "wall"):
            seconds = to * row[f"ms_per_step_{clock}"] / 1000 if to else None
            base = nano["steps_to_1.78"] * nano[f"ms_per_step_{clock}"] / 1000 if nano["steps_to_1.78"] else None
            ratio = seconds / base if seconds and base else None
            suffix = "" if clock == "cpu" else "_wall"  # the CPU figures keep their earlier keys
            row[f"seconds_to_1.78{suffix}"], row[f"time_to_1.78_vs_nanogpt{suffix}"] = seconds, ratio
            cells += [f"{seconds:.0f} s" if seconds else "-", f"{ratio:.2f}x" if ratio else "-"]
        print(f"| {row['what']} | {row['ms_per_step_cpu']:.1f} | {row['vs_nanogpt']:.2f}x | "
              f"{row['ms_per_step_wall']:.1f} | {f'{to:.0f}' if to else '-'} | {' | '.join(cells)} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "busy": args.busy, "steps": args.steps, "warmup": args.warmup,
            "rounds": args.rounds, "load_average": os.getloadavg(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report = {"machine": machine, "choices": choices, "meta": meta, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
