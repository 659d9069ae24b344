"""The monitor's own blindness is not the nodes' silence: after every monitor was down, or NATS
was, for longer than the staleness timeout, no node is declared stale until the monitor has
listened again for a whole window. The node here is the test itself, publishing what an agent
publishes, so that nothing but the monitor's blindness keeps it quiet."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from schemas.events import NodeHeartbeat
from services.domain.node_hot_data import LAST_SEEN
from services.infra.bus import Bus
from services.infra.http import BUS
from services.monitor.app import WATCHER
from services.monitor.watcher import WATCHED_AT
from tests.conftest import Servers
from tests.helpers import eventually, launched, node_registered
from tests.integration.test_monitor_states import start_monitor  # noqa: F401  (fixture)

# A short window, a short blindness threshold; no probes (the node has no real endpoint).
TIMING: dict[str, Any] = dict(stale_after_seconds=0.8, blind_after_seconds=1.0,
                              probe_every_seconds=3600)


class Node:
    def __init__(self, bus: Bus, pool: asyncpg.Pool, *, endpoint: str = "") -> None:
        self.bus = bus
        self.pool = pool
        self.id = uuid.uuid4()
        self.sequence = 0
        self.endpoint = endpoint

    async def register(self) -> None:
        """As a launched node does: the orchestrator recorded the launch first."""
        await launched(self.pool, self.id)
        event = node_registered(self.id)
        if self.endpoint:
            event = msgspec.structs.replace(event, endpoint_url=self.endpoint)
        await self.bus.publish(event)

    async def beat(self) -> None:
        self.sequence += 1
        await self.bus.publish_observation(NodeHeartbeat(
            node_id=self.id, sequence=self.sequence, health_score=100, vllm_healthy=True,
            model_name="llama-8b"))


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def status(pool: asyncpg.Pool, node: Node) -> str | None:
    value = await pool.fetchval("SELECT status FROM nodes WHERE id = $1", node.id)
    return str(value) if value else None


async def went_stale(pool: asyncpg.Pool, node: Node) -> bool:
    return bool(await pool.fetchval(
        "SELECT count(*) FROM events WHERE type = 'node.status_changed' AND stream = $1 "
        "AND data->>'to_status' = 'stale'", f"node:{node.id}"))


async def active(pool: asyncpg.Pool, node: Node) -> None:
    async def reached() -> bool:
        if await status(pool, node) == "active":
            return True
        await node.beat()  # the first may come before the registration is recorded
        return False

    await eventually(reached, interval=0.1, what="node active")


async def silent_for(redis: aioredis.Redis, node: Node, seconds: float) -> None:
    async def long_enough() -> bool:
        seen = await redis.zscore(LAST_SEEN, str(node.id))
        return seen is not None and time.time() - seen > seconds

    await eventually(long_enough, what=f"no heartbeat recorded for {seconds}s")


async def sweeps(app: web.Application, count: int) -> None:
    watcher = app[WATCHER]
    target = watcher.sweeps + count

    async def swept() -> bool:
        return bool(watcher.sweeps >= target)

    await eventually(swept, what=f"{count} more sweeps")


async def test_a_monitor_back_after_every_monitor_was_down_declares_nothing_at_once(
        start_monitor: Any, bus: Bus, pool: asyncpg.Pool, redis: aioredis.Redis) -> None:  # noqa: F811
    first = await start_monitor(**TIMING)
    node = Node(bus, pool)
    await node.register()
    await active(pool, node)
    await first.cleanup()  # every monitor down

    async def unwatched() -> bool:
        swept = await redis.get(WATCHED_AT)
        return swept is not None and time.time() - float(swept) > TIMING["blind_after_seconds"]

    await eventually(unwatched, what="no sweep for longer than blind_after")
    await silent_for(redis, node, TIMING["stale_after_seconds"])

    second = await start_monitor(**TIMING)
    assert second.app is not None
    await sweeps(second.app, 3)
    assert await status(pool, node) == "active" and not await went_stale(pool, node)
    assert second.app[WATCHER].metrics.grace._value.get() == 1

    # The grace is one window, no more: a node that stays silent through it is stale.
    async def stale() -> bool:
        return await status(pool, node) == "stale"

    await eventually(stale, timeout=5, what="the silent node stale after the grace")
    assert second.app[WATCHER].metrics.grace._value.get() == 0


async def test_nats_down_longer_than_the_window_declares_nothing(
        start_monitor: Any, bus: Bus, pool: asyncpg.Pool, redis: aioredis.Redis,  # noqa: F811
        servers: Servers) -> None:
    if servers.nats is None:
        pytest.skip("needs the embedded NATS server (stopped and started by the test)")
    runner = await start_monitor(**TIMING)
    app = runner.app
    assert app is not None
    node = Node(bus, pool)
    await node.register()
    await active(pool, node)

    servers.nats.stop()
    try:
        async def blind() -> bool:
            return not app[BUS].connected

        await eventually(blind, what="the monitor's NATS connection down")
        await silent_for(redis, node, TIMING["stale_after_seconds"] * 2)
        await sweeps(app, 3)
        assert await status(pool, node) == "active" and not await went_stale(pool, node)
    finally:
        servers.nats.start()

    async def heard_again() -> bool:
        if not (app[BUS].connected and bus.connected):
            return False
        await node.beat()  # the node never stopped; its heartbeats get through again
        seen = await redis.zscore(LAST_SEEN, str(node.id))
        return seen is not None and time.time() - seen < TIMING["stale_after_seconds"]

    await eventually(heard_again, interval=0.1, what="heartbeats heard again")
    # A whole window after NATS came back, with the node speaking: it never went stale.
    watcher = app[WATCHER]

    async def grace_over() -> bool:
        await node.beat()
        return bool(watcher.metrics.grace._value.get() == 0)

    await eventually(grace_over, interval=0.1, what="the grace over")
    await sweeps(app, 3)
    assert await status(pool, node) == "active" and not await went_stale(pool, node)
