"""The monitor with real agents, NATS, Redis and PostgreSQL: registration acknowledged after it
is recorded, heartbeats in Redis, the nodes projection, bad registrations parked."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from agent.node_agent import EXIT_REJECTED, NodeAgent
from agent.settings import AgentSettings
from agent.simulator import SimulatorConfig, create_app
from schemas.commands import RegistrationAck
from schemas.events import (
    NodeHeartbeat,
    NodeRegistered,
    NodeStatus,
    NodeStatusChanged,
    NodeTerminated,
    encode_event,
)
from schemas.ids import uuid7
from schemas.subjects import NODES, node_ack_subject
from services.domain.fleet import Fleet
from services.infra.bus import Bus
from services.infra.devstack import free_port
from services.infra.eventlog import EventLog
from services.infra.natsauth.identities import Role
from services.infra.settings import Secret
from services.monitor.app import NODE_RECORDER, create_monitor_app, refusal, to_remember
from services.monitor.settings import MonitorSettings
from tests.conftest import Servers
from tests.helpers import eventually, launched, node_registered


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
                               nats_creds=Secret(servers.creds(Role.MONITOR)), log_json=False)
    app = create_monitor_app(settings)
    _, runner = await serve(app)
    yield app
    await runner.cleanup()


@pytest.fixture
async def node(servers: Servers, pool: asyncpg.Pool) -> AsyncIterator[dict[str, Any]]:
    url, runner = await serve(create_app(SimulatorConfig(model="m")))
    node_id = uuid7()
    await launched(pool, node_id, model="m", region="eu-west-1")  # as the orchestrator does
    settings = AgentSettings(nats_url=Secret(servers.nats_url), node_id=node_id, model_name="m",
                             nats_creds=Secret(servers.node_creds(node_id)),
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
    # The ack came after the commit: the event is in the log already, and with it (same
    # transaction) the acceptance gateways route by, for the relay to publish.
    rows = await pool.fetch("SELECT type, origin, transaction_id, data FROM events "
                            "WHERE stream = $1 ORDER BY stream_version",
                            f"node:{agent.node_id}")
    assert [(r["type"], r["origin"]) for r in rows[:3]] == [
        ("node.launching", "log"), ("node.registered", "bus"), ("node.accepted", "log")]
    assert rows[1]["transaction_id"] == rows[2]["transaction_id"]
    assert rows[2]["data"]["endpoint_url"] == node["url"]
    assert rows[2]["data"]["registration_id"] == str(agent._registration.id)

    async def projected() -> asyncpg.Record | None:
        # The row is there from the launch on; the registration reaches it a moment after
        # the ack (the projection runner follows the log).
        return await pool.fetchrow("SELECT * FROM nodes WHERE id = $1 AND endpoint_url <> ''",
                                   agent.node_id)

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
    await launched(pool, good.node_id)
    await launched(pool, bad.node_id, model="m")
    await bus.publish(bad)
    await bus.publish(good)

    async def settled() -> bool:
        dlq = (await bus.js.stream_info("DLQ")).state.messages
        recorded = await pool.fetchval("SELECT count(*) FROM events WHERE origin = 'bus'")
        return dlq == 1 and recorded == 1

    await eventually(settled, what="good recorded, bad parked")
    parked = await bus.js.get_msg("DLQ", 1)
    assert "unusable endpoint_url" in (parked.headers or {})["Crosslogic-Error"]


async def test_a_registration_published_again_is_acked_and_moves_no_node_back(
        monitor: web.Application, node: dict[str, Any], bus: Bus, pool: asyncpg.Pool,
        redis_url: str) -> None:
    """An agent whose ack was lost publishes its registration again under another message id
    (agent/registration.py). The monitor acks the copy too, but the node, active by then, stays
    active in the cache: the copy is not news."""
    agent: NodeAgent = node["agent"]
    await asyncio.wait_for(agent.registered.wait(), 15)
    r = aioredis.from_url(redis_url)
    acks = await bus.nc.subscribe(node_ack_subject(agent.node_id))
    try:
        async def active() -> bool:
            return await r.get(f"node:{agent.node_id}:status") == b"active"

        await eventually(active, what="the node active in the cache")
        registration = agent._registration  # the very event the agent keeps publishing
        stored = await bus.publish_raw(registration.subject, encode_event(registration),
                                       f"{registration.id}.2")
        assert not stored.duplicate

        ack = msgspec.json.decode((await acks.next_msg(timeout=10)).data, type=RegistrationAck)
        assert (ack.event_id, ack.accepted) == (registration.id, True)

        async def handled() -> bool:  # the copy's whole batch, after-commit hook included
            info = await bus.js.consumer_info(NODES.name, NODE_RECORDER.durable)
            return info.ack_floor.stream_seq >= stored.seq

        await eventually(handled, what="the copy handled and acked")
        assert await r.get(f"node:{agent.node_id}:status") == b"active"
        assert await pool.fetchval("SELECT count(*) FROM events WHERE type = 'node.registered'"
                                   ) == 1
    finally:
        await acks.unsubscribe()
        await r.aclose()


async def test_a_refused_registration_is_answered_and_the_agent_stops(
        monitor: web.Application, servers: Servers, bus: Bus, pool: asyncpg.Pool) -> None:
    """A registration check_registration refuses goes to the dead letters, and the agent is
    told why (accepted: false) instead of publishing it forever: it exits 3."""
    url, runner = await serve(create_app(SimulatorConfig(model="m")))
    node_id = uuid7()
    await launched(pool, node_id, model="m")
    settings = AgentSettings(nats_url=Secret(servers.nats_url), node_id=node_id, model_name="m",
                             nats_creds=Secret(servers.node_creds(node_id)),
                             vllm_url=url, endpoint_url="ftp://nowhere", heartbeat_interval=0.2,
                             registration_timeout=2.0, log_json=False)
    acks = await bus.nc.subscribe(node_ack_subject(settings.node_id))
    try:
        agent = NodeAgent(settings)
        assert await asyncio.wait_for(agent.run(), 20) == EXIT_REJECTED
        ack = msgspec.json.decode((await acks.next_msg(timeout=1)).data, type=RegistrationAck)
        assert ack.accepted is False and "unusable endpoint_url" in ack.reason
        assert ack.event_id == agent._registration.id

        async def parked() -> bool:
            return (await bus.js.stream_info("DLQ")).state.messages >= 1

        await eventually(parked, what="the registration dead-lettered")
        assert await pool.fetchval("SELECT count(*) FROM events WHERE type = 'node.registered'"
                                   ) == 0
    finally:
        await acks.unsubscribe()
        await runner.cleanup()


def test_only_news_moves_the_cached_status() -> None:
    fresh, copy = node_registered(), node_registered()
    relayed = NodeStatusChanged(node_id=uuid.uuid4(), from_status=NodeStatus.REGISTERED,
                                to_status=NodeStatus.ACTIVE)
    heartbeat = NodeHeartbeat(node_id=uuid.uuid4(), sequence=1, health_score=90,
                              vllm_healthy=True)
    events = [fresh, copy, relayed, heartbeat]
    assert to_remember(events, {fresh.id}, {relayed.id}) == [fresh, relayed]
    assert to_remember(events, set(), set()) == []
    assert refusal(copy, "no model").accepted is False


async def test_what_the_control_plane_wrote_still_moves_the_cached_status(
        monitor: web.Application, node: dict[str, Any], bus: Bus, pool: asyncpg.Pool,
        redis_url: str) -> None:
    """Events other services append (origin 'log') reach the monitor through the relay, and
    are in the log before it sees them: they are news all the same."""
    agent: NodeAgent = node["agent"]
    await asyncio.wait_for(agent.registered.wait(), 15)
    r = aioredis.from_url(redis_url)
    try:
        async def status() -> bytes | None:
            return await r.get(f"node:{agent.node_id}:status")  # type: ignore[no-any-return]

        await eventually(lambda: _is(status, b"active"), what="the node active")
        log = EventLog(pool)
        await Fleet(log, actor="orchestrator").terminated(agent.node_id, "test", "c1")
        terminated = (await log.read_stream(f"node:{agent.node_id}"))[-1].event
        assert isinstance(terminated, NodeTerminated)
        await bus.publish(terminated)  # as the outbox relay does
        await eventually(lambda: _is(status, b"terminated"), what="the cache following the log")
    finally:
        await r.aclose()


async def _is(read: Callable[[], Awaitable[bytes | None]], want: bytes) -> bool:
    return await read() == want
