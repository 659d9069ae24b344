"""The monitor with real agents, NATS, Redis and PostgreSQL: registration acknowledged after it
is recorded, heartbeats in Redis, the nodes projection, bad registrations parked."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from agent.node_agent import NodeAgent
from agent.settings import AgentSettings
from agent.simulator import SimulatorConfig, create_app
from schemas.events import NodeHeartbeat, NodeRegistered
from schemas.ids import uuid7
from services.core.bus import Bus
from services.core.devstack import free_port
from services.core.settings import Secret
from services.monitor.app import create_monitor_app
from services.monitor.settings import MonitorSettings
from tests.conftest import Servers
from tests.helpers import eventually, node_registered


async def serve(app: web.Application) -> tuple[str, web.AppRunner]:
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}", runner


@pytest.fixture
async def monitor(servers: Servers, database_url: str, redis_url: str,
                  bus: Bus) -> AsyncIterator[web.Application]:
    settings = MonitorSettings(database_url=Secret(database_url), redis_url=Secret(redis_url),
                               nats_url=Secret(servers.nats_url), event_poll_interval=0.2,
                               log_json=False)
    app = create_monitor_app(settings)
    _, runner = await serve(app)
    yield app
    await runner.cleanup()


@pytest.fixture
async def node(servers: Servers) -> AsyncIterator[dict[str, Any]]:
    url, runner = await serve(create_app(SimulatorConfig(model="m")))
    settings = AgentSettings(nats_url=Secret(servers.nats_url), node_id=uuid7(), model_name="m",
                             vllm_url=url, heartbeat_interval=0.2, log_json=False,
                             cluster_name="c1", region="eu-west-1")
    agent = NodeAgent(settings)
    task = asyncio.create_task(agent.run())
    yield {"agent": agent, "url": url}
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await runner.cleanup()


async def test_registration_is_recorded_then_acknowledged(monitor: web.Application,
                                                         node: dict[str, Any],
                                                         pool: asyncpg.Pool,
                                                         redis_url: str) -> None:
    agent: NodeAgent = node["agent"]
    await asyncio.wait_for(agent.registered.wait(), 15)
    # The ack came after the commit: the event is in the log already.
    assert await pool.fetchval("SELECT count(*) FROM events WHERE type = 'node.registered' "
                               "AND origin = 'bus'") == 1

    async def projected() -> asyncpg.Record | None:
        return await pool.fetchrow("SELECT * FROM nodes WHERE id = $1", agent.node_id)

    row = await eventually(projected, what="the nodes projection")
    assert (row["model_name"], row["endpoint_url"], row["region"]) == \
        ("m", node["url"], "eu-west-1")
    assert row["status"] in ("registered", "active")

    r = aioredis.from_url(redis_url)
    try:
        async def heartbeat() -> bytes | None:
            return await r.get(f"node:{agent.node_id}:heartbeat")  # type: ignore[no-any-return]

        raw = await eventually(heartbeat, what="latest heartbeat in redis")
        beat = msgspec.json.decode(raw, type=NodeHeartbeat)
        assert beat.node_id == agent.node_id and beat.vllm_healthy
        assert int(await r.get(f"node:{agent.node_id}:health_score")) == beat.health_score
        assert 0 < await r.ttl(f"node:{agent.node_id}:heartbeat") <= 300
    finally:
        await r.aclose()
    # Heartbeats are observations: none of them went into the log.
    assert await pool.fetchval("SELECT count(*) FROM events WHERE type = 'node.heartbeat'") == 0


async def test_unroutable_registration_is_parked_not_recorded(monitor: web.Application,
                                                              bus: Bus,
                                                              pool: asyncpg.Pool) -> None:
    good = node_registered()
    bad = NodeRegistered(node_id=uuid.uuid4(), cluster_name="c", provider="aws",
                         region="r", instance_type="i", gpu_type="g", vram_total_gb=1,
                         model_name="m", endpoint_url="not a url", spot_instance=False)
    await bus.publish(bad)
    await bus.publish(good)

    async def settled() -> bool:
        dlq = (await bus.js.stream_info("DLQ")).state.messages
        recorded = await pool.fetchval("SELECT count(*) FROM events")
        return dlq == 1 and recorded == 1

    await eventually(settled, what="good recorded, bad parked")
    parked = await bus.js.get_msg("DLQ", 1)
    assert "unusable endpoint_url" in (parked.headers or {})["Crosslogic-Error"]
