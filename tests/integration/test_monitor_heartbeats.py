"""Heartbeats from one node handled by two monitor replicas out of order: only the newer is
recorded, and an older one changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import msgspec
import redis.asyncio as aioredis

from schemas.events import NodeHeartbeat
from services.infra.bus import Bus
from services.monitor.app import WATCHER
from tests.helpers import eventually
from tests.integration.test_monitor_outage import Node, active, status
from tests.integration.test_monitor_states import start_monitor  # noqa: F401  (fixture)


def beat(node: UUID, sequence: int, score: int, at: datetime) -> NodeHeartbeat:
    return NodeHeartbeat(node_id=node, sequence=sequence, health_score=score,
                         vllm_healthy=True, model_name="llama-8b", occurred_at=at)


async def handled(watcher: Any, before: int) -> None:
    async def done() -> bool:
        return bool(watcher.heartbeats > before)

    await eventually(done, what="the heartbeat handled")


async def latest(redis: aioredis.Redis, node: UUID) -> tuple[int, int]:
    raw = await redis.get(f"node:{node}:heartbeat")
    hb = msgspec.json.decode(raw, type=NodeHeartbeat)
    return hb.sequence, int(await redis.get(f"node:{node}:health_score"))


async def test_an_older_heartbeat_handled_later_changes_nothing(
        start_monitor: Any, bus: Bus, pool: asyncpg.Pool,  # noqa: F811
        redis_url: str) -> None:
    settings = dict(probe_every_seconds=3600, stale_after_seconds=60)
    a = (await start_monitor(**settings)).app[WATCHER]
    b = (await start_monitor(**settings)).app[WATCHER]
    node = Node(bus, pool)
    await node.register()
    await active(pool, node)  # its own heartbeats: sequences 1, 2, ... timed now
    redis = aioredis.from_url(redis_url)
    try:
        later = datetime.now(UTC) + timedelta(seconds=30)
        # Heartbeat 100 (healthy) is handled by one replica; 99, sent before it and saying
        # the node was failing, reaches the other replica only afterwards.
        n = a.heartbeats
        await a.on_heartbeat(beat(node.id, 100, 95, later))
        await handled(a, n)
        n = b.heartbeats
        await b.on_heartbeat(beat(node.id, 99, 10, later - timedelta(seconds=15)))
        await handled(b, n)
        assert await latest(redis, node.id) == (100, 95)
        assert await status(pool, node) == "active"
        assert b.metrics.superseded._value.get() == 1
        assert await redis.hget("nodes:health_score", str(node.id)) == b"95"

        # An agent that restarted counts from 1 again: its clock says it is newer.
        n = b.heartbeats
        await b.on_heartbeat(beat(node.id, 1, 80, later + timedelta(seconds=15)))
        await handled(b, n)
        assert await latest(redis, node.id) == (1, 80)
    finally:
        await redis.aclose()
