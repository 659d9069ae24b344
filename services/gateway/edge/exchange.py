"""What the layers of one request share (`Exchange`), the request's deadline (`Deadline`),
and ending a response whose status already went out."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from services.infra.errors import ApiError, sse_error_event

# A stalled stream still gets a chance to say why; a client that is not reading does not
# get to hold the handler longer than this.
LAST_WORDS_TIMEOUT = 1.0


class Deadline:
    """The request's `asyncio.Timeout`, switched to per-chunk mode once a response streams.

    In per-chunk mode the whole-request timer is lifted and a watchdog reads the count of bytes
    written to the client every quarter budget: progress pushes the deadline on, a whole budget
    without any fires the timeout. Reading a counter costs nothing per chunk (no timer churn on
    every token), at the price of firing up to a quarter budget late.
    """

    __slots__ = ("_budget", "_last", "_loop", "_seen", "_step", "_timeout", "_watchdog",
                 "_writer")

    def __init__(self, timeout: asyncio.Timeout, budget: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._budget = budget
        self._step = budget / 4
        self._writer: AbstractStreamWriter | None = None
        self._seen = 0
        self._last = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def streaming(self) -> bool:
        return self._writer is not None

    @property
    def expired(self) -> bool:
        return self._timeout.expired()

    def stream_started(self, writer: AbstractStreamWriter) -> None:
        if self._writer is not None or self._timeout.expired():
            return
        self._writer = writer
        self._seen = writer.output_size
        self._last = self._loop.time()
        self._timeout.reschedule(None)
        self._watchdog = self._loop.call_at(self._last + self._step, self._check)

    def _check(self) -> None:
        assert self._writer is not None
        now = self._loop.time()
        size = self._writer.output_size
        if size != self._seen:
            self._seen = size
            self._last = now
        due = self._last + self._budget
        if now >= due:
            self._watchdog = None
            self._timeout.reschedule(now)  # not in the future: fires at once
        else:
            self._watchdog = self._loop.call_at(min(now + self._step, due), self._check)

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


class Exchange:
    """What the layers of one request share: set up by the outermost, read by the others (it
    survives `request.clone()`, which copies the request's storage shallowly)."""

    __slots__ = ("aborted", "client_gone", "client_ip", "deadline", "request_id", "response")

    def __init__(self, request_id: str, client_ip: str) -> None:
        self.request_id = request_id
        self.client_ip = client_ip
        self.response: web.StreamResponse | None = None
        """Set when a response's headers go out; before that any error can still be sent."""
        self.deadline: Deadline | None = None
        self.aborted: str | None = None
        self.client_gone = False


EXCHANGE = web.RequestKey("gateway_exchange", Exchange)


def exchange_of(request: web.BaseRequest) -> Exchange | None:
    found = request.get(EXCHANGE)
    return found if isinstance(found, Exchange) else None


def deadline_expired(request: web.BaseRequest) -> bool:
    """Is the request's deadline what cancelled its handler (rather than the client or a
    shutdown)? For a handler that cleans up on `CancelledError` and must say why."""
    exchange = exchange_of(request)
    return exchange is not None and exchange.deadline is not None and exchange.deadline.expired


def client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def end_stream(request: web.BaseRequest, response: web.StreamResponse,
                      err: ApiError) -> None:
    """A response whose status already went out failed: say so in the stream when it is SSE
    (the OpenAI SDKs raise on an ``error`` event), else cut the connection so the client sees
    a truncated body rather than one that looks complete."""
    if response.body_length:
        return  # its end was already written: the client has everything
    if response.content_type == "text/event-stream":
        try:
            async with asyncio.timeout(LAST_WORDS_TIMEOUT):
                await response.write(sse_error_event(err))
                await response.write_eof()
        except Exception:
            pass  # not even the error gets through: cut the connection below
        else:
            return
    transport = request.transport
    if transport is not None:
        transport.close()
