"""`lmforge serve`'s limits (issue 19 item 2), each an OpenAI-shaped refusal: body size (413), prompt
characters before tokens, tokenization off the event loop, prompts per request, a bounded queue and a
queue timeout (503 + Retry-After), and slow clients dropped: half-sent headers, bodies that never
arrive, connections that send nothing. Raw sockets play the slow clients."""

from __future__ import annotations

import json
import socket
import threading

import httpx2 as httpx
import pytest

import lmforge.serving.server as server_module
from lmforge.model.directory import load_model_dir
from lmforge.serving.limits import Limits
from lmforge.serving.server import create_app
from tests.integration.test_openai_server import make_model_dir
from tests.integration.test_serve_supervision import NAME, body, engine_of, served


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model_dir(make_model_dir(tmp_path_factory.mktemp("limits") / "model"))


def post_raw(url: str, payload: bytes, **headers) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", content=payload, timeout=60,
                      headers={"content-type": "application/json", **headers})


def test_body_size_and_prompt_characters_are_refused_before_the_work(loaded, monkeypatch):
    limits = Limits.for_model(loaded, 4, max_body_bytes=64 * 2**20, max_prompt_tokens=100)
    app = create_app(loaded, NAME, max_batch=4, limits=limits)
    assert limits.max_prompt_chars == 100 * len("<|endoftext|>") * 2
    with served(app) as url:
        calls = []
        monkeypatch.setattr(server_module, "encode_prompt", lambda *a: calls.append(a))
        huge = json.dumps(body(prompt="a" * 10_000_000)).encode()
        refused = post_raw(url, huge)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
        assert "10000000 characters" in refused.json()["error"]["message"] and "--max-prompt-chars" in refused.text
        assert calls == []  # refused on its length: the tokenizer never saw it
    monkeypatch.undo()
    app = create_app(loaded, NAME, max_batch=4, limits=Limits.for_model(loaded, 4, max_body_bytes=1000))
    with served(app) as url:
        too_big = post_raw(url, json.dumps(body(prompt="a" * 2000)).encode())
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
        assert "--max-body-bytes" in too_big.json()["error"]["message"]
        chunked = httpx.post(f"{url}/v1/completions", content=iter([b"x" * 600, b"y" * 600]), timeout=60)
        assert chunked.status_code == 413  # no Content-Length: counted as it arrives
        assert post_raw(url, json.dumps(body()).encode()).status_code == 200


def test_tokenizing_happens_off_the_event_loop(loaded, monkeypatch):
    app = create_app(loaded, NAME, max_batch=4)
    started, release = threading.Event(), threading.Event()
    encode = server_module.encode_prompt

    def slow_encode(model, prompt):  # a tokenizer busy for as long as the test says
        if prompt == "the slow one":
            started.set()
            release.wait(60)
        return encode(model, prompt)

    monkeypatch.setattr(server_module, "encode_prompt", slow_encode)
    with served(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        result = {}
        slow = threading.Thread(target=lambda: result.update(r=http.post("/v1/completions", json=body(
            prompt="the slow one"))))
        slow.start()
        assert started.wait(30)
        # The tokenizer is busy with the slow prompt: the loop still answers others.
        assert http.get("/health").status_code == 200
        assert http.post("/v1/completions", json=body()).status_code == 200
        release.set()
        slow.join(60)
        assert result["r"].status_code == 200


def test_too_many_prompts_and_a_full_queue_are_refused(loaded):
    limits = Limits.for_model(loaded, 1, max_queue=1, queue_timeout=0.5, max_tokens=10**6, max_prompts=3)
    app = create_app(loaded, NAME, max_batch=1, limits=limits)
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        many = http.post("/v1/completions", json=body(prompt=["a", "b", "c", "d"]))
        assert many.status_code == 400 and "--max-prompts" in many.json()["error"]["message"]
        hog = body(max_tokens=10**6, ignore_eos=True, stream=True)
        with http.stream("POST", "/v1/completions", json=hog) as running:
            lines = running.iter_lines()  # kept: an iterator dropped would close the response
            next(lines)  # the only slot is taken
            waited = http.post("/v1/completions", json=body())  # waits 0.5 s in the queue, then 503
            assert waited.status_code == 503 and waited.headers["retry-after"] == "1"
            assert "waited more than 0.5 s" in waited.json()["error"]["message"]
            engine = engine_of(app)
            result = {}
            queued = threading.Thread(target=lambda: result.update(r=http.post("/v1/completions", json=body())))
            queued.start()
            while engine.queued() == 0:
                queued.join(0.01)
            full = http.post("/v1/completions", json=body())  # the queue holds one: refused at once
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["code"] == "server_busy" and "--max-queue" in full.json()["error"]["message"]
            queued.join(60)
        assert http.post("/v1/completions", json=body()).status_code == 200


def closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes ``sock`` (a 60 s guard against a server that never does)."""
    sock.settimeout(60)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_slow_clients_are_dropped(loaded):
    limits = Limits.for_model(loaded, 4, body_timeout=1.0)
    app = create_app(loaded, NAME, max_batch=4, limits=limits)
    with served(app, header_timeout=1.0) as url:
        port = int(url.rsplit(":", 1)[1])
        half_headers = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        for sock in half_headers:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        silent = socket.create_connection(("127.0.0.1", port))
        no_body = socket.create_connection(("127.0.0.1", port))
        no_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"model\"")
        kept_alive = socket.create_connection(("127.0.0.1", port))
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /heal")  # a second request, half sent
        for sock in half_headers + [silent]:
            assert closed_by_server(sock) == b""
        answer = closed_by_server(no_body)
        assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer
        assert closed_by_server(kept_alive).startswith(b"HTTP/1.1 200")  # the first answered, then dropped
        for sock in half_headers + [silent, no_body, kept_alive]:
            sock.close()
        assert httpx.post(f"{url}/v1/completions", json=body(), timeout=60).status_code == 200
