"""One request's life in the engine: its jobs, the events that come back, the answer whole or streamed.

A request of ``P`` prompts is ``P`` jobs submitted together (all or none: a full queue is a 503 with
``Retry-After``); each job's events come back to the event loop tagged with its prompt. Streaming
answers are Server-Sent Events in OpenAI's chunk format ending with ``data: [DONE]``: one chunk
per token, or per sample the tokens that piled up while the client was being served, so a busy
server sends fewer, larger chunks. The first event is awaited before the answer starts, so a
request the engine refuses (its queue wait ran out, it failed) is an HTTP error, not a 200 stream.
A client that leaves (mid-stream or while waiting for a whole answer) has its jobs cancelled,
which frees their slots at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from lmforge.inference.batching import EngineBusy, Event, Job
from lmforge.serving.answers import TokenTexts, choice, envelope, logprobs_block, new_id, usage
from lmforge.serving.protocol import ApiError, Ask

DISCONNECT_CHECK_S = 0.5


class Mailbox:
    """Events from the engine thread to the flights on ``loop`` (the server's), with one loop wake-up per burst.

    ``call_soon_threadsafe`` per event would write to the loop's wake-up pipe for each token of each
    stream; here the engine appends to one queue and wakes the loop only when no wake-up is pending,
    so a step's events for every stream cost one. It also wakes every waiting flight each
    ``DISCONNECT_CHECK_S`` seconds (one timer for them all, rather than a timeout per wait) so that
    a flight waiting long for its events still notices a client that left.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue, self.pending = loop, deque(), False
        self.waiting: set[Flight] = set()  # flights waiting for events, woken by the next tick
        self.ticker: asyncio.TimerHandle | None = None

    def wait(self, flight: Flight) -> None:
        """``flight`` waits for its events: wake it at the next tick at the latest."""
        self.waiting.add(flight)
        if self.ticker is None:
            self.ticker = self.loop.call_later(DISCONNECT_CHECK_S, self._tick)

    def _tick(self) -> None:
        self.ticker = None  # the next wait arms it again
        waiting, self.waiting = self.waiting, set()
        for flight in waiting:
            flight.wake()

    def post(self, flight: Flight, prompt: int, event: Event) -> None:
        """From the engine thread: deliver ``event`` to ``flight`` on the loop."""
        self.queue.append((flight, prompt, event))
        if not self.pending:  # a drain already scheduled will find it
            self.pending = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody will drain
                self.pending = False
                raise

    def _drain(self) -> None:
        self.pending = False  # before draining: an event posted from now on schedules a drain of its own
        while self.queue:
            flight, prompt, event = self.queue.popleft()
            flight.deliver(prompt, event)


class Disconnected(Exception):
    """The client left."""


@dataclass
class _Sample:
    """One choice as it is gathered."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list = field(default_factory=list)
    finish: str | None = None
    sent_text: int = 0  # streamed so far
    sent_tokens: int = 0


class Flight:
    """A request in the engine: ``prompt_ids`` (one list per prompt) sampled as ``ask`` says."""

    def __init__(self, engine, mailbox: Mailbox, ask: Ask, prompt_ids: list[list[int]], prompt_texts: list[str],
                 texts: TokenTexts, started: float):
        self.engine, self.ask, self.prompt_ids, self.prompt_texts = engine, ask, prompt_ids, prompt_texts
        self.texts, self.started = texts, started
        self.loop, self.mailbox = mailbox.loop, mailbox
        self.inbox: deque[tuple[int, Event]] = deque()  # events delivered, not yet taken
        self.waiter: asyncio.Future | None = None  # set while ``next`` waits for an event
        self.samples = [[_Sample() for _ in range(ask.samples)] for _ in prompt_ids]
        self.scores: list[list | None] = [None] * len(prompt_ids)  # each prompt's own logprobs (echo)
        top = ask.top_logprobs if ask.logprobs else 0
        self.jobs = [Job(ids, ask.sampling, self._emitter(p), ask.samples, ask.stop, ask.ignore_eos, top,
                         ask.echo and ask.logprobs, ask.generate, logprobs=ask.logprobs or bool(ask.best_of),
                         stop_ids=ask.stop_ids)
                     for p, ids in enumerate(prompt_ids)]
        self.open = len(self.jobs)
        self.completion_tokens = 0
        self.first_token = self.last_token = None
        self.last_check = self.loop.time()

    def _emitter(self, prompt: int):
        post = self.mailbox.post
        return lambda event: post(self, prompt, event)

    def deliver(self, prompt: int, event: Event) -> None:
        """Take an event from the engine (on the event loop, through the mailbox)."""
        self.inbox.append((prompt, event))
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def submit(self) -> None:
        try:
            self.engine.submit(*self.jobs)
        except EngineBusy as err:
            raise ApiError(503, f"the server is busy: {err} (lmforge serve --max-queue); send it again shortly.",
                           code="server_busy", kind="server_error", headers={"retry-after": "1"}) from None

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)

    async def next(self, request) -> tuple[int, Event]:
        """The next event (an error one raises ApiError); raises Disconnected once the client left."""
        while True:
            if self.loop.time() - self.last_check > DISCONNECT_CHECK_S:
                self.last_check = self.loop.time()
                if await request.is_disconnected():
                    raise Disconnected
            if not self.inbox:  # woken by an event, or by the mailbox's tick to look at the client again
                self.waiter = self.loop.create_future()
                self.mailbox.wait(self)
                try:
                    await self.waiter
                finally:
                    self.waiter = None
                continue
            prompt, event = self.inbox.popleft()
            if event.kind == "error":
                headers = {"retry-after": "1"} if event.status == 503 else None
                raise ApiError(event.status, f"the server could not finish this request: {event.text}",
                               code="server_busy" if event.status == 503 else "engine_error", kind="server_error",
                               headers=headers)
            return prompt, event

    def add(self, prompt: int, event: Event) -> None:
        """Take one event into the choices being gathered."""
        if event.kind == "done":
            self.open -= 1
        elif event.kind == "prompt":
            self.scores[prompt] = event.prompt
        else:
            s = self.samples[prompt][event.sample]
            s.text += event.text
            s.ids.append(event.token_id)
            s.logprobs.append(event.logprob)
            s.tops.append(event.top)
            s.finish = event.finish_reason or s.finish
            self.completion_tokens += 1
            self.last_token = time.perf_counter()
            self.first_token = self.first_token or self.last_token

    def echo_text(self, prompt: int) -> str:
        return self.prompt_texts[prompt] if self.ask.echo else ""

    def logprobs(self, prompt: int, s: _Sample, start: int = 0, offset: int = 0, echo: bool = False) -> dict | None:
        """The logprobs block of sample ``s``'s tokens from ``start`` (``echo``: the prompt's before them)."""
        if not self.ask.logprobs:
            return None
        ids, lps, tops = s.ids[start:], s.logprobs[start:], s.tops[start:]
        if echo and self.ask.echo:
            scores = self.scores[prompt] or []
            ids, lps = self.prompt_ids[prompt] + ids, [lp for lp, _ in scores] + lps
            tops = [t for _, t in scores] + tops
        wants_tops = self.ask.kind == "chat" or self.ask.top_logprobs > 0
        return logprobs_block(self.ask.kind, self.texts, ids, lps, tops if wants_tops else None, offset)

    def record(self, request, metrics) -> None:
        """The request's tokens for the access log and the metrics."""
        request.state.prompt_tokens, request.state.completion_tokens = self.prompt_tokens, self.completion_tokens
        ttft = tpot = None
        if self.first_token is not None:
            ttft = self.first_token - self.started
            steps = max(len(s.ids) for samples in self.samples for s in samples)
            tpot = (self.last_token - self.first_token) / (steps - 1) if steps > 1 else None
        metrics.tokens(self.prompt_tokens, self.completion_tokens, ttft, tpot)


async def whole(flight: Flight, request, name: str, extra: dict) -> dict | None:
    """The whole answer (None when the client left first)."""
    ask = flight.ask
    try:
        while flight.open:
            flight.add(*await flight.next(request))
    except Disconnected:
        return None
    choices = []
    for p, samples in enumerate(flight.samples):
        order = list(range(len(samples)))
        if ask.best_of:  # OpenAI's "best": the highest log-probability per token
            order.sort(key=lambda i: -sum(samples[i].logprobs) / max(1, len(samples[i].logprobs)))
        for rank, i in enumerate(order[: ask.n]):
            s = samples[i]
            choices.append(choice(ask.kind, p * ask.n + rank, flight.echo_text(p) + s.text,
                                  s.finish or ("length" if not ask.generate else None),
                                  flight.logprobs(p, s, echo=True)))
    out = envelope(ask.kind, new_id(ask.kind), name, choices, extra=extra)
    out["usage"] = usage(flight.prompt_tokens, flight.completion_tokens)
    return out


async def open_stream(flight: Flight, request, name: str, extra: dict) -> AsyncIterator[str] | None:
    """The stream of chunks, once the first event came (an error before it raises ApiError); None when
    the client left first."""
    try:
        first = await flight.next(request)
    except Disconnected:
        return None
    return _stream(flight, request, name, extra, first)


async def _stream(flight: Flight, request, name: str, extra: dict, first: tuple[int, Event]) -> AsyncIterator[str]:
    ask, answer_id, n = flight.ask, new_id(flight.ask.kind), flight.ask.n
    # Every chunk is the same envelope (one ``created``, as OpenAI's) around its choices: rendered once.
    # A '"choices": []' inside a string value would have its quotes escaped, so the split is unambiguous.
    head, tail = json.dumps(envelope(ask.kind, answer_id, name, [], chunk=True, extra=extra)).split(
        '"choices": []', 1)

    def chunk(choices: list[dict], **more) -> str:
        if more:
            body = envelope(ask.kind, answer_id, name, choices, chunk=True, extra={**extra, **more})
            return f"data: {json.dumps(body)}\n\n"
        return f'data: {head}"choices": {json.dumps(choices)}{tail}\n\n'

    try:
        if ask.kind == "chat":  # OpenAI opens each choice with the role
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(n)])
        if ask.echo and not ask.logprobs:  # the prompt's text first (with logprobs: once they are known)
            yield chunk([choice(ask.kind, p * n + i, flight.echo_text(p), None, None, chunk=True)
                         for p in range(len(flight.jobs)) for i in range(n)])
        batch = [first]
        while True:
            while flight.inbox:  # the client fell behind: what piled up goes as one chunk per sample
                batch.append(flight.inbox.popleft())
            pieces = _pieces(flight, batch)
            if pieces:  # one write for them all
                yield "".join(chunk([piece]) for piece in pieces)
            if not flight.open:
                break
            batch = [await flight.next(request)]
        if ask.include_usage:
            yield chunk([], usage=usage(flight.prompt_tokens, flight.completion_tokens))
        yield "data: [DONE]\n\n"
    except ApiError as err:
        yield f"data: {json.dumps(err.body())}\n\n"
    except Disconnected:
        pass
    finally:  # also reached when Starlette cancels the stream because the client left
        flight.cancel()


def _pieces(flight: Flight, batch: list[tuple[int, Event]]) -> list[dict]:
    """The chunk choices for a batch of events: one per sample that has new text or ended."""
    ask, n = flight.ask, flight.ask.n
    touched: dict[tuple[int, int], bool] = {}
    pieces = []
    for p, event in batch:
        if event.kind == "error":
            raise ApiError(event.status, f"the server could not finish this request: {event.text}", kind="server_error")
        flight.add(p, event)
        if event.kind == "prompt":  # echo with logprobs: the prompt's text and logprobs open each choice
            for i in range(n):
                pieces.append(choice(ask.kind, p * n + i, flight.echo_text(p), None,
                                     flight.logprobs(p, _Sample(), echo=True), chunk=True))
        elif event.kind == "token":
            touched[(p, event.sample)] = True
    for p, i in touched:
        s = flight.samples[p][i]
        text = s.text[s.sent_text:]
        if not text and s.finish is None:
            continue  # held back (a partial stop string or character): the tokens go with the next piece
        offset = len(flight.echo_text(p)) + s.sent_text
        logprobs = flight.logprobs(p, s, s.sent_tokens, offset)
        s.sent_tokens, s.sent_text = len(s.ids), len(s.text)
        pieces.append(choice(ask.kind, p * n + i, text, s.finish, logprobs, chunk=True))
    return pieces
