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

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry

from services.gateway.edge.config import (
    CLIENT_CLOSED_REQUEST,
    DEFAULT_CORS_HEADERS,
    DEFAULT_EXPOSE_HEADERS,
    REAL_IP,
    MiddlewareConfig,
    media_type,
    method_label,
)
from services.gateway.edge.context import observe, request_context
from services.gateway.edge.cors import CorsPolicy, add_vary_origin, cors_preflight
from services.gateway.edge.deadline import deadline
from services.gateway.edge.exchange import deadline_expired, exchange_of
from services.gateway.edge.guards import limit_body, require_json
from services.gateway.edge.metrics import EdgeMetrics
from services.gateway.edge.recover import recover
from services.gateway.real_ip import TrustedProxies
from services.infra.http import (
    HTTP_METRICS,
    REGISTRY,
    REQUEST_ID_HEADER,
    SECURITY_HEADERS,
    HttpMetrics,
    add_security_headers,
    request_id_of,
)
from services.infra.http import count_requests as shell_count_requests
from services.infra.http import request_context as shell_request_context

__all__ = ["CLIENT_CLOSED_REQUEST", "DEFAULT_CORS_HEADERS", "DEFAULT_EXPOSE_HEADERS",
           "EDGE_METRICS", "MIDDLEWARE_CONFIG", "REAL_IP", "SECURITY_HEADERS", "CorsPolicy",
           "MiddlewareConfig", "MiddlewareStack", "add_vary_origin", "build_stack",
           "deadline_expired", "install_middleware", "media_type", "method_label"]

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
    """The middlewares (services/gateway/edge/, one module each) and the response hook, for
    an app assembled by hand; most callers want `install_middleware`."""
    metrics = EdgeMetrics(registry, http_metrics or HttpMetrics(registry))
    cors = CorsPolicy.from_config(config)

    async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        headers.update(SECURITY_HEADERS)  # replaces, never duplicates, what a handler set
        exchange = exchange_of(request)
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
        middlewares=(request_context(TrustedProxies(config.trusted_proxies)),
                     observe(metrics, frozenset(config.quiet_routes)),
                     require_json(frozenset(t.lower() for t in config.json_content_types)),
                     limit_body(config.max_body_bytes), recover(),
                     deadline(config.request_timeout, config.stream_chunk_timeout),
                     cors_preflight(cors)),
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
