"""Quality at the baby budget: each training recipe's loss over the whole validation split.

The budget is nanoGPT's CPU "baby" run: 2000 steps of 12 x 64 tokens on the default corpus, with
models of the baby's size (0.81M parameters, within 10%). Each recipe is the real train stage
(``lmforge.training.stage.train``) on the project's token files, then the evaluate stage's score
(``lmforge.evaluation.stage.score_tokens``: every validation token, non-overlapping windows). The
training validation estimate (``--eval-iters`` batches) every ``--eval-interval`` steps gives the
step at which the recipe reaches nanoGPT's final loss (1.78), interpolated linearly between two
estimates. The curve is convex there, so the chord between estimates 100 steps apart crossed late:
on the same three runs of the default, 434 +- 89 steps at 100 steps and 20 batches, 389 +- 52 at
20 steps and 50 batches (the default since 2026-12-06: 5,000 batches of estimates a run instead
of 400). The time to get there is that many steps at the recipe's cost per step, measured
afterwards for all recipes side by side (``--speed-steps`` steps each, round-robin,
``--speed-rounds`` times, in CPU seconds: on a machine shared with other work the wall time of
runs made minutes apart does not compare, the CPU time of one thread does).

    python benchmarks/recipes.py                       # every recipe below, on the selection split
    python benchmarks/recipes.py default --set optimizer.muon_lr=0.04 --label muon-lr0.04

A recipe is chosen on the **selection split**, never on the validation split it reports:
``--split selection`` (the default) trains on the first 90% of the training tokens and scores the
last 10% (the curve's estimates too); ``--split val`` trains on all of them and scores the
validation split, for the figures of the recipe once chosen. ``--seeds`` trains each recipe once
per seed; the table gives the mean and standard deviation over seeds.

    python benchmarks/recipes.py default no-normuon speedrun --seeds 1337 1 2 --speed-steps 0
                                                           # the latest ablation of docs/benchmarks.md
    python benchmarks/recipes.py default speedrun nanogpt --split val  # the figures it reports

Results accumulate by label (``label@seed``) in ``benchmarks/results/recipes-<split>.json`` (or
``--out``), each with the machine block (``lmforge info``) it was trained on, which is printed first;
the table printed at the end shows all of them, with the CPU capability each ran at (give runs on
another CPU their own ``--label``). One run takes minutes of CPU: on a 2-core machine run at most
two at once, ``--threads 1`` each, each with its own ``--out`` (``--merge`` joins the files).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NANOGPT_FINAL_LOSS = 1.78  # nanoGPT's baby recipe on these plays (../shared/NOTES.md: 1.793 estimate)

# Every recipe measured before 2026-12-06 (noon) ran its float32 matmuls in IEEE float32, as nanoGPT does
# on a CPU; since then `trainer.float32_matmul_precision: auto` runs them in bf16 where bf16 is native.
IEEE = ["trainer.float32_matmul_precision=highest"]
# The default of 2026-12-05, before NorMuon: torch's Muon update with five Newton-Schulz iterations.
SPEEDRUN = [*IEEE, "optimizer.muon_normuon_beta2=null", "optimizer.muon_ns_steps=5"]
# The default before the speedrun changes (session of 2026-12-05): baby-llama without QK-norm, Muon on
# fused matrices, cosine to 0.1, one AdamW rate.
PREVIOUS = [*SPEEDRUN, "model.qk_norm=false", "optimizer.muon_split=false", "optimizer.schedule=cosine",
            "optimizer.cooldown_fraction=0.0", "optimizer.min_lr_ratio=0.1", "optimizer.embedding_lr=null"]
# name -> (what it is, overrides on top of conf/ with its defaults)
RECIPES = {
    "nanogpt": ("nanoGPT's recipe: GPT-2 baby, AdamW lr 1e-3 -> 1e-4 cosine, warmup 100, wd 0.1, betas 0.9/0.99",
                [*IEEE, "model=baby", "optimizer=adamw", "optimizer.lr=1e-3", "optimizer.min_lr_ratio=0.1"]),
    "nanogpt-lr": ("the same with the learning rate retuned", [*IEEE, "model=baby", "optimizer=adamw",
                                                              "optimizer.lr=4e-3", "optimizer.min_lr_ratio=0.1"]),
    "llama-adamw": ("baby-llama (RoPE, RMSNorm, SwiGLU, GQA, no bias, untied) with AdamW",
                    [*IEEE, "model=baby-llama", "optimizer=adamw", "model.qk_norm=false"]),
    "previous": ("the default until 2026-12-05: baby-llama, Muon on fused matrices, cosine to 0.1", PREVIOUS),
    "speedrun": ("the default until NorMuon (2026-12-05): QK-norm, muon_split, wsd; torch's Muon, 5 iterations",
                 SPEEDRUN),
    "default": ("the default configuration (conf/config.yaml)", []),
    # The ablation of float32 matmuls in bf16 (trainer.float32_matmul_precision: auto -> medium here).
    "ieee-matmuls": ("the default with IEEE float32 matmuls (the default of 2026-12-06 morning)", IEEE),
    # The ablation of NorMuon with three Newton-Schulz iterations: each half without the other.
    "no-normuon": ("the morning's default without NorMuon (torch's Muon update, 3 iterations)",
                   [*IEEE, "optimizer.muon_normuon_beta2=null"]),
    "ns5": ("the morning's default with 5 Newton-Schulz iterations", [*IEEE, "optimizer.muon_ns_steps=5"]),
    # The ablation of the speedrun changes, measured on SPEEDRUN: each less one of its changes.
    "no-qk-norm": ("the speedrun default without QK-norm", [*SPEEDRUN, "model.qk_norm=false"]),
    "no-muon-split": ("the speedrun default with Muon on the fused q|k|v and gate|up matrices",
                      [*SPEEDRUN, "optimizer.muon_split=false"]),
    "no-wsd": ("the speedrun default with cosine decay to 0.1 instead of warmup-stable-decay to 0",
               [*SPEEDRUN, "optimizer.schedule=cosine", "optimizer.cooldown_fraction=0.0",
                "optimizer.min_lr_ratio=0.1"]),
    # Tried and left out: the embeddings at a rate of their own (3 seeds: no better than without).
    "embedding-lr": ("the speedrun default with the embeddings at AdamW lr 0.03",
                     [*SPEEDRUN, "optimizer.embedding_lr=0.03"]),
}
BUDGET = ["train.max_steps=2000", "train.batch_size=12", "model.block_size=64"]
SELECTION_FRACTION = 0.1  # the end of the training tokens that --split selection scores


def carve_selection(data: Path, into: Path) -> Path:
    """A data directory in ``into`` whose train split is the first 90% of ``data``'s training
    tokens and whose val split is the last 10% (the selection split); prepared/ and vocab/ are
    ``data``'s own."""
    from lmforge.tokenization.shards import TokenStream, read_index

    train = TokenStream(data / "tokens", "train")
    ids = train.read(0, len(train)).astype(train.dtype)
    cut = len(ids) - int(len(ids) * SELECTION_FRACTION)
    index = read_index(data / "tokens")
    bytes_per_token = index["splits"]["train"]["bytes"] / len(ids)
    for stage in ("prepared", "vocab"):
        (into / stage).symlink_to(data / stage)
    for split, part in (("train", ids[:cut]), ("val", ids[cut:])):
        (into / "tokens" / split).mkdir(parents=True)
        part.tofile(into / "tokens" / split / "shard_000000.bin")
        index["splits"][split] = {"tokens": len(part), "documents": 1, "bytes": round(len(part) * bytes_per_token),
                                  "shards": [{"file": f"{split}/shard_000000.bin", "tokens": len(part)}]}
    (into / "tokens/index.json").write_text(json.dumps(index, indent=2))
    return into


def crossing_step(curve: list[list[float]], target: float) -> float | None:
    """The first step at which the validation curve reaches ``target``, interpolated linearly."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l0 > target >= l1:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return curve[0][0] if curve and curve[0][1] <= target else None


def run_recipe(name: str, extra: list[str], data: Path, eval_interval: int, threads: int | None,
               machine: dict | None = None, seed: int | None = None, eval_iters: int = 50) -> dict:
    """Train one recipe in a temporary project on ``data`` (prepared/, vocab/, tokens/); score it."""
    import lightning as L

    from lmforge.config.compose import compose_config
    from lmforge.evaluation.metrics import score_tokens
    from lmforge.model.directory import load_model_dir
    from lmforge.tokenization.shards import TokenStream
    from lmforge.training.stage import train_stage

    class StepClock(L.Callback):
        """Wall time of the training steps alone (validation excluded)."""

        def __init__(self):
            self.seconds, self._t0 = 0.0, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seconds += time.perf_counter() - self._t0

    clock = StepClock()
    overrides = [*RECIPES[name][1], *BUDGET, *extra, *([] if seed is None else [f"seed={seed}"])]
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        cfg = compose_config([f"train.eval_iters={eval_iters}", *overrides, f"train.eval_interval={eval_interval}",
                              "train.checkpoint_every=100000",
                              f"tracking.uri=sqlite:///{tmp}/mlflow.db", "tracking.log_model=false"],
                             conf_dir=ROOT / "conf")
        for stage in ("prepared", "vocab", "tokens"):
            cfg.paths[stage] = str(data / stage)
        if threads:
            cfg.trainer.num_threads = threads
        started = time.perf_counter()
        out = train_stage(cfg, callbacks=[clock])
        wall = time.perf_counter() - started
        loaded = load_model_dir(out)
        val = TokenStream(data / "tokens", "val")
        score = score_tokens(loaded.model, val, loaded.model.config.block_size, batch_size=64)
        curve = [[int(s), float(v)] for s, v in (row.split(",") for row in
                                                (out / "curves/val_loss.csv").read_text().splitlines()[1:])]
        steps = int(cfg.train.max_steps)
    cross = crossing_step(curve, NANOGPT_FINAL_LOSS)
    return {
        "recipe": name, "seed": int(cfg.seed), "overrides": overrides,
        "parameters": loaded.model.num_params(non_embedding=False),
        "val_loss": score["nats"] / score["predicted"], "val_tokens": score["predicted"],
        "val_curve": curve, "steps": steps, "train_seconds": clock.seconds, "wall_seconds": wall,
        "tokens_per_second": steps * cfg.train.batch_size * cfg.model.block_size / clock.seconds,
        "steps_to_nanogpt_loss": cross,
        "seconds_to_nanogpt_loss": None if cross is None else cross * clock.seconds / steps,
        "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "machine": machine,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", default=list(RECIPES), help=f"from: {', '.join(RECIPES)}")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every recipe")
    parser.add_argument("--label", help="the name results are stored under (default: the recipe's)")
    parser.add_argument("--split", choices=("selection", "val"), default="selection",
                        help="score a selection split carved from train (to choose) or the val split (to report)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[None], help="one run per seed (default: conf's)")
    parser.add_argument("--eval-interval", type=int, default=20, help="steps between validation estimates")
    parser.add_argument("--eval-iters", type=int, default=50, help="batches per validation estimate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="holds prepared/, vocab/ and tokens/")
    parser.add_argument("--out", type=Path, help="the results file (default: benchmarks/results/recipes-<split>.json)")
    parser.add_argument("--merge", nargs="*", type=Path, default=[], help="results files to add to --out first")
    parser.add_argument("--speed-steps", type=int, default=100, help="timed steps per recipe for the cost per step")
    parser.add_argument("--speed-rounds", type=int, default=3)
    parser.add_argument("--no-train", action="store_true", help="only measure the cost per step of stored results")
    args = parser.parse_args()
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    if not (args.data / "tokens/index.json").is_file():
        parser.error(f"{args.data}/tokens/index.json not found; run `dvc repro tokenize` first (or pass --data)")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    from lmforge.training.hardware import format_info, machine_info

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    print(format_info(machine) + "\n", flush=True)
    out = args.out or ROOT / f"benchmarks/results/recipes-{args.split}.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    for other in args.merge:
        results.update(json.loads(other.read_text()))
    with tempfile.TemporaryDirectory() as carved:
        data = args.data.resolve()
        if args.split == "selection":
            data = carve_selection(data, Path(carved))
        for name in [] if args.no_train else args.recipes:
            for seed in args.seeds:
                label = args.label if args.label and len(args.recipes) == 1 else name
                label = label if seed is None else f"{label}@{seed}"
                print(f"training {label}: {RECIPES[name][0]} {' '.join(args.set)}", flush=True)
                result = run_recipe(name, args.set, data, args.eval_interval, args.threads, machine, seed,
                                    args.eval_iters)
                result["split"] = args.split
                results[label] = result
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=2) + "\n")
                print(f"  {label}: {args.split} loss {result['val_loss']:.4f}, "
                      f"{result['train_seconds']:.0f} s of training", flush=True)

        if args.speed_steps:
            costs = step_costs(results, data, args.speed_steps, args.speed_rounds, args.threads)
            for label, cost in costs.items():
                r = results[label]
                r["cpu_seconds_per_step"] = cost
                to_loss = r["steps_to_nanogpt_loss"]
                r["cpu_seconds_to_nanogpt_loss"] = None if to_loss is None else to_loss * cost
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, args.split)
    print(f"\nwrote {out}")


def print_table(results: dict, split: str) -> None:
    """One row per label (its seeds together: mean and standard deviation), best first."""
    import statistics

    rows: dict[str, list[dict]] = {}
    for label, r in results.items():
        rows.setdefault(label.split("@")[0], []).append(r)

    def spread(values: list[float], digits: int) -> str:
        mean = statistics.fmean(values)
        sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{mean:.{digits}f}{sd}"

    print(f"\n| recipe | overrides | seeds | parameters | {split} loss | steps to {NANOGPT_FINAL_LOSS} "
          f"| ms per step (CPU) | time to {NANOGPT_FINAL_LOSS} (CPU) | CPU (ATen capability) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for label, runs in sorted(rows.items(), key=lambda kv: statistics.fmean(r["val_loss"] for r in kv[1])):
        crossings = [r["steps_to_nanogpt_loss"] for r in runs if r["steps_to_nanogpt_loss"] is not None]
        costs = [r["cpu_seconds_per_step"] * 1000 for r in runs if r.get("cpu_seconds_per_step")]
        to_target = [r["cpu_seconds_to_nanogpt_loss"] for r in runs if r.get("cpu_seconds_to_nanogpt_loss")]
        overrides = " ".join(o for o in runs[0]["overrides"] if o not in BUDGET and not o.startswith("seed="))
        print(f"| {label} | {overrides or '-'} | {len(runs)} | {runs[0]['parameters']:,} "
              f"| {spread([r['val_loss'] for r in runs], 4)} | {spread(crossings, 0) if crossings else '-'} "
              f"| {spread(costs, 1) if costs else '-'} | {spread(to_target, 0) + ' s' if to_target else '-'} "
              f"| {where(runs[0].get('machine'))} |")


def where(machine: dict | None) -> str:
    """The table's CPU cell: model and the capability torch ran at (unknown for older results)."""
    return f"{machine['cpu']} ({machine['aten_cpu_capability']})" if machine else "-"


def step_costs(results: dict, data: Path, steps: int, rounds: int, threads: int | None) -> dict[str, float]:
    """CPU seconds per training step of every stored recipe, measured round-robin (median of rounds)."""
    import statistics

    import lightning as L

    from lmforge.config.compose import compose_config
    from lmforge.training.stage import train_stage

    warmup = 10
    # The learning rates do not change the cost of a step: one measurement per architecture,
    # optimizer and trainer.
    def cost_key(overrides: list[str]) -> tuple[str, ...]:
        return tuple(o for o in overrides if o.split("=")[0].split(".")[0] in ("model", "trainer")
                     or o.split("=")[0] == "optimizer" or o.startswith("optimizer.name"))

    keys = {label: cost_key(r["overrides"]) for label, r in results.items()}
    representative = {key: label for label, key in keys.items()}
    samples: dict[str, list[float]] = {label: [] for label in representative.values()}
    for _ in range(rounds):
        for label in samples:
            r = results[label]
            clock = {}

            class Clock(L.Callback):
                times = clock  # bound now: a closure would see a later round's dict

                def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                    if trainer.global_step in (warmup, warmup + steps):
                        self.times[trainer.global_step] = time.process_time()

            with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
                cfg = compose_config([*r["overrides"], f"train.max_steps={warmup + steps}",
                                      f"train.eval_interval={warmup + steps}", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                                      "tracking.log_model=false"], conf_dir=ROOT / "conf")
                for stage in ("prepared", "vocab", "tokens"):
                    cfg.paths[stage] = str(data / stage)
                if threads:
                    cfg.trainer.num_threads = threads
                with contextlib.redirect_stdout(open(os.devnull, "w")):
                    train_stage(cfg, callbacks=[Clock()])
            samples[label].append((clock[warmup + steps] - clock[warmup]) / steps)
            print(f"  cost per step of {label}: {samples[label][-1] * 1000:.1f} ms (CPU)", flush=True)
    costs = {label: statistics.median(values) for label, values in samples.items()}
    return {label: costs[representative[key]] for label, key in keys.items()}


if __name__ == "__main__":
    main()
