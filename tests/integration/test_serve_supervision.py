"""`lmforge serve`'s engine under faults: an app served in this process (so a test can break its
engine), a failure in one request answered as that request's error while the others go on, a
dead engine thread reported by /health (503) and restarted, and every hostile sampling value of
issue 19 refused with a 400 naming its field, the engine serving on afterwards."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx2 as httpx
import pytest
import uvicorn

from lmforge.model.directory import load_model_dir
from lmforge.serving.guards import header_timeout_protocol
from lmforge.serving.limits import Limits
from lmforge.serving.server import create_app
from tests.helpers import free_port
from tests.integration.test_openai_server import make_model_dir

NAME = "tiny"


@contextlib.contextmanager
def served(app, header_timeout: float = 10.0):
    """Serve ``app`` (create_app's) on 127.0.0.1 in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           http=header_timeout_protocol(header_timeout)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if server.started:
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model_dir(make_model_dir(tmp_path_factory.mktemp("supervised") / "model"))


def engine_of(app):
    return app.app.state.engine  # the Guard's app is the FastAPI app


def body(**fields) -> dict:
    return {"model": NAME, "prompt": "the king", "max_tokens": 8, "seed": 1, **fields}


def test_a_fault_in_one_request_fails_that_request_and_the_next_is_served(loaded, monkeypatch):
    app = create_app(loaded, NAME, max_batch=4, limits=Limits.for_model(loaded, 4, max_tokens=10_000))
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        engine = engine_of(app)
        draw = engine._draw

        def faulty(rows, logits, *probs):  # an injected fault for the request whose prompt is "love"
            if engine.active[rows[0]].job.prompt_ids == [loaded.tokenizer.token_to_id(c) for c in "love"]:
                raise RuntimeError("injected fault")
            return draw(rows, logits, *probs)

        monkeypatch.setattr(engine, "_draw", faulty)
        with http.stream("POST", "/v1/completions", json=body(max_tokens=400, ignore_eos=True, stream=True,
                                                          stream_options={"include_usage": True})) as other:
            lines = other.iter_lines()
            next(lines)  # the other stream is running
            failed = http.post("/v1/completions", json=body(prompt="love"))
            assert failed.status_code == 500
            assert failed.json()["error"]["type"] == "server_error" and "injected fault" in failed.json()["error"][
                "message"]
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"  # the other stream went on to its end
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 400
        served_next = http.post("/v1/completions", json=body(ignore_eos=True))
        assert served_next.status_code == 200 and served_next.json()["choices"][0]["finish_reason"] == "length"
        assert http.get("/health").json()["status"] == "ok"
        assert "lmforge_failed_jobs_total 1.0" in http.get("/metrics").text


class Fatal(BaseException):
    """Escapes every ``except Exception``: the engine thread dies of it."""


def kill_engine(engine, monkeypatch, http) -> threading.Thread:
    """Make the engine thread die on the step of a request sent now; returns the thread of that request
    (its ``.status`` is the status it got)."""

    def die():
        raise Fatal

    monkeypatch.setattr(engine, "_step", die)
    thread = engine.thread

    def held():
        held_request.status = http.post("/v1/completions", json=body()).status_code

    held_request = threading.Thread(target=held)
    held_request.start()
    thread.join(timeout=60)
    monkeypatch.undo()
    assert not engine.alive()
    return held_request


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies on purpose
def test_a_dead_engine_is_a_503_on_health_and_is_restarted(loaded, monkeypatch):
    app = create_app(loaded, NAME, max_batch=4, watch_every=None)  # no watchdog: the next request revives it
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        engine = engine_of(app)
        held = kill_engine(engine, monkeypatch, http)
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "engine down"
        assert http.post("/v1/completions", json=body()).status_code == 200
        held.join(timeout=60)
        assert held.status == 503  # what the dead engine held: "send it again"
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["engine_restarts"] == 1
        assert "lmforge_engine_restarts_total 1.0" in http.get("/metrics").text

    app = create_app(loaded, NAME, max_batch=4, watch_every=0.1)  # with the watchdog: restarted unasked
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        held = kill_engine(engine_of(app), monkeypatch, http)
        held.join(timeout=60)
        assert held.status == 503
        assert http.get("/health").json()["engine_restarts"] == 1
        assert http.post("/v1/completions", json=body()).status_code == 200


# Issue 19's hostile values (and their neighbours): each a 400 naming its field, nothing breaks.
HOSTILE = [
    ({"seed": 2**70}, "seed"), ({"seed": -(2**70)}, "seed"), ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"), ({"repetition_penalty": 1e-300},
                                                                    "repetition_penalty"),
    ({"top_p": float("nan")}, "top_p"), ({"top_p": 0}, "top_p"), ({"top_k": 2**70 + 0.5}, "top_k"),
    ({"logit_bias": {"0": 1e308}}, "logit_bias"), ({"logit_bias": {"0": float("nan")}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"presence_penalty": 1e9}, "presence_penalty"), ({"frequency_penalty": float("-inf")}, "frequency_penalty"),
    ({"max_tokens": 2**70}, "max_tokens"), ({"max_tokens": 1e9}, "max_tokens"), ({"n": 32}, "n"),
    ({"n": 2, "best_of": 1}, "best_of"), ({"prompt": [[]]}, "prompt"), ({"prompt": [10**6]}, "prompt"),
    ({"prompt": [-1]}, "prompt"), ({"prompt": []}, "prompt"), ({"suffix": "x"}, "suffix"),
]
# In range, but once able to make the sampler see inf or nan: each is served.
EDGES = [{"top_p": 1e-300}, {"temperature": 1e-300}, {"repetition_penalty": 0.01}, {"repetition_penalty": 100},
         {"logit_bias": {"0": 100, "1": -100}}, {"seed": 2**64 - 1}, {"seed": 0}, {"presence_penalty": -2}]


def test_hostile_sampling_values_are_400s_and_edges_are_served(loaded):
    app = create_app(loaded, NAME, max_batch=4)
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        for change, param in HOSTILE:
            response = http.post("/v1/completions", content=json.dumps(body(**change)),
                                 headers={"content-type": "application/json"})
            assert response.status_code == 400, (change, response.text)
            assert response.json()["error"]["param"] == param, (change, response.text)
        for change in EDGES:
            response = http.post("/v1/completions", json=body(**change))
            assert response.status_code == 200, (change, response.text)
        engine = engine_of(app)
        assert engine.alive() and engine.failed_jobs == 0 and engine.restarts == 0
