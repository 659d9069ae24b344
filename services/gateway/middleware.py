"""The gateway's HTTP edge: every request passes through this stack before auth and the proxy.

`install_middleware(app, config)` puts it in front of whatever middlewares the app already has
(the shell's own request-id and metrics middlewares are replaced: this stack does both). From
the outside in:

1. ``request_context``  request id (``X-Request-ID`` when sane, else new), real client IP,
                        the request's structlog contextvars
2. ``observe``          one log line and the ``http_*`` metrics per request
3. ``require_json``     POST/PUT/PATCH bodies must be JSON (415)
4. ``limit_body``       10 MiB by default, declared or chunked (413)
5. ``recover``          any exception becomes an OpenAI-shaped error; bugs are logged, not shown
6. ``deadline``         60 s per request; per chunk once a response streams (504)
7. ``cors_preflight``   ``OPTIONS`` preflights answered here, before auth

and, on every response as its headers go out (errors, 404s and streams included), the
``on_response_prepare`` hook adds the security headers, ``X-Request-ID`` and CORS headers.
docs/gateway-http.md explains the order (it differs from the reference's on purpose).

Streaming needs nothing from handlers: a response prepared while the handler still runs is a
stream, so the deadline switches to per-chunk mode by itself and watches the bytes that reach
the client. Store per-request facts with typed keys: `REQUEST_ID` (from services.infra.http) and
`REAL_IP`; bind log fields with ``structlog.contextvars.bind_contextvars`` (not the
``bound_contextvars`` context manager, which would unbind them before the request's log line).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict, istr
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.gateway.real_ip import DEFAULT_TRUSTED_PROXIES, TrustedProxies, client_ip
from services.infra.errors import (
    ApiError,
    api_error_for_http,
    error_response,
    sse_error_event,
)
from services.infra.http import (
    HTTP_METRICS,
    REGISTRY,
    REQUEST_ID,
    REQUEST_ID_HEADER,
    SECURITY_HEADERS,
    HttpMetrics,
    add_security_headers,
    request_id_of,
    route_label,
)
from services.infra.http import count_requests as shell_count_requests
from services.infra.http import request_context as shell_request_context

log = structlog.get_logger("gateway.http")

REAL_IP = web.RequestKey("real_ip", str)
"""The client's address (see services/gateway/real_ip.py), for rate limits and logs."""


DEFAULT_CORS_HEADERS: tuple[str, ...] = (
    "Authorization", "Content-Type", "X-Request-ID", "OpenAI-Organization", "OpenAI-Project",
    "OpenAI-Beta",
    "X-Session-Id",  # session affinity (LB_STRATEGY=prefix_aware)
    # The official JavaScript SDK sends these from browsers; a preflight asks for them.
    "X-Stainless-Arch", "X-Stainless-Lang", "X-Stainless-OS", "X-Stainless-Package-Version",
    "X-Stainless-Retry-Count", "X-Stainless-Runtime", "X-Stainless-Runtime-Version",
    "X-Stainless-Timeout",
)
DEFAULT_EXPOSE_HEADERS: tuple[str, ...] = (
    "X-Request-ID", "Retry-After",
    "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens",
    "x-ratelimit-scope", "x-budget-max-tokens",
)

_BODY_METHODS = frozenset({hdrs.METH_POST, hdrs.METH_PUT, hdrs.METH_PATCH})
_KNOWN_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_POST, hdrs.METH_PUT,
                            hdrs.METH_PATCH, hdrs.METH_DELETE, hdrs.METH_OPTIONS})
_SIZE_BUCKETS = (128, 512, 2048, 8192, 32768, 131072, 524288, 2097152, 8388608, 33554432)
# A stalled stream still gets a chance to say why; a client that is not reading does not
# get to hold the handler longer than this.
_LAST_WORDS_TIMEOUT = 1.0
CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a client that went away before an answer: logged and counted only."""


@dataclass(frozen=True, slots=True)
class MiddlewareConfig:
    """The stack's settings; the gateway's settings object is mapped onto it."""

    max_body_bytes: int = 10 * 1024 * 1024
    request_timeout: float = 60.0
    """Seconds from the request's arrival to its response (or to its first streamed byte)."""
    stream_chunk_timeout: float = 60.0
    """Once streaming, the longest silence allowed between bytes reaching the client."""
    cors_origins: tuple[str, ...] = ("*",)
    cors_methods: tuple[str, ...] = ("GET", "POST", "OPTIONS")
    cors_headers: tuple[str, ...] = DEFAULT_CORS_HEADERS
    """Request headers a browser may send; ``*`` among them echoes what a preflight asks."""
    cors_expose_headers: tuple[str, ...] = DEFAULT_EXPOSE_HEADERS
    cors_max_age: int = 600
    trusted_proxies: tuple[str, ...] = DEFAULT_TRUSTED_PROXIES
    json_content_types: tuple[str, ...] = ("application/json",)
    quiet_routes: tuple[str, ...] = ("/health", "/ready", "/metrics")
    """Route templates logged at debug level (probes and scrapes, every few seconds)."""

    def __post_init__(self) -> None:
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        if self.request_timeout <= 0 or self.stream_chunk_timeout <= 0:
            raise ValueError("request_timeout and stream_chunk_timeout must be positive")
        if not self.cors_origins:
            raise ValueError("cors_origins needs at least one origin (or *)")
        try:
            TrustedProxies(self.trusted_proxies)
        except ValueError as exc:
            raise ValueError(f"trusted_proxies: {exc}") from None


# --------------------------------------------------------------------------- pure parts


def media_type(content_type: str | None) -> str:
    """``Application/JSON; charset=utf-8`` → ``application/json``; missing → ``""``."""
    if not content_type:
        return ""
    return content_type.partition(";")[0].strip().lower()


def method_label(method: str) -> str:
    """Clients choose the method token: only the standard ones become label values."""
    return method if method in _KNOWN_METHODS else "OTHER"


class CorsPolicy:
    """Which origins may call us from a browser, and the headers that say so (precomputed)."""

    __slots__ = (
        "_allow_headers",
        "_allow_methods",
        "_echo_headers",
        "_expose",
        "_max_age",
        "any_origin",
        "origins",
    )

    def __init__(self, origins: tuple[str, ...], methods: tuple[str, ...],
                 headers: tuple[str, ...], expose: tuple[str, ...], max_age: int) -> None:
        self.any_origin = "*" in origins
        self.origins = frozenset(o.strip().rstrip("/").lower() for o in origins)
        self._allow_methods = ", ".join(methods)
        self._echo_headers = "*" in headers
        self._allow_headers = ", ".join(h for h in headers if h != "*")
        self._expose = ", ".join(expose)
        self._max_age = str(max_age)

    @classmethod
    def from_config(cls, config: MiddlewareConfig) -> CorsPolicy:
        return cls(config.cors_origins, config.cors_methods, config.cors_headers,
                   config.cors_expose_headers, config.cors_max_age)

    @property
    def varies_by_origin(self) -> bool:
        return not self.any_origin

    def allow_origin(self, origin: str) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for `origin`, or None to refuse it.
        Credentials are never allowed (API keys travel in headers, not cookies), so ``*``
        is a valid answer."""
        if self.any_origin:
            return "*"
        return origin if origin.lower() in self.origins else None

    def preflight_headers(self, origin: str | None,
                          requested_headers: str | None) -> dict[str, str]:
        """Headers of the 204 answering a preflight; without CORS headers when refused."""
        headers: dict[str, str] = {}
        if self.varies_by_origin:
            headers[hdrs.VARY] = "Origin"
        allowed = self.allow_origin(origin) if origin else None
        if allowed is None:
            return headers
        headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
        headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = self._allow_methods
        if self._echo_headers and requested_headers:
            headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = requested_headers
        elif self._allow_headers:
            headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = self._allow_headers
        headers[hdrs.ACCESS_CONTROL_MAX_AGE] = self._max_age
        return headers

    def response_headers(self, origin: str) -> tuple[tuple[istr, str], ...]:
        """Headers for an actual (non-preflight) cross-origin response."""
        allowed = self.allow_origin(origin)
        if allowed is None:
            return ()
        if not self._expose:
            return ((hdrs.ACCESS_CONTROL_ALLOW_ORIGIN, allowed),)
        return ((hdrs.ACCESS_CONTROL_ALLOW_ORIGIN, allowed),
                (hdrs.ACCESS_CONTROL_EXPOSE_HEADERS, self._expose))


def add_vary_origin(headers: CIMultiDict[str]) -> None:
    """Add ``Origin`` to ``Vary`` (keeping what a handler put there)."""
    current = headers.get(hdrs.VARY)
    if not current:
        headers[hdrs.VARY] = "Origin"
    elif "origin" not in current.lower():
        headers[hdrs.VARY] = f"{current}, Origin"


# --------------------------------------------------------------------------- metrics


class EdgeMetrics:
    """The ``http_*`` metrics: the shell's counter and histogram, plus sizes and streams."""

    def __init__(self, registry: CollectorRegistry, http: HttpMetrics) -> None:
        self.requests = http.requests
        self.duration = http.duration
        self.request_size = Histogram("http_request_size_bytes", "HTTP request body size",
                                      ["method", "path"], buckets=_SIZE_BUCKETS,
                                      registry=registry)
        self.response_size = Histogram(
            "http_response_size_bytes",
            "HTTP response size (body; bytes on the wire for streamed responses)",
            ["method", "path"], buckets=_SIZE_BUCKETS, registry=registry)
        self.stream_aborts = Counter(
            "http_stream_aborts_total",
            "Streamed responses ended early, after their status had gone out",
            ["method", "path", "reason"], registry=registry)
        # `labels()` takes a lock and builds a key on every call; the label sets are bounded
        # (methods, route templates, statuses), so each child is looked up once.
        self._by_route: dict[tuple[str, str], tuple[Histogram, Histogram, Histogram]] = {}
        self._by_status: dict[tuple[str, str, int], Counter] = {}

    def observe(self, method: str, route: str, status: int, seconds: float, bytes_in: int,
                bytes_out: int) -> None:
        children = self._by_route.get((method, route))
        if children is None:
            children = (self.duration.labels(method, route),
                        self.request_size.labels(method, route),
                        self.response_size.labels(method, route))
            self._by_route[(method, route)] = children
        counter = self._by_status.get((method, route, status))
        if counter is None:
            counter = self.requests.labels(method, route, str(status))
            self._by_status[(method, route, status)] = counter
        counter.inc()
        children[0].observe(seconds)
        children[1].observe(bytes_in)
        children[2].observe(bytes_out)


# --------------------------------------------------------------------------- per request


class _Deadline:
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


class _Exchange:
    """What the layers of one request share: set up by the outermost, read by the others (it
    survives `request.clone()`, which copies the request's storage shallowly)."""

    __slots__ = ("aborted", "client_gone", "client_ip", "deadline", "request_id", "response")

    def __init__(self, request_id: str, client_ip: str) -> None:
        self.request_id = request_id
        self.client_ip = client_ip
        self.response: web.StreamResponse | None = None
        """Set when a response's headers go out; before that any error can still be sent."""
        self.deadline: _Deadline | None = None
        self.aborted: str | None = None
        self.client_gone = False


_EXCHANGE = web.RequestKey("gateway_exchange", _Exchange)


def _exchange_of(request: web.BaseRequest) -> _Exchange | None:
    found = request.get(_EXCHANGE)
    return found if isinstance(found, _Exchange) else None


def deadline_expired(request: web.BaseRequest) -> bool:
    """Is the request's deadline what cancelled its handler (rather than the client or a
    shutdown)? For a handler that cleans up on `CancelledError` and must say why."""
    exchange = _exchange_of(request)
    return exchange is not None and exchange.deadline is not None and exchange.deadline.expired


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _end_stream(request: web.BaseRequest, response: web.StreamResponse,
                      err: ApiError) -> None:
    """A response whose status already went out failed: say so in the stream when it is SSE
    (the OpenAI SDKs raise on an ``error`` event), else cut the connection so the client sees
    a truncated body rather than one that looks complete."""
    if response.body_length:
        return  # its end was already written: the client has everything
    if response.content_type == "text/event-stream":
        try:
            async with asyncio.timeout(_LAST_WORDS_TIMEOUT):
                await response.write(sse_error_event(err))
                await response.write_eof()
        except Exception:
            pass  # not even the error gets through: cut the connection below
        else:
            return
    transport = request.transport
    if transport is not None:
        transport.close()


# --------------------------------------------------------------------------- the stack


OnPrepare = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


@dataclass(frozen=True)
class MiddlewareStack:
    middlewares: tuple[Middleware, ...]
    """Outermost first."""
    on_response_prepare: OnPrepare
    metrics: EdgeMetrics
    config: MiddlewareConfig


MIDDLEWARE_CONFIG = web.AppKey("gateway_middleware_config", MiddlewareConfig)
EDGE_METRICS = web.AppKey("gateway_edge_metrics", EdgeMetrics)


def build_stack(config: MiddlewareConfig, registry: CollectorRegistry,
                http_metrics: HttpMetrics | None = None) -> MiddlewareStack:
    """The middlewares and the response hook, for an app assembled by hand; most callers
    want `install_middleware`."""
    metrics = EdgeMetrics(registry, http_metrics or HttpMetrics(registry))
    trusted = TrustedProxies(config.trusted_proxies)
    cors = CorsPolicy.from_config(config)
    json_types = frozenset(t.lower() for t in config.json_content_types)
    quiet = frozenset(config.quiet_routes)
    max_body = config.max_body_bytes
    request_timeout = config.request_timeout
    chunk_timeout = config.stream_chunk_timeout

    @web.middleware
    async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        request_id = request_id_of(request)
        forwarded = headers.getall(hdrs.X_FORWARDED_FOR, None)
        ip = client_ip(request.remote, ",".join(forwarded) if forwarded else None,
                       headers.get("X-Real-IP"), trusted)
        request[REQUEST_ID] = request_id
        request[REAL_IP] = ip
        request[_EXCHANGE] = _Exchange(request_id, ip)
        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            return await handler(request)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)

    def record(request: web.Request, exchange: _Exchange, response: web.StreamResponse | None,
               started: float) -> None:
        elapsed = time.perf_counter() - started
        method = method_label(request.method)
        route = route_label(request)
        sent = exchange.response
        if sent is not None:
            status = sent.status
            bytes_out = request.writer.output_size
        elif response is None or exchange.client_gone:
            status, bytes_out = CLIENT_CLOSED_REQUEST, 0
        else:
            status = response.status
            bytes_out = response.content_length or 0
        declared = request.content_length
        bytes_in = declared if declared is not None else request.content.total_bytes
        metrics.observe(method, route, status, elapsed, bytes_in, bytes_out)
        if exchange.aborted is not None:
            metrics.stream_aborts.labels(method, route, exchange.aborted).inc()
        if route in quiet:
            emit = log.debug
        elif status >= 500:
            emit = log.warning
        else:
            emit = log.info
        extra = {"aborted": exchange.aborted} if exchange.aborted is not None else {}
        emit("request", method=method, route=route, status=status,
             duration_ms=round(elapsed * 1000, 2), bytes_in=bytes_in, bytes_out=bytes_out,
             client_ip=exchange.client_ip, request_id=exchange.request_id, **extra)

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        exchange = request[_EXCHANGE]
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            # Cancelled: the client hung up (with handler_cancellation on) or the server is
            # shutting down. Nothing more will be sent either way.
            exchange.client_gone = True
            if exchange.response is not None and exchange.aborted is None:
                exchange.aborted = ("client_disconnected" if _client_gone(request)
                                    else "cancelled")
            record(request, exchange, None, started)
            raise
        except Exception as exc:
            # `recover` turns everything below it into a response: this is a bug in the stack.
            log.error("unhandled exception in the middleware stack", exc_info=exc)
            response = error_response(ApiError.internal(exchange.request_id))
        record(request, exchange, response, started)
        return response

    @web.middleware
    async def require_json(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in _BODY_METHODS and request.body_exists:
            given = request.headers.get(hdrs.CONTENT_TYPE)
            if media_type(given) not in json_types:
                return error_response(ApiError.unsupported_media_type(given))
        return await handler(request)

    @web.middleware
    async def limit_body(request: web.Request, handler: Handler) -> web.StreamResponse:
        declared = request.content_length
        if declared is not None and declared > max_body:
            response = error_response(ApiError.request_too_large(max_body))
            response.force_close()  # do not keep reading a body we refused
            return response
        if request.body_exists and request.client_max_size != max_body:
            # aiohttp counts a chunked body as it is read (request.read/json/post) and stops at
            # the request's client_max_size: make that our limit. Build the app with
            # client_max_size=max_body_bytes and this clone never happens.
            request = request.clone(client_max_size=max_body)
        return await handler(request)

    async def recovered(request: web.Request, exc: Exception) -> web.StreamResponse:
        exchange = request[_EXCHANGE]
        sent = exchange.response
        if isinstance(exc, ConnectionError) and _client_gone(request):
            # Writing to (or reading from) a client that hung up; a bug that merely coincides
            # with a hang-up still gets its traceback below.
            exchange.client_gone = True
            if sent is not None:
                exchange.aborted = "client_disconnected"
            log.info("client disconnected", error=type(exc).__name__)
            return sent or error_response(ApiError.invalid_request("Client closed the request."))
        if isinstance(exc, ApiError):
            err = exc
        elif isinstance(exc, web.HTTPException):
            if exc.status < 400:  # a deliberate redirect or empty success, not an error
                return web.Response(status=exc.status, headers=exc.headers)
            err = api_error_for_http(exc, request.method, request.path,
                                     max_body_bytes=request.client_max_size)
        elif isinstance(exc, HttpProcessingError | web.RequestPayloadError):
            # A broken chunked or compressed request body: the client's fault, not a bug.
            log.info("malformed request body", error=type(exc).__name__)
            err = ApiError.invalid_request("The request body could not be read: it is "
                                           "malformed.")
        else:
            log.error("unhandled exception", exc_info=exc)
            err = ApiError.internal(exchange.request_id)
        if sent is None:
            return error_response(err)
        if isinstance(exc, ApiError | web.HTTPException):
            log.warning("stream failed", status=err.status, error=err.message)
        exchange.aborted = "error"
        await _end_stream(request, sent, err)
        return sent

    @web.middleware
    async def recover(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            return await recovered(request, exc)

    @web.middleware
    async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        exchange = request[_EXCHANGE]
        timeout = asyncio.timeout(request_timeout)
        watch = _Deadline(timeout, chunk_timeout)
        exchange.deadline = watch
        try:
            async with timeout:
                return await handler(request)
        except TimeoutError:
            if not timeout.expired():
                raise  # someone else's timeout, left unhandled: `recover` reports it
            sent = exchange.response
            if sent is None:
                log.warning("request timed out", timeout_s=request_timeout)
                return error_response(ApiError.timeout(
                    f"The request did not complete within {request_timeout:g} seconds."))
            if watch.streaming:
                log.warning("stream stalled", chunk_timeout_s=chunk_timeout)
                err = ApiError.timeout(f"The stream stalled: nothing was sent for "
                                       f"{chunk_timeout:g} seconds.", code="stream_timeout")
            else:
                log.warning("request timed out after its response began",
                            timeout_s=request_timeout)
                err = ApiError.timeout(
                    f"The request did not complete within {request_timeout:g} seconds.")
            exchange.aborted = "timeout"
            await _end_stream(request, sent, err)
            return sent
        finally:
            watch.close()
            exchange.deadline = None

    @web.middleware
    async def cors_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        if (request.method == hdrs.METH_OPTIONS
                and hdrs.ACCESS_CONTROL_REQUEST_METHOD in headers):
            return web.Response(status=204, headers=cors.preflight_headers(
                headers.get(hdrs.ORIGIN), headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)))
        return await handler(request)

    async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        headers.update(SECURITY_HEADERS)  # replaces, never duplicates, what a handler set
        exchange = _exchange_of(request)
        if exchange is None:  # answered before the middlewares ran (an Expect: failure)
            headers[REQUEST_ID_HEADER] = request_id_of(request)
        else:
            headers[REQUEST_ID_HEADER] = exchange.request_id
            exchange.response = response
            if exchange.deadline is not None:
                # Prepared while the handler still runs: this response streams.
                exchange.deadline.stream_started(request.writer)
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and hdrs.ACCESS_CONTROL_ALLOW_ORIGIN not in headers:
            for name, value in cors.response_headers(origin):
                headers[name] = value
        if cors.varies_by_origin:
            add_vary_origin(headers)

    return MiddlewareStack(
        middlewares=(request_context, observe, require_json, limit_body, recover, deadline,
                     cors_preflight),
        on_response_prepare=on_response_prepare, metrics=metrics, config=config)


def install_middleware(app: web.Application, config: MiddlewareConfig | None = None, *,
                       registry: CollectorRegistry | None = None) -> MiddlewareStack:
    """Put the stack in front of `app`'s middlewares and register its response hook.

    Call before the app starts. Metrics go to `registry`, else the app's ``REGISTRY`` (a new
    one is stored there when it has none), reusing the shell's ``HTTP_METRICS`` counters. The
    shell's `request_context` and `count_requests` middlewares are removed: this stack sets the
    same `REQUEST_ID` and counts the same metrics, and keeping them would count twice; so is
    its `add_security_headers` hook, whose headers this stack's hook sets.
    """
    config = config or MiddlewareConfig()
    app_registry = app.get(REGISTRY)
    if registry is None:
        registry = app_registry if app_registry is not None else CollectorRegistry()
    if app_registry is None:
        app[REGISTRY] = registry
    http_metrics = app.get(HTTP_METRICS) if app.get(REGISTRY) is registry else None
    if http_metrics is None:
        http_metrics = HttpMetrics(registry)
        if HTTP_METRICS not in app:
            app[HTTP_METRICS] = http_metrics
    stack = build_stack(config, registry, http_metrics)
    others = [m for m in app.middlewares
              if m is not shell_request_context and m is not shell_count_requests]
    app.middlewares[:] = [*stack.middlewares, *others]
    # The stack's hook sets the shell's security headers itself, with the rest of the edge's.
    if add_security_headers in app.on_response_prepare:
        app.on_response_prepare.remove(add_security_headers)
    app.on_response_prepare.append(stack.on_response_prepare)
    app[MIDDLEWARE_CONFIG] = config
    app[EDGE_METRICS] = stack.metrics
    return stack
