"""Everything the gateway's handlers use, built once per process in a cleanup context."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.events import EventDecodeError, decode_event
from services.core.bus import Bus
from services.core.http import BUS, DB, REDIS, REGISTRY
from services.gateway.auth import Authenticator, AuthSettings
from services.gateway.balancer import Balancer, BreakerRules, CircuitBreaker
from services.gateway.metrics import GatewayMetrics
from services.gateway.models import ModelCatalog
from services.gateway.node_feed import NodeFeed
from services.gateway.nodes import NodeTable, RoutingRules
from services.gateway.proxy import Proxy, ProxySettings
from services.gateway.ratelimit import RedisRateLimiter, connect_redis
from services.gateway.settings import GatewaySettings
from services.gateway.usage import UsagePublisher

log = structlog.get_logger("gateway")

CONTROL_SUBJECTS = ("apikey.>", "tenant.>", "environment.>", "model.>")


@dataclass
class Gateway:
    settings: GatewaySettings
    auth: Authenticator
    limiter: RedisRateLimiter
    table: NodeTable
    balancer: Balancer
    proxy: Proxy
    usage: UsagePublisher
    models: ModelCatalog
    metrics: GatewayMetrics
    bus: Bus
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def background(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` without waiting for it; keep a reference so it is not collected."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background work failed", error=str(task.exception()))

    async def on_control_event(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except EventDecodeError:
            return
        await self.auth.on_event(event)
        await self.models.on_event(event)


GATEWAY = web.AppKey("gateway", Gateway)
GATEWAY_SETTINGS = web.AppKey("gateway_settings", GatewaySettings)


async def gateway_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[GATEWAY_SETTINGS]
    registry = app[REGISTRY]
    bus = app[BUS]
    # The limiter's client: short timeouts and no client retries (a retried EVALSHA would
    # count a request twice). Auth uses it too, so a dead Redis costs milliseconds, not seconds.
    redis = connect_redis(s.redis_url.reveal(), timeout=s.ratelimit_redis_timeout)
    app[REDIS] = redis
    table = NodeTable()
    rules = RoutingRules(health_threshold=s.health_score_threshold,
                         heartbeat_timeout=s.node_heartbeat_timeout)
    balancer = Balancer(s.lb_strategy, CircuitBreaker(BreakerRules(
        error_rate=s.circuit_error_rate, min_requests=s.circuit_min_requests,
        window=s.circuit_window_seconds, cooldown=s.circuit_cooldown_seconds)))
    metrics = GatewayMetrics(registry)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=90,
                                     enable_cleanup_closed=True)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    models = ModelCatalog(app[DB])
    await models.refresh()
    gw = Gateway(
        settings=s,
        auth=Authenticator(app[DB], redis, AuthSettings(local_ttl=s.auth_local_cache_seconds,
                                                        redis_ttl=s.auth_redis_cache_seconds),
                           registry=registry),
        limiter=RedisRateLimiter(redis, policy=s.ratelimit_policy,
                                 lease_ttl=s.concurrency_lease_seconds, registry=registry,
                                 timeout=s.ratelimit_redis_timeout),
        table=table, balancer=balancer,
        proxy=Proxy(session, table, balancer, rules, metrics, ProxySettings(
            connect_timeout=s.upstream_connect_timeout, request_timeout=s.request_timeout,
            chunk_timeout=s.stream_chunk_timeout)),
        usage=UsagePublisher(bus, Path(s.usage_spool_dir), buffer_size=s.usage_buffer_size,
                             registry=registry),
        models=models, metrics=metrics, bus=bus)
    app[GATEWAY] = gw
    feed = NodeFeed(bus, table)
    await feed.start()
    subs: list[Subscription] = [await bus.nc.subscribe(subject, cb=gw.on_control_event)
                                for subject in CONTROL_SUBJECTS]
    usage_task = asyncio.create_task(gw.usage.run(), name="usage-publisher")
    refresher = asyncio.create_task(_refresh_models(models), name="models-refresh")
    yield
    for sub in subs:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    await feed.stop()
    refresher.cancel()
    usage_task.cancel()
    await asyncio.gather(usage_task, refresher, return_exceptions=True)
    await gw.usage.close()
    if gw._tasks:
        await asyncio.gather(*gw._tasks, return_exceptions=True)
    await session.close()
    await redis.aclose()


async def _refresh_models(models: ModelCatalog) -> None:
    """The fallback to model.* events: reload now and then."""
    while True:
        await asyncio.sleep(models.refresh_seconds)
        try:
            await models.refresh()
        except Exception as exc:
            log.warning("could not reload the models", error=str(exc))
