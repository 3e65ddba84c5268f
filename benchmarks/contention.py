"""Threads on a busy machine: the default training with ``trainer.num_threads`` auto and each fixed
count, quiet and beside a CPU hog that holds one core.

Each side is the real train stage (``lmforge.training.stage.train_stage``) with the default config
(baby-llama, Muon, batch 12 x 64, ``trainer.precision=auto``), in a fresh process of its own (OpenMP
reads its wait policy when torch loads, and ``auto`` then probes as a new run does), timed over
``--steps`` optimizer steps after ``--warmup``. Conditions:

- ``quiet``: nothing of ours beside it (other users of the machine are whatever they are: the
  load average is recorded with every side);
- ``busy``: a Python busy loop pinned to the last core (``taskset -c LAST``) for the whole side.

Sides: ``auto`` (probed afresh in each side, in the condition it runs in), each fixed count 1, 2, 4,
... up to the cores, and in the busy condition ``auto (quiet answer)``: the count ``auto`` chose in
the first quiet side, as a run does whose answer was remembered before the load arrived. With
``--spinning``, also every core under the OpenMP runtime's own wait policy (torch imported before
lmforge, ``OMP_WAIT_POLICY`` unset: libgomp spins about 3 ms at each barrier before it sleeps),
which is what lmforge ran with before it set the policy: the cause of issue 21. The sides take turns, ``--rounds``
times, conditions alternating; each side's figure is the median over rounds of its tokens per
second of wall time. ``auto`` passes when it is within 1.25x of the best fixed count in both
conditions.

    python benchmarks/contention.py [--steps 40] [--warmup 5] [--rounds 3] [--spinning]

Needs the default corpus's token files (``dvc repro tokenize``, or ``--data DIR`` holding
prepared/, vocab/ and tokens/). Prints ``lmforge info``'s machine block and the table, and writes
both to ``benchmarks/results/contention.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1.25  # auto within this factor of the best fixed count


def one_side(data: Path, threads: str, steps: int, warmup: int, runtime_policy: bool) -> dict:
    """Run the default training in this process; wall seconds per step over the timed steps.
    ``runtime_policy``: import torch before lmforge, which then leaves OpenMP's wait policy alone."""
    if runtime_policy:
        import torch  # noqa: F401
    import lmforge  # noqa: F401, I001  (it sets OpenMP's wait policy where torch has not loaded yet)
    import lightning as L
    import torch

    from lmforge.config.compose import compose_config
    from lmforge.training.stage import train_stage

    marks: dict[int, float] = {}

    class Timing(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not pl_module.mid_step and trainer.global_step in (warmup, warmup + steps):
                marks[trainer.global_step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        cfg = compose_config([f"train.max_steps={warmup + steps}", f"train.eval_interval={10 * (warmup + steps)}",
                              f"trainer.num_threads={threads}", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                              "tracking.log_model=false"], conf_dir=ROOT / "conf")
        for stage in ("prepared", "vocab", "tokens"):
            cfg.paths[stage] = str(data / stage)
        started = time.perf_counter()
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            train_stage(cfg, callbacks=[Timing()])
        tokens = steps * int(cfg.train.batch_size) * int(cfg.model.block_size)
    seconds = marks[warmup + steps] - marks[warmup]
    return {"threads": torch.get_num_threads(), "seconds_per_step": seconds / steps,
            "tokens_per_second": tokens / seconds, "total_seconds": time.perf_counter() - started}


def require_taskset() -> None:
    if not shutil.which("taskset"):
        sys.exit("error: taskset not found (util-linux); it pins the CPU hog to one core.")


@contextlib.contextmanager
def cpu_hog():
    """A Python busy loop pinned to the last core (``taskset -c LAST``) while the block runs."""
    require_taskset()
    last = str((os.cpu_count() or 1) - 1)
    hog = subprocess.Popen(["taskset", "-c", last, sys.executable, "-c", "while True: pass"])
    try:
        yield last
    finally:
        hog.kill()
        hog.wait()


def run_side(args, setting: str, busy: bool, cache: Path, runtime_policy: bool) -> dict:
    """One side in a fresh process (beside a hog on the last core when ``busy``)."""
    cmd = [sys.executable, __file__, "--one", setting, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--data", str(args.data), *(["--runtime-policy"] if runtime_policy else [])]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # each side as a fresh shell's
    with cpu_hog() if busy else contextlib.nullcontext():
        proc = subprocess.run(cmd, env={**env, "LMFORGE_CACHE_DIR": str(cache)},
                              capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"error: the side {setting} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_average": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spinning", action="store_true",
                        help="also every core under the OpenMP runtime's own wait policy (before lmforge set it)")
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="holds prepared/, vocab/ and tokens/")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a side, in the child process
    parser.add_argument("--runtime-policy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.data / "tokens/index.json").is_file():
        sys.exit(f"error: {args.data}/tokens/index.json not found; run `dvc repro tokenize` first (or pass --data).")
    args.data = args.data.resolve()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    if args.one:
        print(json.dumps(one_side(args.data, args.one, args.steps, args.warmup, args.runtime_policy)))
        return
    require_taskset()

    from lmforge.training.hardware import format_info, machine_info
    from lmforge.training.threads import candidates

    machine = machine_info(probe_seconds=0)
    print(format_info(machine) + "\n", flush=True)
    cores = os.cpu_count() or 1
    fixed = [str(n) for n in candidates(cores)]
    sides = {"quiet": ["auto", *fixed], "busy": ["auto", "auto (quiet answer)", *fixed]}
    if args.spinning:
        for condition in sides:
            sides[condition].append(f"{cores} spinning")
    results: dict[tuple[str, str], list[dict]] = {(c, s): [] for c, names in sides.items() for s in names}
    with tempfile.TemporaryDirectory() as quiet_cache:
        for r in range(args.rounds):
            for condition, names in sides.items():
                for name in names:
                    setting, runtime_policy, cache = name, False, None
                    if name == "auto (quiet answer)":
                        setting, cache = "auto", Path(quiet_cache)
                    elif name.endswith("spinning"):
                        setting, runtime_policy = str(cores), True
                    elif name == "auto" and condition == "quiet" and r == 0:
                        cache = Path(quiet_cache)  # the answer a later busy side remembers
                    with tempfile.TemporaryDirectory() as fresh:
                        side = run_side(args, setting, condition == "busy", cache or Path(fresh), runtime_policy)
                    results[(condition, name)].append(side)
                    print(f"round {r + 1}: {condition:5s} {name:20s} {side['threads']} threads "
                          f"{side['tokens_per_second']:8,.0f} tokens/s  (load {side['load_average']:.1f})", flush=True)

    rows, verdicts = [], {}
    for condition, names in sides.items():
        medians = {name: statistics.median(s["tokens_per_second"] for s in results[(condition, name)])
                   for name in names}
        best_fixed = max(medians[n] for n in fixed)
        verdicts[condition] = best_fixed / medians["auto"]
        for name in names:
            rows.append({"condition": condition, "side": name, "tokens_per_second": medians[name],
                         "threads": [s["threads"] for s in results[(condition, name)]],
                         "best_fixed_over_this": best_fixed / medians[name], "rounds": results[(condition, name)]})
    print(f"\n{machine['cpu']}, {cores} cores, ATen {machine['aten_cpu_capability']}, torch "
          f"{machine['versions']['torch']}; default training, {args.steps} steps after {args.warmup}, "
          f"median of {args.rounds} rounds; busy = a CPU hog on core {cores - 1}\n")
    print("| condition | side | threads chosen | tokens/s | best fixed / this |")
    print("|---|---|---|---:|---:|")
    for row in rows:
        print(f"| {row['condition']} | {row['side']} | {', '.join(map(str, row['threads']))} | "
              f"{row['tokens_per_second']:,.0f} | {row['best_fixed_over_this']:.2f}x |")
    passed = all(v <= TOLERANCE for v in verdicts.values())
    print("\nauto within {:.2f}x of the best fixed count: {} (quiet {:.2f}x, busy {:.2f}x)".format(
        TOLERANCE, "yes" if passed else "NO", verdicts["quiet"], verdicts["busy"]))
    out = ROOT / "benchmarks/results/contention.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "cores": cores,
            "tolerance": TOLERANCE, "auto_over_best_fixed": verdicts, "passed": passed}
    out.write_text(json.dumps({"machine": machine, "meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
