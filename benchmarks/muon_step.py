"""Cost of Muon's step alone: NorMuon and the Newton-Schulz step count, side by side.

Builds the default model (``conf/``, composed as the train stage composes it, vocabulary of
``--vocab-size``) and its optimizer (``lmforge.training.optim.build_optimizer``), gives every
parameter a random gradient and times ``optimizer.muon.step()`` alone: the orthogonalisation and,
with NorMuon, its per-neuron statistics, without the forward and backward pass that makes a
whole training step noisy on a shared machine. Sides take turns ``--rounds`` times in one process
(``--steps`` steps each, after one untimed step), thread CPU time on ``--threads`` threads; the
table gives the median of each side's rounds.

    python benchmarks/muon_step.py                      # NorMuon on/off x 3/5 iterations
    python benchmarks/muon_step.py --set optimizer.muon_ns_scheme=polar_express

Prints ``lmforge info``'s machine block and the table, and writes both to
``benchmarks/results/muon_step.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIDES = {
    "NorMuon, 3 iterations (default)": [],
    "NorMuon, 5 iterations": ["optimizer.muon_ns_steps=5"],
    "no NorMuon, 3 iterations": ["optimizer.muon_normuon_beta2=null"],
    "no NorMuon, 5 iterations (torch's Muon)": ["optimizer.muon_normuon_beta2=null", "optimizer.muon_ns_steps=5"],
}


def build(overrides: list[str], vocab_size: int, seed: int = 0) -> tuple[torch.optim.Optimizer, int]:
    """The default model's Muon (with ``overrides``) with random gradients, and how many matrices it steps."""
    from lmforge.config.compose import compose_config
    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.training.optim import build_optimizer

    cfg = compose_config(["optimizer=muon", *overrides])
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_dict({**cfg.model, "vocab_size": vocab_size}))
    optimizer = build_optimizer(model, cfg.optimizer)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    muon = optimizer.muon
    return muon, sum(len(muon.row_blocks.get(id(p), (0,))) for g in muon.param_groups for p in g["params"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=65, help="the default corpus's characters")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every side")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/muon_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lmforge.training.hardware import format_info, machine_info

    machine = machine_info()
    print(format_info(machine) + "\n", flush=True)
    built = {name: build([*overrides, *args.set], args.vocab_size) for name, overrides in SIDES.items()}
    times: dict[str, list[float]] = {name: [] for name in SIDES}
    for round_ in range(args.rounds):
        for name, (muon, _) in built.items():
            muon.step()
            start = time.thread_time()
            for _ in range(args.steps):
                muon.step()
            times[name].append((time.thread_time() - start) / args.steps * 1e3)
            print(f"round {round_ + 1}: {name:42s} {times[name][-1]:6.2f} ms", flush=True)
    rows = [{"side": name, "overrides": [*SIDES[name], *args.set], "matrices": built[name][1],
             "ms_per_step": statistics.median(times[name]), "rounds_ms": times[name]} for name in SIDES]
    print(f"\n{args.threads} thread(s), {args.steps} steps x {args.rounds} rounds, medians of thread CPU time\n")
    print("| Muon step | matrices | ms per step (CPU) |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['side']} | {row['matrices']} | {row['ms_per_step']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine, "threads": args.threads, "rows": rows}, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
