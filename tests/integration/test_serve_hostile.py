"""`lmforge serve` against hostile and careless clients (issue 19 item 7), the real command in a
subprocess with a key: every hostile value of the issue, huge bodies, slow clients (half headers,
bodies that never arrive), clients that leave mid-stream, all at once; then nothing hangs, every bad
request was a 4xx, the server serves on with no slot left busy, its memory is within 50 MiB of where
it started, every request left one access-log line without its prompt, and /metrics counted it all."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import psutil
import pytest

from tests.helpers import free_port, stop_process_group
from tests.integration.test_openai_server import make_model_dir
from tests.integration.test_serve_supervision import HOSTILE

NAME, KEY = "tiny", "hostile-test-key"
SECRET = "nobody should log this prompt"  # a prompt sent many times: it must never reach the log
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("hostile") / "model")
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--name", NAME, "--port", str(port),
             "--max-batch", "8", "--max-tokens", "2000", "--header-timeout", "1", "--body-timeout", "1"],
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, env={**os.environ, "LMFORGE_API_KEY": KEY})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, proc, log
    finally:
        stop_process_group(proc)


def good(http) -> None:
    answer = http.post("/v1/completions", json={"model": NAME, "prompt": SECRET[:8], "max_tokens": 20, "seed": 1})
    assert answer.status_code == 200, answer.text


def hostile_value(url: str, change: dict, param: str) -> bool:
    body = json.dumps({"model": NAME, "prompt": SECRET, "max_tokens": 8, **change})
    response = httpx.post(f"{url}/v1/completions", content=body, timeout=60,
                          headers={**AUTH, "content-type": "application/json"})
    return response.status_code == 400 and response.json()["error"]["param"] == param


def huge(url: str) -> bool:
    big = json.dumps({"model": NAME, "prompt": "a" * 10_000_000}).encode()
    sized = httpx.post(f"{url}/v1/completions", content=big, headers=AUTH, timeout=60)
    streamed = httpx.post(f"{url}/v1/completions", content=(big[i:i + 2**20] for i in range(0, 3 * len(big), 2**20)),
                          headers=AUTH, timeout=60)  # 30 MB with no Content-Length
    return sized.status_code == streamed.status_code == 413


def slow(port: int) -> bool:
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthoriz")
    no_body = socket.create_connection(("127.0.0.1", port))
    no_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                    + f"Authorization: Bearer {KEY}\r\n\r\n".encode() + b'{"model": ')
    closed = []
    for sock in (half, no_body):
        sock.settimeout(60)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        closed.append(data)
        sock.close()
    return closed[0] == b"" and closed[1].startswith(b"HTTP/1.1 408")


def leaves(url: str, after: int) -> bool:
    body = {"model": NAME, "prompt": SECRET, "max_tokens": 2000, "ignore_eos": True, "n": 2, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= after:
                break
    return response.status_code == 200


def careless(url: str) -> bool:
    checks = [httpx.post(f"{url}/v1/completions", content=b"{broken", headers=AUTH).status_code == 400,
              httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x"}).status_code == 401,
              httpx.post(f"{url}/v1/completions", json=[1, 2], headers=AUTH).status_code == 400,
              httpx.get(f"{url}/v1/models/other", headers=AUTH).status_code == 404,
              httpx.delete(f"{url}/v1/completions", headers=AUTH).status_code == 405,
              httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "a" * 5000},
                         headers=AUTH).status_code == 400]
    return all(checks)


def test_hostile_clients_all_at_once_then_the_server_is_as_it_was(server):
    url, proc, log = server
    port = int(url.rsplit(":", 1)[1])
    memory = psutil.Process(proc.pid)
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        for _ in range(3):  # warm-up: every path once, the allocator's pools filled
            good(http)
            assert huge(url) and careless(url) and leaves(url, 5)
        time.sleep(1)
        rss_start = memory.memory_info().rss
        with ThreadPoolExecutor(max_workers=16) as pool:
            jobs = [pool.submit(hostile_value, url, change, param) for change, param in HOSTILE * 2]
            jobs += [pool.submit(huge, url) for _ in range(3)] + [pool.submit(slow, port) for _ in range(20)]
            jobs += [pool.submit(leaves, url, after) for after in range(0, 40, 4)]
            jobs += [pool.submit(careless, url) for _ in range(5)] + [pool.submit(good, http) for _ in range(10)]
            results = [job.result(timeout=300) for job in jobs]  # nothing hangs
        assert all(r in (True, None) for r in results), results
        for _ in range(100):  # the server notices the last leavers within a second or so
            if http.get("/health").json()["active_samples"] == 0:
                break
            time.sleep(0.2)
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["active_samples"] == 0 and health["engine_restarts"] == 0
        good(http)
        rss_end = memory.memory_info().rss
        assert rss_end - rss_start < 50 * 2**20, f"RSS grew from {rss_start >> 20} to {rss_end >> 20} MiB"
        metrics = http.get("/metrics").text
    refused = sum(float(v) for v in re.findall(r'lmforge_requests_total\{path="/v1/completions",status="4\d\d"} (\S+)',
                                               metrics))
    assert refused >= 2 * len(HOSTILE) and "lmforge_engine_restarts_total 0.0" in metrics
    assert re.search(r"lmforge_time_to_first_token_seconds_count [1-9]", metrics)
    assert re.search(r"lmforge_completion_tokens_total [1-9]", metrics)
    lines = log.read_text().splitlines()
    assert SECRET not in log.read_text()
    access = [line for line in lines if '"POST /v1/completions"' in line]
    assert len(access) >= 2 * len(HOSTILE) + 10 and any(" 413 " in line for line in access)
    assert any(re.search(r'" 200 \d+\.\d+s prompt_tokens=8 completion_tokens=[1-9]\d*$', line) for line in access)
