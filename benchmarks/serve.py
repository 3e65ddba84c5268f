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

    python benchmarks/serve.py --llama-cpp [--clients 1 16 32] [--new-tokens 128] [--threads 1] [--rounds 6]

Side by side with llama.cpp (issue 19): the same model exported to GGUF f32 and served by
llama-cpp-python's OpenAI server (``pip install 'llama-cpp-python[server]'``; ``--n_threads`` and
``--n_threads_batch`` = ``--threads``, ``--interrupt_requests False``), beside ``lmforge serve``
on the same number of threads; both get the same greedy requests (temperature 0, llama.cpp's
``repeat_penalty`` 1.0, at most ``--new-tokens`` tokens, no ``ignore_eos``: both stop where the
greedy text ends), five prompts of the plays, client i sending prompt i (one client sends all five
in turn). The greedy texts are checked equal first. Each round runs the two servers back to back
(alternating which goes first), so the ratio of a round compares them under the same neighbours;
the table gives the best round of each, the spread of the per-round ratios, time to first token,
the per-token latency (a stream's last chunk minus its first, over its tokens less one) and each
server's CPU time per token. llama-cpp-python's server answers one request at a time, so with
many clients the others queue: that is what continuous batching is measured against. Writes
``benchmarks/results/serve_llama_cpp.json``.
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
    return wait_until_up(subprocess.Popen(cmd, start_new_session=True), f"http://127.0.0.1:{port}/health",
                         "the server did not come up")


def wait_until_up(proc: subprocess.Popen, url: str, why: str) -> subprocess.Popen:
    """``proc`` once ``url`` answers 200 (at most a minute); else it is stopped and the run ends with ``why``."""
    for _ in range(600):
        try:
            if httpx.get(url).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit(why)


async def one_client(http, url: str, new_tokens: int, seed: int, body: dict | None = None) -> dict:
    body = body or {"model": "baby", "prompt": PROMPT, "max_tokens": new_tokens, "stream": True, "seed": seed,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    stamps, tokens, text = [], 0, ""
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now, chunk = time.perf_counter(), json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append((now, len(chunk["choices"][0]["text"])))
                text += chunk["choices"][0]["text"]
    # A client that falls behind gets several tokens in one chunk (one character each, here):
    # each of them counts as having taken its share of the gap.
    gaps = [(b - a) / n for (a, _), (b, n) in zip(stamps, stamps[1:]) for _ in range(n)]
    return {"ttft": stamps[0][0] - sent, "gaps": gaps, "tokens": tokens, "text": text,
            "span": stamps[-1][0] - stamps[0][0]}


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


# --- Side by side with llama.cpp (issue 19 item 6) -----------------------------------------------

# Prompts of the plays' own kind; client i of a round sends PROMPTS[i % len(PROMPTS)] to both servers.
PROMPTS = ["ROMEO:\nO ", "JULIET:\nWhat ", "HAMLET:\nTo be, or ", "KING LEAR:\nBlow, ", "PORTIA:\nThe quality "]


def start_llama_cpp(gguf: Path, port: int, block_size: int, threads: int) -> subprocess.Popen:
    """llama-cpp-python's OpenAI server on ``gguf``: ``threads`` threads, one request at a time."""
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "baby",
           "--port", str(port), "--n_ctx", str(block_size), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--interrupt_requests", "False", "--verbose", "False"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_until_up(proc, f"http://127.0.0.1:{port}/v1/models",
                         "llama-cpp-python's server did not come up (pip install 'llama-cpp-python[server]')")


def greedy_body(side: str, prompt: str, new_tokens: int) -> dict:
    """One streamed greedy completion; llama.cpp's repetition penalty (1.1 by default) turned off."""
    body = {"model": "baby", "prompt": prompt, "max_tokens": new_tokens, "stream": True, "temperature": 0.0}
    if side == "llama.cpp":
        return {**body, "repeat_penalty": 1.0}
    return {**body, "stream_options": {"include_usage": True}}


async def greedy_round(url: str, side: str, clients: int, new_tokens: int, lengths: dict[str, int]) -> dict:
    """One round of ``clients`` at once; each answer's tokens are lmforge's count for its prompt (the texts are
    checked equal, so llama.cpp's are the same tokens)."""
    # Client i sends prompts i, i + clients, ... in turn, so that every prompt is sent at least once.
    turns = [PROMPTS[i::clients] or [PROMPTS[i % len(PROMPTS)]] for i in range(clients)]

    async def client(http, mine: list[str]) -> list[dict]:
        return [await one_client(http, url, 0, 0, greedy_body(side, p, new_tokens)) for p in mine]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        start = time.perf_counter()
        done = await asyncio.gather(*(client(http, mine) for mine in turns))
        wall = time.perf_counter() - start
    prompts = [p for mine in turns for p in mine]
    results = [r for rs in done for r in rs]
    tokens = [lengths.get(p, r["tokens"]) for p, r in zip(prompts, results)]
    return {"wall": wall, "tokens": sum(tokens), "ttft": [r["ttft"] for r in results],
            "per_token": [r["span"] / max(1, n - 1) for r, n in zip(results, tokens)],
            "texts": {p: r["text"] for p, r in zip(prompts, results)}}


def side_by_side(args, tmp: Path) -> dict:
    """lmforge serve and llama-cpp-python's server on the f32 GGUF export of the same model, rounds alternating."""
    from lmforge.interop.gguf import export_gguf

    model_dir = build_model_dir(args.block_size, tmp)
    gguf = export_gguf(model_dir, tmp / "baby-f32.gguf", "f32")
    ports = {"lmforge": free_port(), "llama.cpp": free_port()}
    urls = {side: f"http://127.0.0.1:{port}" for side, port in ports.items()}
    procs = {"lmforge": start_server(model_dir, ports["lmforge"], max(args.clients), args.threads or 1),
             "llama.cpp": start_llama_cpp(gguf, ports["llama.cpp"], args.block_size, args.threads or 1)}
    rows: dict[int, dict] = {}
    try:
        # Warm-up, and the greedy check: each prompt's text the same from both servers.
        first = {side: asyncio.run(greedy_round(urls[side], side, len(PROMPTS), args.new_tokens, {}))
                 for side in procs}
        lengths = dict(zip(PROMPTS, [0] * len(PROMPTS)))
        for p in PROMPTS:
            one = asyncio.run(one_client_alone(urls["lmforge"], greedy_body("lmforge", p, args.new_tokens)))
            lengths[p] = one["tokens"]
        same = sum(first["lmforge"]["texts"][p] == first["llama.cpp"]["texts"][p] for p in PROMPTS)
        for clients in args.clients:
            runs: dict[str, list[dict]] = {side: [] for side in procs}
            cpu = dict.fromkeys(procs, 0.0)
            for r in range(args.rounds):
                order = list(procs) if r % 2 == 0 else list(reversed(procs))  # neither always goes first
                for side in order:
                    server = psutil.Process(procs[side].pid)
                    before = sum(server.cpu_times()[:2])
                    runs[side].append(asyncio.run(greedy_round(urls[side], side, clients, args.new_tokens, lengths)))
                    cpu[side] += sum(server.cpu_times()[:2]) - before
            rows[clients] = {side: _greedy_row(runs[side], cpu[side]) for side in procs}
            rates = [a["tokens"] / a["wall"] / (b["tokens"] / b["wall"])
                     for a, b in zip(runs["lmforge"], runs["llama.cpp"])]
            ours, theirs = rows[clients]["lmforge"], rows[clients]["llama.cpp"]
            rows[clients]["ratio_best"] = ours["tokens_per_second"] / theirs["tokens_per_second"]
            rows[clients]["ratio_rounds"] = sorted(rates)  # each round's pair ran back to back
            # Tokens per CPU-second of each server: what the neighbours on a shared machine change least.
            rows[clients]["ratio_cpu"] = theirs["server_cpu_ms_per_token"] / ours["server_cpu_ms_per_token"]
    finally:
        for proc in procs.values():
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    return {"greedy_prompts_equal": f"{same} of {len(PROMPTS)}", "tokens_per_prompt": lengths, "levels": rows}


async def one_client_alone(url: str, body: dict) -> dict:
    async with httpx.AsyncClient(timeout=600) as http:
        return await one_client(http, url, 0, 0, body)


def _greedy_row(runs: list[dict], cpu: float) -> dict:
    rates = [r["tokens"] / r["wall"] for r in runs]
    per_token = [t for r in runs for t in r["per_token"]]
    ttft = [t for r in runs for t in r["ttft"]]
    return {"tokens_per_second": max(rates), "tokens_per_second_median": statistics.median(rates),
            "tokens_per_second_rounds": rates, "ttft_p50_s": statistics.median(ttft),
            "per_token_p50_ms": 1000 * statistics.median(per_token),
            "server_cpu_ms_per_token": 1000 * cpu / sum(r["tokens"] for r in runs)}


def _pair(row: dict, key: str, scale: float, digits: int) -> str:
    """``key`` of lmforge / of llama.cpp, in milliseconds."""
    return f"{row['lmforge'][key] * scale:.{digits}f} / {row['llama.cpp'][key] * scale:.{digits}f} ms"


def print_side_by_side(result: dict, info: str, args) -> None:
    print(f"machine: {info}; each server on {args.threads or 1} thread(s)")
    print(f"model: baby (4 layers, 4 heads, 128 embedding, block {args.block_size}), f32 GGUF export for llama.cpp; "
          f"greedy, {args.new_tokens} tokens at most; greedy texts equal: {result['greedy_prompts_equal']} prompts; "
          f"{args.rounds} rounds")
    print("| clients | tokens/s lmforge (best, median) | llama.cpp | lmforge / llama.cpp: best, rounds (min, median, "
          "max) | TTFT p50 | per-token p50 | server CPU per token | tokens per CPU-second, lmforge / llama.cpp |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for clients, row in result["levels"].items():
        ours, theirs, rounds = row["lmforge"], row["llama.cpp"], row["ratio_rounds"]

        print(f"| {clients} | {ours['tokens_per_second']:.0f}, {ours['tokens_per_second_median']:.0f} | "
              f"{theirs['tokens_per_second']:.0f}, {theirs['tokens_per_second_median']:.0f} | "
              f"{row['ratio_best']:.2f}x; {rounds[0]:.2f}, {statistics.median(rounds):.2f}, {rounds[-1]:.2f} | "
              f"{_pair(row, 'ttft_p50_s', 1000, 0)} | {_pair(row, 'per_token_p50_ms', 1, 2)} | "
              f"{_pair(row, 'server_cpu_ms_per_token', 1, 2)} | {row['ratio_cpu']:.2f}x |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--llama-cpp", action="store_true",
                        help="side by side with llama-cpp-python's server on the f32 GGUF export (greedy)")
    args = parser.parse_args(argv)
    if args.llama_cpp:
        with tempfile.TemporaryDirectory() as tmp:
            info = machine()
            result = {"machine": info, "threads": args.threads or 1, "new_tokens": args.new_tokens,
                      "block_size": args.block_size, **side_by_side(args, Path(tmp))}
        print_side_by_side(result, info, args)
        out = ROOT / "benchmarks" / "results" / "serve_llama_cpp.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        return result

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
