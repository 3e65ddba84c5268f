"""Cost of fine-tuning, full against LoRA, on the same base: step time, peak memory, optimizer state.

Sides, each a fresh process (so that peak memory is its own) training the same network (a model
of ``--model``'s shape, by default ``conf/model/gpt2-small.yaml`` at GPT-2's vocabulary, 50257
tokens: 124M parameters) for ``--steps`` steps after ``--warmup``, on random token windows of
``--block`` tokens, ``--batch`` per step, round-robin ``--rounds`` times, medians:

- ``full``: every weight trains (``finetune.method=full``);
- ``lora``: ``finetune.method=lora`` with ``conf/finetune/default.yaml``'s adapters (r 8 on c_attn,
  c_proj, c_fc), the base frozen.

Both build the optimizer the train stage builds (``lmforge.training.optim.build_optimizer``, with
``conf/experiment/finetune.yaml``'s AdamW; ``--optimizer muon`` for Muon) and the adapters the
train stage injects (``lmforge.training.lora.apply_lora``). Reported: ms per step, peak memory
(CUDA: ``max_memory_allocated``; CPU: the process's peak resident set, which includes Python and
torch themselves: compare the difference), the optimizer state's bytes and what a checkpoint holds
(the trainable tensors). Prints ``lmforge info``'s machine block above the table and writes
``benchmarks/results/finetune.json``.

    python benchmarks/finetune.py                      # gpt2-small, CPU, a few steps
    python benchmarks/finetune.py --device cuda --steps 20 --block 1024 --batch 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"full": "full fine-tune (every weight trains)", "lora": "LoRA (conf/finetune/default.yaml's adapters)"}


def _tensor_bytes(tensors) -> int:
    """Bytes of ``tensors``, a tensor stored once counted once (tied embeddings and head)."""
    unique = {t.data_ptr(): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def run_side(side: str, args: dict, out) -> None:
    """Train one side in this (child) process and send its numbers through ``out``."""
    import torch
    from omegaconf import OmegaConf

    from lmforge.config.compose import compose_config
    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.training.lora import apply_lora, trainable_counts, trainable_names
    from lmforge.training.optim import build_optimizer

    torch.set_num_threads(args["threads"])
    cfg = compose_config(["experiment=finetune", f"model={args['model']}", f"finetune.method={side}",
                          f"optimizer={args['optimizer']}"], conf_dir=ROOT / "conf")
    config = OmegaConf.to_container(cfg.model, resolve=True)
    config["vocab_size"] = args["vocab"]
    device = torch.device(args["device"])
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict(config)).to(device)  # the same "base" for both sides
    if side == "lora":
        apply_lora(model, cfg.finetune, added_tokens=0)
        lora_lr = float(cfg.finetune.lora.lr)
    else:
        lora_lr = None
    model.train()
    optimizer = build_optimizer(model, cfg.optimizer, fused=device.type == "cuda", lora_lr=lora_lr)
    trainable, total = trainable_counts(model)
    generator = torch.Generator().manual_seed(1)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args["warmup"] + args["steps"]):
        x = torch.randint(0, args["vocab"], (args["batch"], args["block"] + 1), generator=generator).to(device)
        start = time.perf_counter()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args["warmup"]:
            times.append(time.perf_counter() - start)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    if hasattr(optimizer, "muon"):
        state = [t for o in (optimizer.muon, optimizer.adamw) for s in o.state.values() for t in s.values()
                 if torch.is_tensor(t)]
    keep = trainable_names(model)
    checkpoint = [v for k, v in model.state_dict().items() if k in keep]
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out.send({"ms_per_step": statistics.median(times) * 1000, "peak_memory_bytes": peak,
              "optimizer_state_bytes": _tensor_bytes(state), "checkpoint_bytes": _tensor_bytes(checkpoint),
              "trainable_parameters": trainable, "parameters": total})


def measure(side: str, args: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=run_side, args=(side, args, send))
    process.start()
    result = receive.recv()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small", help="a conf/model/ name: the base's shape")
    parser.add_argument("--vocab", type=int, default=50257, help="the base's vocabulary (GPT-2's by default)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block", type=int, default=128, help="tokens per window")
    parser.add_argument("--batch", type=int, default=2, help="windows per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/finetune.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from lmforge.training.hardware import format_info, machine_info

    machine = machine_info()
    print(format_info(machine) + "\n", flush=True)
    settings = {k: getattr(args, k) for k in ("model", "vocab", "optimizer", "device", "block", "batch", "steps",
                                               "warmup", "threads")}
    samples: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        for side in SIDES:
            samples[side].append(measure(side, settings))
            print(f"round {r + 1}: {side:5s} {samples[side][-1]['ms_per_step']:9.1f} ms/step", flush=True)
    rows = []
    for side, runs in samples.items():
        row = {key: runs[0][key] for key in runs[0]}
        row.update({"side": side, "what": SIDES[side], "rounds": runs,
                    "ms_per_step": statistics.median(r["ms_per_step"] for r in runs),
                    "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in runs)})
        rows.append(row)
    full, lora = rows
    lora["optimizer_state_vs_full"] = lora["optimizer_state_bytes"] / full["optimizer_state_bytes"]
    gpus = ", ".join(map(str, machine.get("gpus") or []))
    where = machine.get("cpu") if args.device == "cpu" else gpus or args.device
    print(f"\n{args.model} shape ({full['parameters'] / 1e6:.0f}M parameters), {args.optimizer}, {args.device} "
          f"({where}), {args.threads} thread(s), {args.batch} x {args.block} tokens per step, "
          f"{args.steps} steps x {args.rounds} rounds, medians\n")
    print("| method | trainable | ms/step | vs full | peak memory | optimizer state | vs full | checkpoint |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['what']} | {row['trainable_parameters'] / 1e6:.2f}M "
              f"({row['trainable_parameters'] / row['parameters']:.2%}) | {row['ms_per_step']:.0f} | "
              f"{row['ms_per_step'] / full['ms_per_step']:.2f}x | {row['peak_memory_bytes'] / 2**20:.0f} MiB | "
              f"{row['optimizer_state_bytes'] / 2**20:.1f} MiB | "
              f"{row['optimizer_state_bytes'] / full['optimizer_state_bytes']:.2%} | "
              f"{row['checkpoint_bytes'] / 2**20:.1f} MiB |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**settings, "rounds": args.rounds, "load_average": os.getloadavg(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.write_text(json.dumps({"machine": machine, "meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
