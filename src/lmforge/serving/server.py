"""`lmforge serve`: a model directory behind the OpenAI HTTP API, with streaming and batching.

    lmforge serve --model models/gpt          # or runs:/<run_id>/model, models:/<name>/<version>

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (request and answer shapes: ``lmforge.serving.protocol``;
sampling: ``lmforge.inference.batching``). Streaming answers are Server-Sent Events in OpenAI's chunk
format ending with ``data: [DONE]``: one chunk per token, or per sample the tokens that piled up
while the client was being served, so a busy server sends fewer, larger chunks. A client that
leaves (mid-stream or while waiting for a whole answer) has its job cancelled, which frees its
batch slots at the engine's next step.

Why FastAPI + uvicorn and an engine of our own rather than LitServe: LitServe's batching groups
the requests that arrive within a timeout and runs that batch to its end, so a request arriving
while a batch decodes waits for the whole batch, and one request's max_tokens holds up the
others (and its OpenAI spec covers chat only, not /v1/completions). Joining at the next step
needs a loop that owns the KV cache slots, which is ``lmforge.inference.batching``; FastAPI and uvicorn
(already installed with MLflow) carry the HTTP with a plain ``StreamingResponse``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lmforge.errors import LmforgeError
from lmforge.inference.batching import Engine, Event, Job
from lmforge.serving.protocol import ApiError, Ask, choice, envelope, logprobs_block, new_id, parse_ask, usage

CHAT_TEMPLATE_FILE = "chat_template.jinja"


class _Disconnected(Exception):
    pass


def chat_template_of(loaded) -> str | None:
    """The model directory's chat template (``chat_template.jinja`` or config.json's key), or None."""
    path = Path(loaded.path) / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return loaded.config.get("chat_template")


def create_app(loaded, name: str, max_batch: int = 32, max_prompt_tokens: int | None = None):
    """The FastAPI app serving ``loaded`` (a ModelDir) as model ``name``; its engine is ``app.state.engine``.

    max_prompt_tokens: longer prompts are refused with a 400 (default: 4 x block_size); prompts
    past the block size are cropped to their last block_size tokens, as ``generate`` does.
    """
    block_size = loaded.model.config.block_size
    limit = max_prompt_tokens or 4 * block_size
    template = chat_template_of(loaded)

    @asynccontextmanager
    async def lifespan(app):
        app.state.engine = Engine(loaded, max_batch)
        yield
        app.state.engine.close()

    app = FastAPI(title="lmforge", lifespan=lifespan)
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        engine = app.state.engine
        return {"status": "ok", "model": name, "active_samples": engine.busy_slots(), "forward_passes": engine.steps}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "lmforge"}]}

    async def answer(request: Request, kind: str):
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON.", code="invalid_json") from None
        ask = parse_ask(body, kind, name, max_batch, template)
        ids = _encode(loaded, ask, limit)
        extra = {"lmforge": {"prompt_tokens_used": min(len(ids), block_size), "prompt_cropped": len(ids) > block_size}}
        if ask.chat_template:
            extra["lmforge"]["chat_template"] = ask.chat_template
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = Job(ids, ask.sampling, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), ask.n, ask.stop,
                  ask.ignore_eos)
        app.state.engine.submit(job)
        if ask.stream:
            return StreamingResponse(_stream(request, loaded, ask, name, job, events, len(ids), extra),
                                     media_type="text/event-stream")
        try:
            return await _whole(request, loaded, ask, name, events, len(ids), extra)
        finally:
            job.cancel()  # a no-op once done; frees the slots when the client left or an error struck

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, "chat")

    return app


def _add_error_handlers(app) -> None:
    # Every refusal in OpenAI's error shape, unknown paths and methods included.
    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(err.status_code, str(err.detail), kind=kind).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        return JSONResponse(ApiError(400, f"the request is malformed: {err.errors()[:1]}").body(), status_code=400)


def _encode(loaded, ask: Ask, limit: int) -> list[int]:
    from lmforge.inference.generation import encode_prompt

    param = "prompt" if ask.kind == "completion" else "messages"
    try:
        ids = encode_prompt(loaded, ask.prompt)[0].tolist()
    except LmforgeError as err:
        raise ApiError(400, str(err), param=param, code="invalid_value") from None
    if len(ids) > limit:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {limit} "
                       "(lmforge serve --max-prompt-tokens).", param=param, code="context_length_exceeded")
    return ids


async def _next(request, events: asyncio.Queue, last_check: list[float]) -> Event:
    # Wait for the engine, checking every half second that the client is still there.
    loop = asyncio.get_running_loop()
    while True:
        if loop.time() - last_check[0] > 0.5:
            last_check[0] = loop.time()
            if await request.is_disconnected():
                raise _Disconnected
        try:
            event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            continue
        return _checked(event)


def _checked(event: Event) -> Event:
    if event.kind == "error":
        raise ApiError(500, f"the server failed while sampling: {event.text}", kind="server_error")
    return event


class _Samples:
    """Text, token logprobs and finish reasons of a job's samples, gathered from its events."""

    def __init__(self, loaded, ask: Ask):
        self.loaded, self.ask = loaded, ask
        self.text = [""] * ask.n
        self.tokens: list[list[str]] = [[] for _ in range(ask.n)]
        self.logprobs: list[list[float]] = [[] for _ in range(ask.n)]
        self.finish: list[str | None] = [None] * ask.n
        self.completion_tokens = 0

    def add(self, event: Event) -> None:
        self.completion_tokens += 1
        self.text[event.sample] += event.text
        self.finish[event.sample] = event.finish_reason
        if self.ask.logprobs:
            self.tokens[event.sample].append(self.loaded.tokenizer.decode([event.token_id], skip_special_tokens=False))
            self.logprobs[event.sample].append(event.logprob)


async def _whole(request, loaded, ask: Ask, name: str, events: asyncio.Queue, prompt_tokens: int, extra: dict):
    samples = _Samples(loaded, ask)
    checked = [asyncio.get_running_loop().time()]
    try:
        while (event := await _next(request, events, checked)).kind != "done":
            samples.add(event)
    except _Disconnected:
        return None
    choices = [choice(ask, i, samples.text[i], samples.finish[i],
                      logprobs_block(ask, samples.tokens[i], samples.logprobs[i])) for i in range(ask.n)]
    out = envelope(ask, new_id(ask.kind), name, choices, extra=extra)
    out["usage"] = usage(prompt_tokens, samples.completion_tokens)
    return out


async def _stream(request, loaded, ask: Ask, name: str, job: Job, events: asyncio.Queue, prompt_tokens: int,
                  extra: dict) -> AsyncIterator[str]:
    answer_id = new_id(ask.kind)
    samples = _Samples(loaded, ask)
    sent_tokens = [0] * ask.n  # tokens whose logprobs went out already, per sample
    sent_text = [0] * ask.n
    checked = [asyncio.get_running_loop().time()]

    def chunk(choices: list[dict], **more) -> str:
        return f"data: {json.dumps(envelope(ask, answer_id, name, choices, chunk=True, extra={**extra, **more}))}\n\n"

    try:
        if ask.kind == "chat":  # OpenAI opens each choice with the role
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(ask.n)])
        done = False
        while not done:
            batch = [await _next(request, events, checked)]
            while not events.empty():  # the client fell behind: what piled up goes as one chunk per sample
                batch.append(_checked(events.get_nowait()))
            finished: dict[int, str | None] = {}
            for event in batch:
                if event.kind == "done":
                    done = True
                    continue
                samples.add(event)
                finished[event.sample] = event.finish_reason or finished.get(event.sample)
            for i, reason in finished.items():
                text = samples.text[i][sent_text[i]:]
                if not text and reason is None:
                    continue  # held back (a partial stop string or character): the tokens go with the next piece
                logprobs = logprobs_block(ask, samples.tokens[i][sent_tokens[i]:], samples.logprobs[i][sent_tokens[i]:],
                                          sent_text[i])
                sent_tokens[i], sent_text[i] = len(samples.tokens[i]), len(samples.text[i])
                yield chunk([choice(ask, i, text, reason, logprobs, chunk=True)])
        if ask.include_usage:
            yield chunk([], usage=usage(prompt_tokens, samples.completion_tokens))
        yield "data: [DONE]\n\n"
    except ApiError as err:
        yield f"data: {json.dumps(err.body())}\n\n"
    except _Disconnected:
        pass
    finally:  # also reached when Starlette cancels the stream because the client left
        job.cancel()


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, tracking_uri: str | None = None,
          name: str | None = None, max_batch: int = 32, max_prompt_tokens: int | None = None,
          threads: int | None = None) -> None:
    """Load ``model`` (a directory or an MLflow URI) and serve it until interrupted."""
    import torch
    import uvicorn

    from lmforge.model.directory import fetch_model_dir, is_mlflow_uri, load_model_dir

    if max_batch < 1:
        raise LmforgeError(f"--max-batch {max_batch} must be at least 1.")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise LmforgeError(f"--max-prompt-tokens {max_prompt_tokens} must be at least 1.")
    if threads is not None:
        if threads < 1:
            raise LmforgeError(f"--threads {threads} must be at least 1.")
        torch.set_num_threads(threads)
    loaded = load_model_dir(fetch_model_dir(model, tracking_uri))
    name = name or (model if is_mlflow_uri(model) else Path(model).resolve().name)
    app = create_app(loaded, name, max_batch, max_prompt_tokens)
    print(f"lmforge: serving {name!r} on http://{host}:{port}/v1 (OpenAI API; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
