"""The active probes: their verdict holds as long as they fail, a passing probe clears it
whoever set it, and probing never holds up the silence sweep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from services.infra.bus import Bus
from services.infra.devstack import free_port
from services.monitor.app import WATCHER
from tests.helpers import eventually
from tests.integration.test_monitor_outage import Node, active, went_stale
from tests.integration.test_monitor_states import (  # noqa: F401  (fixtures)
    start_monitor,
    start_node,
    wait_status,
)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def probe_rounds(watcher: Any, count: int) -> None:
    target = watcher.probe_rounds + count

    async def done() -> bool:
        return bool(watcher.probe_rounds >= target)

    await eventually(done, what=f"{count} more probe rounds")


async def test_failing_probes_keep_refreshing_their_verdict(start_monitor: Any, start_node: Any,  # noqa: F811
                                                            pool: asyncpg.Pool,
                                                            redis: aioredis.Redis) -> None:
    runner = await start_monitor()
    node = await start_node(advertise=f"http://127.0.0.1:{free_port()}")
    await wait_status(pool, node, "unhealthy")
    flag = f"node:{node.agent.node_id}:probe_failing"
    watcher = runner.app[WATCHER]
    await probe_rounds(watcher, 1)
    before = await redis.pttl(flag)
    # Long enough for an unrefreshed expiry to have visibly run down.
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        await probe_rounds(watcher, 1)
    after = await redis.pttl(flag)
    # Unrefreshed, a second has gone off it; refreshed (every 0.2 s), it is near full again.
    assert before > 0 and after > before - 500, (before, after)


async def test_a_passing_probe_clears_a_verdict_its_predecessor_left(
        start_monitor: Any, start_node: Any, pool: asyncpg.Pool,  # noqa: F811
        redis: aioredis.Redis) -> None:
    await start_monitor()
    node = await start_node()
    await wait_status(pool, node, "active")
    flag = f"node:{node.agent.node_id}:probe_failing"
    # What a leader that died after its probes failed leaves behind, for a minute.
    await redis.set(flag, 3, ex=60)

    async def cleared() -> bool:
        return not await redis.exists(flag)

    await eventually(cleared, timeout=3, what="the stale verdict cleared by a passing probe")
    await wait_status(pool, node, "active")


async def test_unanswered_probes_do_not_hold_up_the_sweep(start_monitor: Any, bus: Bus,  # noqa: F811
                                                          pool: asyncpg.Pool) -> None:
    # A node whose address accepts connections and never answers: each probe of it takes the
    # whole probe timeout (30 s here).
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    blackhole = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = blackhole.sockets[0].getsockname()[1]
    try:
        await start_monitor(probe_timeout_seconds=30)
        mute = Node(bus, pool, endpoint=f"http://127.0.0.1:{port}")
        await mute.register()
        await active(pool, mute)
        quiet = Node(bus, pool)
        await quiet.register()
        await active(pool, quiet)

        # `quiet` stops speaking; `mute` keeps heartbeating (healthy, but never answers).
        async def stale() -> bool:
            await mute.beat()
            return await went_stale(pool, quiet)

        started = time.monotonic()
        await eventually(stale, timeout=8, interval=0.1, what="the silent node stale")
        assert time.monotonic() - started < 8
    finally:
        blackhole.close()
