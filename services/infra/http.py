"""The service shell every aiohttp service is built on.

`create_app` gives an application with `/health` (the process is alive), `/ready` (its
PostgreSQL, Redis and NATS answer), `/metrics` (the app's own Prometheus registry), request ids
bound into every log line, the reference's security headers on every response, and its
resources opened in `cleanup_ctx` under typed AppKeys.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import structlog
from aiohttp import web
from multidict import istr
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from services.infra.aio import stop_task, within
from services.infra.bus import Bus
from services.infra.db import create_pool
from services.infra.eventlog import EventLog
from services.infra.log_waker import LogWaker
from services.infra.projections import ProjectionMetrics
from services.infra.settings import CoreSettings

log = structlog.get_logger("http")

SETTINGS = web.AppKey("settings", CoreSettings)
REGISTRY = web.AppKey("registry", CollectorRegistry)
DB = web.AppKey("db", asyncpg.Pool)
EVENTLOG = web.AppKey("eventlog", EventLog)
WAKER = web.AppKey("waker", LogWaker)
REDIS = web.AppKey("redis", aioredis.Redis)
REDIS_PING: web.AppKey[Callable[[], Awaitable[bool]]] = web.AppKey("redis_ping")
"""What `/ready` asks of Redis when the service keeps its own client (the gateway's may be a
Redis Cluster's) rather than REDIS."""
BUS = web.AppKey("bus", Bus)
PROJECTION_METRICS = web.AppKey("projection_metrics", ProjectionMetrics)
"""One per service: every projection runner it starts reports through it (lag, failures)."""

REQUEST_ID = web.RequestKey("request_id", str)
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


@dataclass(frozen=True)
class Needs:
    """Which shared resources a service opens (and `/ready` checks)."""

    postgres: bool = True
    redis: bool = True
    nats: bool = True
    serves_without: frozenset[str] = frozenset()
    """Resources (`postgres`, `redis`, `nats`) whose outage `/ready` reports but does not
    turn into a 503: the service still does its job without them (the gateway serves from
    its caches and spools usage), and a readiness probe must not take every replica out."""


def request_id_of(request: web.Request) -> str:
    """The caller's X-Request-ID when it is sane, else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    # Unique, not secret: the default RNG (reseeded after fork) spares a getrandom call.
    return given if _REQUEST_ID.match(given) else f"{random.getrandbits(128):032x}"


@web.middleware
async def request_context(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
    request_id = request_id_of(request)
    request[REQUEST_ID] = request_id
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers[REQUEST_ID_HEADER] = request_id
            raise
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("http_requests_total", "HTTP requests",
                                ["method", "path", "status"], registry=registry)
        # Up to minutes: long generations and streams must not all land in +Inf.
        self.duration = Histogram("http_request_duration_seconds", "HTTP request duration",
                                  ["method", "path"], registry=registry,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                           10, 30, 60, 120, 300))


HTTP_METRICS = web.AppKey("http_metrics", HttpMetrics)
NEEDS = web.AppKey("needs", Needs)


def route_label(request: web.Request) -> str:
    """The route's template (``/v1/nodes/{id}``), never the raw path: labels stay bounded."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def count_requests(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
    metrics = request.app[HTTP_METRICS]
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        path = route_label(request)
        metrics.requests.labels(request.method, path, str(status)).inc()
        metrics.duration.labels(request.method, path).observe(time.perf_counter() - started)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok",
                              "service": request.app[SETTINGS].service_name})


async def _check(name: str, probe: Awaitable[object]) -> tuple[str, str]:
    try:
        await within(probe, 2.0)
    except Exception as exc:
        return name, f"error: {type(exc).__name__}"
    return name, "ok"


async def _nats_probe(bus: Bus) -> None:
    if not bus.connected:
        raise ConnectionError("not connected")
    await bus.nc.flush(timeout=1)


async def ready(request: web.Request) -> web.Response:
    app = request.app
    probes = []
    if DB in app:
        probes.append(_check("postgres", app[DB].fetchval("SELECT 1")))
    if REDIS_PING in app:
        probes.append(_check("redis", app[REDIS_PING]()))
    elif REDIS in app:
        probes.append(_check("redis", app[REDIS].ping()))
    if BUS in app:
        probes.append(_check("nats", _nats_probe(app[BUS])))
    checks = dict(await asyncio.gather(*probes))
    optional = app[NEEDS].serves_without
    ok = all(v == "ok" for name, v in checks.items() if name not in optional)
    return web.json_response({"status": "ready" if ok else "not ready", "checks": checks},
                             status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def metrics_site_ctx(app: web.Application) -> AsyncIterator[None]:
    """/metrics on its own port (METRICS_PORT): scraped from inside the cluster, never on a
    public port; with several gateway workers, one port each, so no worker hides another."""
    settings = app[SETTINGS]
    registry = app[REGISTRY]

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    side = web.Application()
    side.on_response_prepare.append(add_security_headers)
    side.router.add_get("/metrics", scrape)
    runner = web.AppRunner(side, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.http_host, settings.metrics_port).start()
    log.info("metrics listening", port=settings.metrics_port)
    yield
    await runner.cleanup()


# --------------------------------------------------------------------------- resources


async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    dsn = settings.database_url.reveal()
    pool = await create_pool(dsn, min_size=settings.db_min_connections,
                             max_size=settings.db_max_connections,
                             statement_timeout_ms=settings.db_statement_timeout_ms)
    waker = LogWaker(dsn, poll_interval=settings.event_poll_interval)
    await waker.start()
    app[DB] = pool
    app[EVENTLOG] = EventLog(pool)
    app[WAKER] = waker
    yield
    await waker.close()
    await pool.close()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    client = aioredis.from_url(app[SETTINGS].redis_url.reveal(), decode_responses=False)
    app[REDIS] = client
    yield
    await client.aclose()


async def nats_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    bus = await Bus.connect(settings.nats_url.reveal(), name=settings.service_name,
                            creds=settings.nats_creds.reveal(), registry=app[REGISTRY])
    try:
        await bus.wait_for_streams()
    except BaseException:
        await bus.close()
        raise
    app[BUS] = bus
    yield
    await bus.close()


def background(name: str,
               make: Callable[[web.Application], Coroutine[Any, Any, None]]) -> CleanupCtx:
    """A cleanup context running `make(app)` as a task for the app's lifetime; a crash of the
    task is logged (it should retry internally), and shutdown cancels it."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(make(app), name=name)

        def done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("background task died", task=name, exc_info=t.exception())

        task.add_done_callback(done)
        yield
        await stop_task(task)

    return ctx


SECURITY_HEADERS: tuple[tuple[istr, str], ...] = (
    (istr("Strict-Transport-Security"), "max-age=31536000; includeSubDomains; preload"),
    (istr("X-Frame-Options"), "DENY"),
    (istr("X-Content-Type-Options"), "nosniff"),
    (istr("X-XSS-Protection"), "1; mode=block"),
    (istr("Content-Security-Policy"), "default-src 'self'; frame-ancestors 'none'"),
    (istr("Referrer-Policy"), "strict-origin-when-cross-origin"),
    (istr("Permissions-Policy"), "geolocation=(), microphone=(), camera=()"),
)
"""The reference's set, on every response of every service: the admin API, billing's webhook
and the notifier's intake face operators' browsers and the internet as the gateway does."""


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: errors, 404s and streams included (their headers go out here)."""
    response.headers.update(SECURITY_HEADERS)  # replaces, never duplicates, a handler's


def create_app(settings: CoreSettings, *, needs: Needs = Needs(),
               middlewares: tuple[Any, ...] = (),
               client_max_size: int = 10 * 1024 * 1024) -> web.Application:
    registry = CollectorRegistry()
    app = web.Application(middlewares=[request_context, count_requests, *middlewares],
                          client_max_size=client_max_size)
    app[SETTINGS] = settings
    app[REGISTRY] = registry
    app[HTTP_METRICS] = HttpMetrics(registry)
    app[NEEDS] = needs
    app.on_response_prepare.append(add_security_headers)
    if needs.postgres:
        app[PROJECTION_METRICS] = ProjectionMetrics(registry)
        app.cleanup_ctx.append(postgres_ctx)
    if needs.redis:
        app.cleanup_ctx.append(redis_ctx)
    if needs.nats:
        app.cleanup_ctx.append(nats_ctx)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    if settings.prometheus_enabled:  # PROMETHEUS_ENABLED=false: no /metrics anywhere
        if settings.metrics_port:
            app.cleanup_ctx.append(metrics_site_ctx)
        else:
            app.router.add_get("/metrics", metrics)
    return app


def serve(app: web.Application, settings: CoreSettings, *, reuse_port: bool = False,
          ssl_context: ssl.SSLContext | None = None) -> None:
    """Run until SIGINT/SIGTERM, on uvloop when it is installed. `reuse_port` lets several
    worker processes listen on one port (SO_REUSEPORT); `ssl_context` serves HTTPS."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    log.info("listening", service=settings.service_name, host=settings.http_host,
             port=settings.http_port, tls=ssl_context is not None)
    web.run_app(app, host=settings.http_host, port=settings.http_port, access_log=None,
                print=None, shutdown_timeout=10, reuse_port=reuse_port or None,
                ssl_context=ssl_context)
