"""The active probes: their verdict holds as long as they fail, a passing probe clears it
whoever set it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from services.core.devstack import free_port
from services.monitor.app import WATCHER
from tests.helpers import eventually
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
    assert before > 0 and after > before, (before, after)


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
