"""A load run of `lmforge serve`: good, bad and disconnecting clients for a while, then checks.

    python benchmarks/serve_load.py [--seconds 120] [--workers 8] [--out benchmarks/results/serve_load.json]

One server on 127.0.0.1 (the baby model of benchmarks/serve.py, block 256); ``--workers``
asyncio clients loop until the time is up, each request drawn at random among:

* good: a completion or chat request, streamed or not, n of 1 or 2, with a seed, a stop string
  and its own settings; its answer must equal the one the server gave when the same request
  was sent alone before the run (the reference), and carry correct ``usage``;
* bad: a bad value (top_p=3, max_tokens=0, an unknown field, an unknown model, a prompt past
  the limit, broken JSON, ...); it must be refused with a 4xx in OpenAI's error shape;
* leaving: a long streamed or whole request whose client hangs up after a few chunks or 0.3 s;
* hostile (issue 19): a value once able to stop the engine (seed past 64 bits, NaN temperature,
  repetition_penalty 1e-300, logit_bias 1e308, max_tokens 2**70, n 32, ...), a 10 MB body, a
  client that sends half its headers or half its body and stalls; each must be refused with a
  4xx (or, for the stalled ones, the connection closed by the server) within the time limit.

At the end: every good answer correct, every bad or hostile one a 4xx, nothing hung (each request
has a time limit), no sample left running and no engine restart (``/health``), and the server's
resident memory (RSS) within 50 MiB of where it stood after the warm-up. Prints a summary and
writes ``benchmarks/results/serve_load.json``; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import build_model_dir, free_port, machine, start_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO:\nO ", "JULIET:\nWhat ", "KING LEAR:\nNothing ", "HAMLET:\nTo be"]
BAD = [({"top_p": 3}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
       ({"n": 99}, "n"), ({"top-k": 3}, "top-k"), ({"model": "gpt-4"}, "model"), ({"stop": 5}, "stop"),
       ({"prompt": "a" * 2000}, "prompt"), ({"seed": "x"}, "seed"), ({"repetition_penalty": 0}, "repetition_penalty")]
HOSTILE = [({"seed": 2**70}, "seed"), ({"seed": -(2**70)}, "seed"), ({"temperature": float("nan")}, "temperature"),
           ({"repetition_penalty": float("nan")}, "repetition_penalty"),
           ({"repetition_penalty": 1e-300}, "repetition_penalty"), ({"top_p": float("nan")}, "top_p"),
           ({"logit_bias": {"0": 1e308}}, "logit_bias"), ({"max_tokens": 2**70}, "max_tokens"),
           ({"max_tokens": 1e9}, "max_tokens"), ({"n": 32, "max_tokens": 10**9, "ignore_eos": True}, "n"),
           ({"presence_penalty": float("inf")}, "presence_penalty"), ({"prompt": [10**9]}, "prompt")]
SLOW_TIMEOUT_S = 2  # the server's --header-timeout and --body-timeout in this run


def good_requests(rng: random.Random, count: int) -> list[tuple[str, dict]]:
    """``count`` distinct good requests: (path, body) without ``stream``."""
    out = []
    for i in range(count):
        body = {"model": "baby", "max_tokens": rng.choice([8, 30, 60]), "seed": i, "n": rng.choice([1, 1, 2]),
                "temperature": rng.choice([0, 0.8, 1.0]), "top_k": rng.choice([None, 20]), "stop": ["\n\n"]}
        if i % 3 == 2:
            messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
            out.append(("/v1/chat/completions", {**body, "messages": messages}))
        else:
            out.append(("/v1/completions", {**body, "prompt": rng.choice(PROMPTS)}))
    return out


async def ask(http, url: str, path: str, body: dict, stream: bool) -> tuple[list[str], dict]:
    """Texts of the choices and the usage of one request, streamed or not."""
    if not stream:
        response = await http.post(url + path, json=body)
        response.raise_for_status()
        data = response.json()
        texts = [c["text"] if "text" in c else c["message"]["content"] for c in data["choices"]]
        return texts, data["usage"]
    texts, usage = [""] * body["n"], {}
    async with http.stream("POST", url + path, json={**body, "stream": True,
                                                      "stream_options": {"include_usage": True}}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                texts[c["index"]] += c.get("text") or c.get("delta", {}).get("content") or ""
    return texts, usage


async def bad_request(http, url: str, rng: random.Random) -> bool:
    """Send one bad request; True when it was refused with a 4xx naming the field."""
    if rng.random() < 0.1:
        response = await http.post(url + "/v1/completions", content=b"{broken",
                                   headers={"content-type": "application/json"})
        return 400 <= response.status_code < 500 and "error" in response.json()
    change, param = rng.choice(BAD)
    response = await http.post(url + "/v1/completions", json={"model": "baby", "prompt": "ROMEO:", **change})
    return 400 <= response.status_code < 500 and response.json()["error"]["param"] == param


async def leave(http, url: str, rng: random.Random) -> None:
    body = {"model": "baby", "prompt": rng.choice(PROMPTS), "max_tokens": 5000, "ignore_eos": True, "n": 2}
    if rng.random() < 0.5:
        async with http.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as response:
            lines = 0
            async for _ in response.aiter_lines():
                lines += 1
                if lines > rng.randint(2, 20):
                    break
    else:
        try:
            await http.post(url + "/v1/completions", json=body, timeout=0.3)
        except httpx.TimeoutException:
            pass


async def hostile(http, url: str, rng: random.Random) -> bool:
    """Send one hostile request; True when it was refused with a 4xx (or, stalled, closed by the server)."""
    kind = rng.choices(["value", "huge", "stall"], weights=[8, 1, 1])[0]
    if kind == "value":
        change, param = rng.choice(HOSTILE)
        body = json.dumps({"model": "baby", "prompt": "ROMEO:", **change})  # json writes NaN as the server reads it
        response = await http.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        return 400 <= response.status_code < 500 and response.json()["error"]["param"] == param
    if kind == "huge":
        response = await http.post(url + "/v1/completions", content=b'{"prompt": "' + b"a" * 10_000_000 + b'"}')
        return response.status_code == 413
    return await asyncio.to_thread(stall, url, rng.random() < 0.5)


def stall(url: str, half_headers: bool) -> bool:
    """A client that stops sending: the server must close the connection (after a 408 for a body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10 * SLOW_TIMEOUT_S) as sock:
        if half_headers:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        else:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n{")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data == b"" if half_headers else data.startswith(b"HTTP/1.1 408")


async def worker(url: str, seed: int, deadline: float, goods: list, references: list, tally: dict) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=120) as http:
        while time.monotonic() < deadline:
            kind = rng.choices(["good", "bad", "leave", "hostile"], weights=[6, 3, 1, 2])[0]
            if kind == "hostile":
                try:
                    ok = await asyncio.wait_for(hostile(http, url, rng), timeout=60)
                except (asyncio.TimeoutError, OSError):
                    ok = False  # hung, or the socket timed out
                tally["hostile_refused" if ok else "hostile_not_refused"] += 1
            elif kind == "good":
                i = rng.randrange(len(goods))
                texts, usage = await ask(http, url, *goods[i], stream=rng.random() < 0.5)
                ok = texts == references[i][0] and usage == references[i][1]
                tally["good_ok" if ok else "good_wrong"] += 1
            elif kind == "bad":
                tally["bad_refused" if await bad_request(http, url, rng) else "bad_accepted"] += 1
            else:
                await leave(http, url, rng)
                tally["left"] += 1


async def run(url: str, seconds: float, workers: int) -> dict:
    goods = good_requests(random.Random(0), 24)
    async with httpx.AsyncClient(timeout=120) as http:  # the references: each request alone
        references = [await ask(http, url, path, body, stream=False) for path, body in goods]
    tally = dict.fromkeys(["good_ok", "good_wrong", "bad_refused", "bad_accepted", "left", "hostile_refused",
                           "hostile_not_refused"], 0)
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(worker(url, i, deadline, goods, references, tally) for i in range(workers)))
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(256, Path(tmp))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        info = machine()
        proc = start_server(model_dir, port, 16, 1, ("--header-timeout", str(SLOW_TIMEOUT_S), "--body-timeout",
                                                     str(SLOW_TIMEOUT_S), "--max-tokens", "5000"))
        server = psutil.Process(proc.pid)
        try:
            asyncio.run(run(url, 3, 4))  # warm-up: every path once, allocator pools filled
            rss_start = server.memory_info().rss
            started = time.monotonic()
            tally = asyncio.run(run(url, args.seconds, args.workers))
            elapsed = time.monotonic() - started
            time.sleep(2)  # let cancelled jobs be noticed
            health = httpx.get(url + "/health").json()
            rss_end = server.memory_info().rss
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    growth = rss_end - rss_start
    checks = {"every good answer correct": tally["good_wrong"] == 0 and tally["good_ok"] > 0,
              "every bad request a 4xx": tally["bad_accepted"] == 0 and tally["bad_refused"] > 0,
              "every hostile request refused, none hung": tally["hostile_not_refused"] == 0
              and tally["hostile_refused"] > 0,
              "no sample left running, no engine restart": health["active_samples"] == 0
              and health["engine_restarts"] == 0,
              "memory within 50 MiB": growth < 50 * 2**20}
    print(f"machine: {info}")
    print(f"{elapsed:.0f} s, {args.workers} workers: {tally}")
    print(f"server RSS {rss_start / 2**20:.0f} MiB after warm-up, {rss_end / 2**20:.0f} MiB at the end "
          f"({growth / 2**20:+.1f} MiB)")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "seconds": elapsed, "workers": args.workers, "tally": tally,
                               "rss_start": rss_start, "rss_end": rss_end, "checks": checks}, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
