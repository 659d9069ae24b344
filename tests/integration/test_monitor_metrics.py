"""The monitor's fleet series: whichever replica is scraped, the values are the fleet's (from
Redis and PostgreSQL, shared by every replica), only the leader exports them, and a node that
ends takes its series with it."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from schemas.events import NodeDeregistered, NodeHeartbeat
from services.infra.bus import Bus
from services.infra.leadership import lock_key
from services.monitor.app import LEADERSHIP, WATCHER
from tests.helpers import eventually
from tests.integration.test_monitor_states import (  # noqa: F401  (fixtures)
    leader_and_standby,
    start_monitor,
    start_node,
    wait_status,
)

FLEET_SERIES = ("node_health_score{", "node_heartbeat_age_seconds{", "nodes_active_total ",
                "nodes_draining_total ", "nodes_stale_total ")


async def scrape(runner: web.AppRunner) -> str:
    host, port = next(iter(runner.addresses))[:2]
    async with aiohttp.ClientSession() as s, s.get(f"http://{host}:{port}/metrics") as r:
        return await r.text()


def samples(text: str, name: str) -> dict[str, float]:
    """`name`'s samples: label text (or "") → value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(\{{[^}}]*\}})? (\S+)", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def exports_fleet(text: str) -> bool:
    return any(line.startswith(s) for line in text.splitlines() for s in FLEET_SERIES)


async def test_only_the_leader_exports_the_fleet_as_every_replica_recorded_it(
        start_monitor: Any, start_node: Any, pool: asyncpg.Pool) -> None:  # noqa: F811
    first = await start_monitor(stale_after_seconds=30)
    second = await start_monitor(stale_after_seconds=30)
    leader, standby = await leader_and_standby(first, second)
    node = await start_node()
    await wait_status(pool, node, "active")
    label = f'{{node_id="{node.agent.node_id}"}}'

    async def leader_sees_it() -> str:
        text = await scrape(leader)
        return text if samples(text, "nodes_active_total") == {"": 1.0} else ""

    text = await eventually(leader_sees_it, what="the leader's fleet series")
    assert label in samples(text, "node_heartbeat_age_seconds")
    assert samples(text, "monitor_is_leader") == {"": 1.0}
    # A standby exports none of them: no zero that would fire "no active nodes".
    text = await scrape(standby)
    assert not exports_fleet(text), text
    assert samples(text, "monitor_is_leader") == {"": 0.0}

    # The latest heartbeat handled by the *standby* is what the leader exports.
    node.task.cancel()
    await asyncio.gather(node.task, return_exceptions=True)
    assert standby.app is not None
    await standby.app[WATCHER].on_heartbeat(NodeHeartbeat(
        node_id=node.agent.node_id, sequence=node.agent.sequence + 1, health_score=61,
        vllm_healthy=True, model_name="m"))

    async def score_is_61() -> bool:
        return samples(await scrape(leader), "node_health_score").get(label) == 61.0

    await eventually(score_is_61, what="the leader exports the standby's heartbeat")

    # The leader's lock connection dies (the process lives on): the standby takes over and
    # exports; the former leader stops exporting at once, rather than keep what it last saw.
    killed = await pool.fetch(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
        "AND ((classid::bigint << 32) | objid::bigint) = $1", lock_key("monitor-sweeper"))
    assert len(killed) == 1

    async def standby_leads() -> bool:
        return bool(standby.app is not None and standby.app[LEADERSHIP].is_leader)

    await eventually(standby_leads, what="the standby leads")
    new_leader, former = await leader_and_standby(first, second)
    assert new_leader is standby and former is leader

    async def took_over() -> bool:
        return samples(await scrape(new_leader), "node_health_score").get(label) == 61.0

    await eventually(took_over, what="the new leader exports the fleet")
    assert samples(await scrape(new_leader), "nodes_active_total") == {"": 1.0}
    text = await scrape(former)
    assert not exports_fleet(text), text


async def test_a_node_that_ends_leaves_the_metrics(start_monitor: Any, start_node: Any,  # noqa: F811
                                                  pool: asyncpg.Pool, bus: Bus,
                                                  redis_url: str) -> None:
    runner = await start_monitor(stale_after_seconds=30)
    node = await start_node()
    await wait_status(pool, node, "active")
    node_id = str(node.agent.node_id)

    async def exported() -> bool:
        return f'{{node_id="{node_id}"}}' in samples(await scrape(runner), "node_health_score")

    await eventually(exported, what="the node's series")
    node.task.cancel()
    await asyncio.gather(node.task, return_exceptions=True)
    await bus.publish(NodeDeregistered(node_id=node.agent.node_id, reason="bye"))
    await wait_status(pool, node, "terminated")

    async def gone() -> bool:
        text = await scrape(runner)
        return node_id not in text and samples(text, "nodes_active_total") == {"": 0.0}

    await eventually(gone, what="the ended node's series gone")
    r = aioredis.from_url(redis_url)
    try:
        assert await r.zscore("nodes:heard", node_id) is None
        assert await r.hget("nodes:health_score", node_id) is None
    finally:
        await r.aclose()


async def test_a_node_silent_past_the_heartbeat_ttl_leaves_the_metrics(
        start_monitor: Any, start_node: Any, pool: asyncpg.Pool) -> None:  # noqa: F811
    runner = await start_monitor(heartbeat_ttl_seconds=1)
    node = await start_node()
    await wait_status(pool, node, "active")
    label = f'{{node_id="{node.agent.node_id}"}}'

    async def exported() -> bool:
        return label in samples(await scrape(runner), "node_heartbeat_age_seconds")

    await eventually(exported, what="the node's series")
    node.task.cancel()
    await asyncio.gather(node.task, return_exceptions=True)
    await wait_status(pool, node, "stale")

    async def gone() -> bool:
        text = await scrape(runner)
        return label not in text and samples(text, "nodes_stale_total") == {"": 1.0}

    await eventually(gone, what="the silent node's series gone, the node still counted")
