"""`lmforge serve` under concurrent streaming clients: aggregate tokens/s, time to first token and
inter-token latency, at 1, 4, 16 and 32 clients, in one run against one server.

    python benchmarks/serve.py [--clients 1 4 16 32] [--new-tokens 200] [--block-size 256] [--threads 1]

The model is the ``baby`` config (benchmarks/generate.py's ``build_model_dir``: 4 layers, 4 heads,
128 embedding, randomly initialised, the character vocabulary of the plays). The server runs in
its own process on 127.0.0.1 (``--max-batch`` = the most clients); the clients are one asyncio
process, each streaming one /v1/completions request of ``--new-tokens`` tokens (``ignore_eos``,
so every answer has that length, temperature 1, its own seed) after an 8-character prompt. Time to
first token runs from sending the request to the first text chunk; inter-token latency is the gap
between chunks, divided among the tokens of the later chunk (one chunk per token, except when a
client falls behind and the server sends what piled up at once). Aggregate tokens/s is all
completion tokens (from ``usage``) over the wall time of the round. Each level runs ``--rounds``
times after a warm-up; the table gives the best round's throughput and the latencies over all.
On a machine shared with other work the wall clock says as much about the neighbours as about
the server, so the table also gives the server process's CPU time per token (user + system),
which the neighbours do not change much: batching shows as that cost falling with more clients.

The bar (issue 11): aggregate throughput at 16 clients at least 4x one client's, and p99 time to
first token at 16 clients under 1 s. Prints a table and writes ``benchmarks/results/serve.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package uses
import psutil

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO:\nO "


def build_model_dir(block_size: int, out: Path) -> Path:
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "benchmarks" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_model_dir("gpt2", block_size, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, max_batch: int, threads: int | None,
                 extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--name", "baby",
           "--port", str(port), "--max-batch", str(max_batch), "--no-access-log", *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, start_new_session=True)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("the server did not come up")


async def one_client(http, url: str, new_tokens: int, seed: int) -> dict:
    body = {"model": "baby", "prompt": PROMPT, "max_tokens": new_tokens, "stream": True, "seed": seed,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    stamps, tokens = [], 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now, chunk = time.perf_counter(), json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append((now, len(chunk["choices"][0]["text"])))
    # A client that falls behind gets several tokens in one chunk (one character each, here):
    # each of them counts as having taken its share of the gap.
    gaps = [(b - a) / n for (a, _), (b, n) in zip(stamps, stamps[1:]) for _ in range(n)]
    return {"ttft": stamps[0][0] - sent, "gaps": gaps, "tokens": tokens}


async def round_of(url: str, clients: int, new_tokens: int, seed: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(http, url, new_tokens, seed + i) for i in range(clients)))
        wall = time.perf_counter() - start
    return {"wall": wall, "tokens": sum(r["tokens"] for r in results), "ttft": [r["ttft"] for r in results],
            "gaps": [g for r in results for g in r["gaps"]]}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
            f"load average {os.getloadavg()[0]:.1f} at the start")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args.block_size, Path(tmp))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        info = machine()
        proc = start_server(model_dir, port, max(args.clients), args.threads)
        server = psutil.Process(proc.pid)
        try:
            asyncio.run(round_of(url, 2, 20, 0))  # warm-up
            rows = {}
            for clients in args.clients:
                before = sum(server.cpu_times()[:2])
                rounds = [asyncio.run(round_of(url, clients, args.new_tokens, 1000 * r)) for r in range(args.rounds)]
                cpu = sum(server.cpu_times()[:2]) - before
                ttft = [t for r in rounds for t in r["ttft"]]
                gaps = [g for r in rounds for g in r["gaps"]]
                rows[clients] = {
                    "tokens_per_second": max(r["tokens"] / r["wall"] for r in rounds),
                    "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": percentile(ttft, 99),
                    "itl_p50_ms": 1000 * statistics.median(gaps), "itl_p99_ms": 1000 * percentile(gaps, 99),
                    "tokens_per_request": rounds[0]["tokens"] / clients,
                    "server_cpu_ms_per_token": 1000 * cpu / sum(r["tokens"] for r in rounds),
                }
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)

    base = rows[args.clients[0]]["tokens_per_second"]
    print(f"machine: {info}; server threads: {args.threads or 'torch default'}")
    print(f"model: baby (4 layers, 4 heads, 128 embedding, block {args.block_size}), "
          f"{args.new_tokens} tokens a request")
    print(f"{'clients':>7} {'tokens/s':>9} {'x 1 client':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
          f"{'ITL p99':>8} {'server CPU/token':>16}")
    for clients, r in rows.items():
        print(f"{clients:>7} {r['tokens_per_second']:>9.0f} {r['tokens_per_second'] / base:>10.1f} "
              f"{r['ttft_p50_s'] * 1000:>7.0f}ms {r['ttft_p99_s'] * 1000:>7.0f}ms "
              f"{r['itl_p50_ms']:>6.1f}ms {r['itl_p99_ms']:>6.1f}ms {r['server_cpu_ms_per_token']:>14.2f}ms")
    result = {"machine": info, "threads": args.threads, "new_tokens": args.new_tokens, "block_size": args.block_size,
              "levels": {str(c): r for c, r in rows.items()}}
    out = ROOT / "benchmarks" / "results" / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
