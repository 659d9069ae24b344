"""Everything the gateway's handlers use, built once per process in a cleanup context."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

from schemas.events import EventDecodeError, NodeStatus, decode_event
from schemas.subjects import CONTROL_VIEW
from services.domain.pricing import parse_multipliers
from services.gateway.auth import Authenticator, auth_settings
from services.gateway.balancer import Balancer, BreakerRules, CircuitBreaker
from services.gateway.budget_reconciler import BudgetReconciler
from services.gateway.budget_spend import budget_spender
from services.gateway.forwarding import ProxySettings
from services.gateway.kv_feed import KvFeed
from services.gateway.kv_index import KvIndex
from services.gateway.kv_prompt import PromptBlocks
from services.gateway.metrics import GatewayMetrics
from services.gateway.models import ModelCatalog
from services.gateway.node_feed import NodeFeed
from services.gateway.nodes import NodeTable, NodeView, RoutingRules
from services.gateway.protocol import InferenceRequest
from services.gateway.proxy import Proxy
from services.gateway.ratelimit import RedisRateLimiter, Reservation
from services.gateway.redis_clients import connect_limiter, connect_shared
from services.gateway.request_parsing import parse_request
from services.gateway.response_owners import ResponseOwners
from services.gateway.settings import GatewaySettings
from services.gateway.spend import CapsCache, Pricer
from services.gateway.upstream import UpstreamPool
from services.gateway.usage import UsagePublisher
from services.infra.aio import stop_tasks
from services.infra.bus import Bus
from services.infra.http import BUS, DB, REDIS_PING, REGISTRY
from services.infra.node_keys import NodeKeys

log = structlog.get_logger("gateway")

CONTROL_SUBJECTS = ("apikey.>", "tenant.>", "environment.>", "budget.>", "model.>")


class LeaseKeeper:
    """Keeps the concurrency leases of long streams alive: one task renews them all, instead
    of a timer per stream."""

    def __init__(self, limiter: RedisRateLimiter, period: float) -> None:
        self.limiter = limiter
        self.period = period
        self.active: dict[int, Reservation] = {}
        self._next = 0

    def hold(self, reservation: Reservation) -> int:
        self._next += 1
        self.active[self._next] = reservation
        return self._next

    def drop(self, token: int) -> None:
        self.active.pop(token, None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            for reservation in list(self.active.values()):
                await self.limiter.renew(reservation)


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
    leases: LeaseKeeper
    owners: ResponseOwners
    pricer: Pricer
    caps: CapsCache = field(default_factory=CapsCache)
    prompts: PromptBlocks = field(default_factory=PromptBlocks)
    """kv_aware: requests' prompts as the nodes' cache blocks."""
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _uuids: dict[str, uuid.UUID] = field(default_factory=dict)

    def uuid_of(self, value: str) -> uuid.UUID:
        """The UUID a tenant, environment, key or node id string stands for, parsed once: a
        usage event needs four of them per request, and parsing costs microseconds each."""
        found = self._uuids.get(value)
        if found is None:
            if len(self._uuids) >= 100_000:
                self._uuids.clear()  # rare; cheaper than an LRU's bookkeeping per request
            found = self._uuids[value] = uuid.UUID(value)
        return found

    def parse_request(self, raw: bytes, endpoint: str, tenant_id: str) -> InferenceRequest:
        """The request in `raw`, bounded by this gateway's settings (n, sequences per request,
        embeddings inputs) and the model's context length, its prefix cache salted with the
        tenant; BadRequest when it is not one to send to a node."""
        s = self.settings
        return parse_request(raw, endpoint, default_reserved=s.default_reserved_tokens,
                             max_n=s.max_n, max_batch_sequences=s.max_batch_sequences,
                             max_inputs=s.max_embedding_inputs,
                             context_length=self.models.context_length, cache_salt=tenant_id)

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
BUDGET_RECONCILER = web.AppKey("budget_reconciler", BudgetReconciler)
GATEWAY_SETTINGS = web.AppKey("gateway_settings", GatewaySettings)


async def gateway_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[GATEWAY_SETTINGS]
    node_keys = NodeKeys(s.node_api_key_secret)  # first: no secret, no start
    registry = app[REGISTRY]
    bus = app[BUS]
    # Auth's cache client: short timeouts, so a dead Redis costs milliseconds, not seconds.
    redis = connect_shared(s.redis_url.reveal(), cluster=s.redis_cluster,
                           timeout=s.ratelimit_redis_timeout)
    app[REDIS_PING] = redis.ping
    # The limiter's: every request's EVALSHAs pipelined on one connection per primary (the
    # hot path), never retried (a retried EVALSHA would count a request twice).
    limiter_redis = connect_limiter(s.redis_url.reveal(), cluster=s.redis_cluster,
                                    timeout=s.ratelimit_redis_timeout)
    rules = RoutingRules(health_threshold=s.health_score_threshold,
                         heartbeat_timeout=s.node_heartbeat_timeout)
    kv_index = KvIndex(s.kv_index_blocks_per_node)
    balancer = Balancer(s.lb_strategy, CircuitBreaker(BreakerRules(
        error_rate=s.circuit_error_rate, min_requests=s.circuit_min_requests,
        window=s.circuit_window_seconds, cooldown=s.circuit_cooldown_seconds)),
        spill=s.lb_prefix_spill, kv_index=kv_index)
    metrics = GatewayMetrics(registry)
    metrics.kv_index_blocks.set_function(lambda: len(kv_index))

    def node_left(node_id: str) -> None:
        balancer.forget(node_id)
        metrics.forget_node(node_id)

    table = NodeTable(on_removed=node_left, on_draining=kv_index.forget)
    upstream = UpstreamPool(connect_timeout=s.upstream_connect_timeout)
    spent = budget_spender(app[DB])
    limiter = RedisRateLimiter(limiter_redis, policy=s.ratelimit_policy,
                               lease_ttl=s.concurrency_lease_seconds, registry=registry,
                               timeout=s.ratelimit_redis_timeout, budget_spent=spent,
                               slices=s.ratelimit_slices)
    reconciler = app[BUDGET_RECONCILER] = BudgetReconciler(
        app[DB], redis, limiter, interval=s.budget_reconcile_seconds)
    models = ModelCatalog(app[DB])
    await models.refresh()
    gw = Gateway(
        settings=s,
        auth=Authenticator(app[DB], redis, auth_settings(s), registry=registry),
        limiter=limiter,
        table=table, balancer=balancer,
        proxy=Proxy(upstream, table, balancer, rules, metrics, node_keys, ProxySettings(
            connect_timeout=s.upstream_connect_timeout, request_timeout=s.request_timeout,
            chunk_timeout=s.stream_chunk_timeout, resume_attempts=s.resume_attempts,
            resume_cutover_seconds=s.resume_cutover_seconds)),
        usage=UsagePublisher(bus, Path(s.usage_spool_dir), buffer_size=s.usage_buffer_size,
                             registry=registry),
        pricer=Pricer(parse_multipliers(s.region_multipliers)),
        models=models, metrics=metrics, bus=bus, leases=LeaseKeeper(
            limiter, s.concurrency_lease_seconds / 3),
        owners=ResponseOwners(redis, s.response_owner_ttl_seconds),
        prompts=PromptBlocks(max_tokens=s.kv_route_max_tokens))
    app[GATEWAY] = gw
    await gw.limiter.load_scripts()
    await seed_nodes(app[DB], table)
    feed = NodeFeed(bus, table)
    await feed.start()
    kv_feed = KvFeed(bus, table, kv_index, metrics)
    if s.lb_strategy == "kv_aware":
        await kv_feed.start()
    # From the CONTROL stream (its mirror, which readers may replay), not plain NATS: an
    # ordered consumer picks up where it left off after a reconnect, so a revocation published
    # while this gateway was cut off still reaches its caches.
    subs: list[Subscription] = [
        await bus.js.subscribe(subject, stream=CONTROL_VIEW.name, ordered_consumer=True,
                               deliver_policy=DeliverPolicy.NEW, cb=gw.on_control_event)
        for subject in CONTROL_SUBJECTS]
    usage_task = asyncio.create_task(gw.usage.run(), name="usage-publisher")
    refresher = asyncio.create_task(_refresh_models(models), name="models-refresh")
    renewer = asyncio.create_task(gw.leases.run(), name="lease-keeper")
    tasks = [usage_task, refresher, renewer]
    if s.budget_reconcile_seconds > 0:
        tasks.append(asyncio.create_task(reconciler.run(), name="budget-reconciler"))
    if s.global_requests_per_minute:
        # Hands back the platform-wide limit's slices this gateway idles on, and at the end
        # all it holds (before the limiter's Redis client closes, below).
        tasks.append(asyncio.create_task(limiter.global_lease.keep(), name="global-share"))
    if s.ratelimit_slices:
        tasks.append(asyncio.create_task(limiter.counter_leases.keep(), name="counter-slices"))
    yield
    for sub in subs:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    await feed.stop()
    await kv_feed.stop()
    await stop_tasks(tasks)
    await gw.usage.close()
    if gw._tasks:
        await asyncio.gather(*gw._tasks, return_exceptions=True)
    await upstream.close()
    await redis.aclose()
    await limiter_redis.aclose()


async def seed_nodes(db: asyncpg.Pool, table: NodeTable) -> None:
    """Nodes from the `nodes` projection, once at start: NATS keeps a node's registration for
    the NODES stream's age only, and a node may serve for longer than that."""
    rows = await db.fetch("SELECT id::text, model_name, endpoint_url, region, status FROM nodes "
                          "WHERE status NOT IN ('terminated', 'failed')")
    for r in rows:
        table.seed(NodeView(r["id"], r["model_name"], r["endpoint_url"], r["region"],
                            status=NodeStatus(r["status"]),
                            draining=r["status"] == NodeStatus.DRAINING))


async def _refresh_models(models: ModelCatalog) -> None:
    """The fallback to model.* events: reload now and then."""
    while True:
        await asyncio.sleep(models.refresh_seconds)
        try:
            await models.refresh()
        except Exception as exc:
            log.warning("could not reload the models", error=str(exc))
