"""`lmforge serve`: a model directory behind the OpenAI HTTP API, with streaming and batching.

    lmforge serve --model models/gpt          # or runs:/<run_id>/model, models:/<name>/<version>

Endpoints: ``GET /health`` (503 while the engine is down), ``GET /metrics`` (Prometheus),
``GET /v1/models`` and ``/v1/models/{id}``, ``POST /v1/completions`` and ``/v1/chat/completions``
(requests: ``lmforge.serving.protocol``; answers: ``answers`` and ``replies``; sampling:
``lmforge.inference``), and vLLM's ``POST /tokenize``, ``POST /detokenize`` and ``GET
/tokenizer_info``, with which lm-evaluation-harness's ``local-completions`` uses the server's own
tokenizer. Keys, body limits, read timeouts and the access log: ``guards``; every limit: ``limits``.

Supervision: a watchdog task checks the engine every second; if its thread died, ``/health``
answers 503 until the watchdog (or the next request) restarts it, and every request it held ends
with a 503 (``lmforge_engine_restarts_total`` counts the restarts).

Why FastAPI + uvicorn and an engine of our own rather than LitServe: LitServe's batching groups
the requests that arrive within a timeout and runs that batch to its end, so a request arriving
while a batch decodes waits for the whole batch, and one request's max_tokens holds up the
others (and its OpenAI spec covers chat only, not /v1/completions). Joining at the next step
needs a loop that owns the KV cache slots, which is ``lmforge.inference.batching``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lmforge.errors import LmforgeError
from lmforge.inference.batching import Engine
from lmforge.inference.chat import model_chat
from lmforge.inference.generation import encode_prompt
from lmforge.serving.answers import TokenTexts
from lmforge.serving.guards import Guard
from lmforge.serving.limits import Limits
from lmforge.serving.metrics import ServerMetrics
from lmforge.serving.protocol import ApiError, parse_ask
from lmforge.serving.replies import Flight, Mailbox, open_stream, whole

WATCH_EVERY_S = 1.0


def create_app(loaded, name: str, max_batch: int = 32, limits: Limits | None = None, keys: frozenset[str] = frozenset(),
               watch_every: float | None = WATCH_EVERY_S):
    """The ASGI app serving ``loaded`` (a ModelDir) as model ``name``; its engine is ``app.app.state.engine``.

    limits: ``Limits.for_model`` by default. keys: the API keys (empty: none needed). watch_every:
    seconds between the watchdog's looks at the engine (None: no watchdog; a request still revives it).
    Prompts past the block size are cropped to their last block_size tokens, as ``generate`` does.
    """
    limits = limits or Limits.for_model(loaded, max_batch)
    # Tokenizing a long prompt takes a while: off the event loop, on at most two threads.
    tokenizing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lmforge-tokenize")

    @asynccontextmanager
    async def lifespan(app):
        app.state.engine = Engine(loaded, max_batch, limits.max_queue, limits.queue_timeout)
        app.state.mailbox = Mailbox(asyncio.get_running_loop())
        watchdog = asyncio.create_task(_watch(app.state.engine, watch_every)) if watch_every else None
        yield
        if watchdog:
            watchdog.cancel()
        app.state.engine.close()
        tokenizing.shutdown(wait=False)

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.engine = None
    metrics = ServerMetrics(lambda: app.state.engine)
    _add_error_handlers(app)
    _add_info_routes(app, loaded, name, metrics)
    answering = _Answering(app, loaded, name, limits, tokenizing, metrics)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answering(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answering(request, "chat")

    _add_tokenizer_routes(app, loaded, limits, tokenizing)
    return Guard(app, keys, limits, metrics)


class _Answering:
    """POST /v1/completions and /v1/chat/completions: check, tokenize (off the loop), submit, answer."""

    def __init__(self, app, loaded, name: str, limits: Limits, tokenizing, metrics: ServerMetrics):
        self.app, self.loaded, self.name, self.limits = app, loaded, name, limits
        self.tokenizing, self.metrics = tokenizing, metrics
        self.chat, self.texts = model_chat(loaded), TokenTexts(loaded.tokenizer)

    async def __call__(self, request: Request, kind: str):
        loaded, engine = self.loaded, self.app.state.engine
        engine.revive()
        ask = parse_ask(await _json(request), kind, self.name, self.limits, self.chat,
                        loaded.model.config.vocab_size)
        ids = await asyncio.get_running_loop().run_in_executor(self.tokenizing, _encode_all, loaded, ask, self.limits)
        prompt_texts = [p if isinstance(p, str) else loaded.tokenizer.decode(p, skip_special_tokens=False)
                        for p in ask.prompts] if ask.echo else []
        block_size, longest = loaded.model.config.block_size, max(map(len, ids))
        extra = {"lmforge": {"prompt_tokens_used": min(longest, block_size), "prompt_cropped": longest > block_size}}
        if ask.chat_template:
            extra["lmforge"]["chat_template"] = ask.chat_template
        flight = Flight(engine, self.app.state.mailbox, ask, ids, prompt_texts, self.texts, request.state.started)
        flight.submit()
        if ask.stream:
            try:
                stream = await open_stream(flight, request, self.name, extra)
            except BaseException:
                flight.cancel()
                flight.record(request, self.metrics)
                raise
            return StreamingResponse(_recorded(stream, flight, request, self.metrics), media_type="text/event-stream")
        try:
            return await whole(flight, request, self.name, extra)
        finally:
            flight.cancel()  # a no-op once done; frees the slots when the client left or an error struck
            flight.record(request, self.metrics)


async def _watch(engine: Engine, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        engine.revive()


async def _recorded(stream, flight: Flight, request, metrics):
    try:
        if stream is not None:
            async for piece in stream:
                yield piece
    finally:
        flight.record(request, metrics)


async def _json(request: Request):
    try:
        return await request.json()
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON.", code="invalid_json") from None


def _encode_all(loaded, ask, limits: Limits) -> list[list[int]]:
    """Token ids of each prompt (run off the event loop); characters are counted before tokenizing."""
    param = "prompt" if ask.kind == "completion" else "messages"
    out = []
    for prompt in ask.prompts:
        if not isinstance(prompt, str):
            out.append(list(prompt))
            continue
        if len(prompt) > limits.max_prompt_chars:
            raise _too_long(f"{len(prompt)} characters", limits.max_prompt_chars, "characters", "--max-prompt-chars",
                            param)
        try:
            ids = encode_prompt(loaded, prompt)[0].tolist()
        except LmforgeError as err:
            raise ApiError(400, str(err), param=param, code="invalid_value") from None
        if len(ids) > limits.max_prompt_tokens:
            raise _too_long(f"{len(ids)} tokens", limits.max_prompt_tokens, "tokens", "--max-prompt-tokens", param)
        out.append(ids)
    return out


def _too_long(size: str, limit: int, unit: str, flag: str, param: str) -> ApiError:
    return ApiError(400, f"the prompt has {size}; this server accepts at most {limit} {unit} (lmforge serve {flag}).",
                    param=param, code="context_length_exceeded")


def _add_info_routes(app, loaded, name: str, metrics: ServerMetrics) -> None:
    model_card = {"id": name, "object": "model", "created": 0, "owned_by": "lmforge"}

    @app.get("/health")
    async def health():
        engine = app.state.engine
        body = {"status": "ok" if engine.alive() else "engine down", "model": name,
                "active_samples": engine.busy_slots(), "queued": engine.queued(), "forward_passes": engine.steps,
                "engine_restarts": engine.restarts}
        return JSONResponse(body, status_code=200 if engine.alive() else 503)

    @app.get("/metrics")
    async def prometheus():
        content, media_type = metrics.render()
        return Response(content, media_type=media_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {name!r}.",
                           param="model", code="model_not_found", kind="not_found_error")
        return model_card


def _template_source(loaded) -> str | None:
    template = model_chat(loaded).encoder.template
    return None if template.origin == "plain" else template.source


def _add_tokenizer_routes(app, loaded, limits: Limits, tokenizing) -> None:
    # vLLM's tokenizer endpoints, as lm-evaluation-harness's remote tokenizer calls them.
    tokenizer = loaded.tokenizer

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        eot = tokenizer.id_to_token(loaded.eot_id)
        return {"eos_token": eot, "bos_token": None, "pad_token": None, "chat_template": _template_source(loaded),
                "model_max_length": loaded.model.config.block_size, "vocab_size": tokenizer.get_vocab_size()}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _json(request)
        text = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise ApiError(400, "'prompt' must be a string.", param="prompt", code="invalid_value")
        if len(text) > limits.max_prompt_chars:
            raise _too_long(f"{len(text)} characters", limits.max_prompt_chars, "characters", "--max-prompt-chars",
                            "prompt")
        ids = await asyncio.get_running_loop().run_in_executor(
            tokenizing, lambda: tokenizer.encode(text, add_special_tokens=False).ids)
        return {"tokens": ids, "count": len(ids), "max_model_len": loaded.model.config.block_size}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _json(request)
        ids = body.get("tokens") if isinstance(body, dict) else None
        vocab = tokenizer.get_vocab_size()
        if not isinstance(ids, list) or len(ids) > limits.max_prompt_tokens or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
            raise ApiError(400, f"'tokens' must be a list of at most {limits.max_prompt_tokens} token ids from 0 to "
                           f"{vocab - 1}.", param="tokens", code="invalid_value")
        return {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}


def _add_error_handlers(app) -> None:
    # Every refusal in OpenAI's error shape, unknown paths and methods included.
    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(err.status_code, str(err.detail), kind=kind).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        return JSONResponse(ApiError(400, f"the request is malformed: {err.errors()[:1]}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def bug(request, err: Exception):  # a bug: still one request's error, in OpenAI's shape
        return JSONResponse(ApiError(500, f"the server failed on this request: {type(err).__name__}: {err}",
                                     kind="server_error").body(), status_code=500)
