"""The two outermost layers: who is asking (`request_context`: request id, real client IP,
log context) and what happened (`observe`: one log line and the ``http_*`` metrics per
request, whatever ended it)."""

from __future__ import annotations

import asyncio
import time

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from services.gateway.edge.config import CLIENT_CLOSED_REQUEST, REAL_IP, method_label
from services.gateway.edge.exchange import EXCHANGE, Exchange, client_gone
from services.gateway.edge.metrics import EdgeMetrics
from services.gateway.real_ip import TrustedProxies, client_ip
from services.infra.errors import ApiError, error_response
from services.infra.http import REQUEST_ID, request_id_of, route_label

log = structlog.get_logger("gateway.http")


def request_context(trusted: TrustedProxies) -> Middleware:
    @web.middleware
    async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        request_id = request_id_of(request)
        forwarded = headers.getall(hdrs.X_FORWARDED_FOR, None)
        ip = client_ip(request.remote, ",".join(forwarded) if forwarded else None,
                       headers.get("X-Real-IP"), trusted)
        request[REQUEST_ID] = request_id
        request[REAL_IP] = ip
        request[EXCHANGE] = Exchange(request_id, ip)
        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            return await handler(request)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)

    return request_context


def observe(metrics: EdgeMetrics, quiet: frozenset[str]) -> Middleware:
    """`quiet`: route templates logged at debug level (probes and scrapes)."""

    def record(request: web.Request, exchange: Exchange, response: web.StreamResponse | None,
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
        exchange = request[EXCHANGE]
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            # Cancelled: the client hung up (with handler_cancellation on) or the server is
            # shutting down. Nothing more will be sent either way.
            exchange.client_gone = True
            if exchange.response is not None and exchange.aborted is None:
                exchange.aborted = ("client_disconnected" if client_gone(request)
                                    else "cancelled")
            record(request, exchange, None, started)
            raise
        except Exception as exc:
            # `recover` turns everything below it into a response: this is a bug in the stack.
            log.error("unhandled exception in the middleware stack", exc_info=exc)
            response = error_response(ApiError.internal(exchange.request_id))
        record(request, exchange, response, started)
        return response

    return observe
