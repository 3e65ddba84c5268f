"""What stands between the network and the API: keys, body size and read time, header read time, the access log.

``Guard`` is the outermost ASGI middleware. For each HTTP request it

* checks the API key: with keys configured, every path but ``/health`` needs
  ``Authorization: Bearer <key>`` (compared in constant time) or answers 401 in OpenAI's shape;
* reads the whole body before the app sees it: a body over ``max_body_bytes`` is a 413 (read on
  and dropped, so the client sees the answer rather than a reset, up to 16 times the limit; a
  ``Content-Length`` beyond that is refused unread), a body not complete within ``body_timeout``
  seconds a 408; each closes the connection;
* writes one access-log line (client, method, path, status, seconds, prompt and completion tokens;
  never the prompt's text) and counts the request in the metrics.

uvicorn closes idle keep-alive connections but has no limit on the time a client may take to send
its request line and headers, so ``header_timeout_protocol`` gives uvicorn an HTTP/1.1 protocol
(its own h11 one) that closes a connection whose request head is not complete within
``header_timeout`` seconds of the connection opening or of its first byte after a response.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

from lmforge.serving.protocol import ApiError

ACCESS_LOG = logging.getLogger("lmforge.access")
OPEN_PATHS = {"/health"}
DRAIN_FACTOR = 16  # a body over the limit is read and dropped up to this many times the limit


class Guard:
    """ASGI middleware around ``app``: keys (a set; empty: none needed), ``limits``, ``metrics``."""

    def __init__(self, app, keys: frozenset[str], limits, metrics):
        self.app, self.keys, self.limits, self.metrics = app, keys, limits, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state["started"] = started
        status = [0]

        async def send_seen(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.keys and scope["path"] not in OPEN_PATHS:
                self._authorize(scope)
            receive = await self._read_body(scope, receive)
        except ApiError as err:
            await send_error(send_seen, err, close=err.status in (408, 413))
        else:
            await self.app(scope, receive, send_seen)
        finally:
            self._record(scope, status[0] or 499, started)  # 499: the client left before an answer

    def _authorize(self, scope) -> None:
        header = _header(scope, b"authorization")
        scheme, _, token = header.partition(" ")
        # Every key is compared, each in constant time: the time taken says nothing of which matched.
        matched = [hmac.compare_digest(token.strip().encode(), key.encode()) for key in self.keys]
        if scheme.lower() != "bearer" or not any(matched):
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer <key>' with one of the keys "
                           "this server was started with.", code="invalid_api_key",
                           headers={"www-authenticate": "Bearer"})

    async def _read_body(self, scope, receive):
        limit = self.limits.max_body_bytes
        length = _header(scope, b"content-length")
        if not length and not _header(scope, b"transfer-encoding"):
            return receive  # no body (a GET)
        if length.isdigit() and int(length) > DRAIN_FACTOR * limit:
            raise _too_large(limit)  # too large to read even to drop it: the connection just closes
        too_large = length.isdigit() and int(length) > limit
        kept, seen = bytearray(), 0
        deadline = asyncio.get_running_loop().time() + self.limits.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                if too_large:
                    raise _too_large(limit) from None
                raise ApiError(408, f"the request body did not arrive within {self.limits.body_timeout:g} s "
                               "(lmforge serve --body-timeout).", code="request_timeout") from None
            if message["type"] == "http.disconnect":
                return _replay(message, receive)
            chunk = message.get("body", b"")
            seen += len(chunk)
            too_large = too_large or seen > limit
            # A body too large is read on and dropped (up to DRAIN_FACTOR x the limit), not kept: a
            # client still sending when the connection closed would see a reset instead of the 413.
            if too_large:
                kept = bytearray()
                if seen > DRAIN_FACTOR * limit:
                    raise _too_large(limit)
            else:
                kept += chunk
            if not message.get("more_body"):
                if too_large:
                    raise _too_large(limit)
                return _replay({"type": "http.request", "body": bytes(kept), "more_body": False}, receive)

    def _record(self, scope, status: int, started: float) -> None:
        seconds = time.perf_counter() - started
        self.metrics.request(scope["path"], status)
        state = scope.get("state", {})
        prompt, completion = state.get("prompt_tokens"), state.get("completion_tokens")
        client = "{}:{}".format(*scope["client"]) if scope.get("client") else "-"
        tokens = f" prompt_tokens={prompt} completion_tokens={completion}" if prompt is not None else ""
        ACCESS_LOG.info('%s "%s %s" %d %.3fs%s', client, scope["method"], scope["path"], status, seconds, tokens)


def _header(scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over this server's limit of {limit} bytes "
                    "(lmforge serve --max-body-bytes).", code="request_too_large")


def _replay(first: dict, receive):
    """A ``receive`` that gives ``first`` once, then what ``receive`` gives (the client's disconnect)."""
    pending = [first]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


async def send_error(send, err: ApiError, close: bool = False) -> None:
    """Answer ``err`` in OpenAI's shape straight through ASGI (``close``: and close the connection)."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), str(v).encode()) for k, v in err.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request head takes more than ``seconds``."""

    class HeaderTimeoutProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first byte of the next request on a kept-alive connection
            super().data_received(data)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request head was complete
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(seconds, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
