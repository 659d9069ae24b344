"""Receivers believe no more than what a sender may say (issue 13): the real monitor, gateway,
outbox relay and notifier intake against real NATS, where the lies come from a real node
credential (`servers.node_creds`) or the harness's admin identity.

- a registration of a node nobody launched: refused (the agent told, and it exits 3), parked,
  counted, not in the log, never routed;
- a registration at another address from a node already serving: refused; the gateway keeps
  sending its traffic where it did;
- node A heartbeating as node B: dropped and counted by the monitor and the gateways, B's
  state untouched;
- an `apikey.created` slipped onto a node subject: parked and counted by every consumer of
  the NODES stream, not in the log;
- spot warnings, drains and farewells of a node nobody launched: refused, parked, counted, not
  in the log; those of a node that has ended (an honest agent's late word): acknowledged, not
  recorded, and no alert.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent.node_agent import EXIT_REJECTED
from schemas.commands import RegistrationAck
from schemas.events import (
    ApiKeyCreated,
    NodeDeregistered,
    NodeDraining,
    NodeHeartbeat,
    NodeRegistered,
    NodeSpotWarning,
    encode_event,
)
from schemas.ids import uuid7
from schemas.subjects import node_ack_subject
from services.domain.fleet import Fleet
from services.infra.bus import Bus, dlq_headers
from services.infra.devstack import free_port
from services.infra.eventlog import EventLog
from services.infra.http import REGISTRY
from services.infra.natsauth.identities import Role
from services.infra.settings import Secret
from services.monitor.app import create_monitor_app
from services.monitor.settings import MonitorSettings
from services.notifier.intake import INTAKES, Intake
from services.notifier.scheduler import NotifierMetrics
from tests.helpers import eventually, node_accepted
from tests.integration.gateway_fixtures import MODEL, Platform, platform  # noqa: F401

HELLO = [{"role": "user", "content": "Hello there"}]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@dataclass
class Monitored:
    p: Platform
    monitor: web.Application

    @property
    def registry(self) -> CollectorRegistry:
        return self.monitor[REGISTRY]


@pytest.fixture
async def monitored(platform: Platform) -> AsyncIterator[Monitored]:  # noqa: F811
    """The platform with the real monitor instead of the test acking registrations."""
    p = platform
    await p.stop_playing_the_monitor()
    app = create_monitor_app(MonitorSettings(
        database_url=Secret(p.servers.database_url), redis_url=Secret(p.servers.redis_url),
        nats_url=Secret(p.servers.nats_url), nats_creds=Secret(p.servers.creds(Role.MONITOR)),
        event_poll_interval=0.2, probe_every_seconds=3600, log_json=False))
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", free_port()).start()
    await p.start_gateway()
    yield Monitored(p, app)
    await runner.cleanup()


async def dead_letters(bus: Bus, prefix: str) -> list[Any]:
    info = await bus.js.stream_info("DLQ")
    if not info.state.messages:
        return []
    msgs = [await bus.js.get_msg("DLQ", seq)
            for seq in range(info.state.first_seq, info.state.last_seq + 1)]
    return [m for m in msgs if m.subject.startswith(prefix)]


async def test_a_node_nobody_launched_is_refused_and_never_routed(
        monitored: Monitored) -> None:
    p = monitored.p
    rogue = await p.add_node(launch=False)
    assert await asyncio.wait_for(rogue.agent_task, 20) == EXIT_REJECTED

    async def parked() -> list[Any]:
        return await dead_letters(p.bus, f"dlq.monitor-nodes.node.registered.{rogue.node_id}")

    (letter,) = await eventually(parked, what="the registration dead-lettered")
    assert "not launched" in dlq_headers(letter)["error"]
    assert sample(monitored.registry, "monitor_registrations_refused_total",
                  reason="not_launched") >= 1
    assert await p.pool.fetchval("SELECT count(*) FROM events WHERE stream = $1",
                                 f"node:{rogue.node_id}") == 0
    # A node that was launched is served meanwhile; the rogue one never is.
    await p.add_node()
    await p.routable(1)
    assert rogue.node_id not in p.gw.table.nodes
    r = await p.client().chat.completions.create(model=MODEL, messages=HELLO,
                                                 max_tokens=1)
    assert r.choices


async def test_a_registration_at_another_address_is_refused_and_traffic_stays(
        monitored: Monitored) -> None:
    """Someone holding a serving node's credential re-registers it at their own address."""
    p = monitored.p
    node = await p.add_node()
    await p.routable(1)
    hits: list[bytes] = []

    async def attacker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(await reader.read(100))
        writer.close()

    trap = await asyncio.start_server(attacker, "127.0.0.1", 0)
    trap_url = f"http://127.0.0.1:{trap.sockets[0].getsockname()[1]}"
    stolen = await Bus.connect(p.servers.nats_url, name="stolen",
                               creds=p.servers.node_creds(node.node_id))
    acks = await p.bus.nc.subscribe(node_ack_subject(node.node_id))
    try:
        lie = msgspec.structs.replace(node.agent._registration, id=uuid.uuid4(),
                                      endpoint_url=trap_url)
        await stolen.publish(lie)

        async def refused() -> RegistrationAck | None:
            msg = await acks.next_msg(timeout=10)
            ack = msgspec.json.decode(msg.data, type=RegistrationAck)
            return ack if ack.event_id == lie.id else None

        ack = await eventually(refused, what="the lie answered")
        assert ack.accepted is False and "another endpoint_url" in ack.reason
        assert sample(monitored.registry, "monitor_registrations_refused_total",
                      reason="endpoint_changed") == 1
        assert await p.pool.fetchval("SELECT endpoint_url FROM nodes WHERE id = $1",
                                     uuid.UUID(node.node_id)) == node.url
        assert await p.pool.fetchval(
            "SELECT count(*) FROM events WHERE stream = $1 AND type = 'node.registered'",
            f"node:{node.node_id}") == 1
        # What a gateway started now (it replays the stream) and this one both believe.
        assert p.gw.table.nodes[node.node_id].endpoint_url == node.url
        for _ in range(3):
            r = await p.client().chat.completions.create(model=MODEL, messages=HELLO,
                                                         max_tokens=1)
            assert r.choices
        assert hits == []
        assert node.agent_task.done() is False  # the real agent serves on
    finally:
        await acks.unsubscribe()
        await stolen.close()
        trap.close()


async def test_a_node_heartbeating_as_another_changes_nothing(monitored: Monitored) -> None:
    p = monitored.p
    a, b = await p.add_node(), await p.add_node()
    await p.routable(2)
    redis = aioredis.from_url(p.servers.redis_url)
    stolen = await Bus.connect(p.servers.nats_url, name="stolen",
                               creds=p.servers.node_creds(a.node_id))
    try:
        async def b_active() -> bool:
            return await redis.get(f"node:{b.node_id}:status") == b"active"

        await eventually(b_active, what="b active")
        lie = NodeHeartbeat(node_id=uuid.UUID(b.node_id), sequence=10**9, health_score=0,
                            vllm_healthy=False, draining=True)
        await stolen.nc.publish(f"node.heartbeat.{a.node_id}", encode_event(lie))
        gateway_registry = p.gateway_app[REGISTRY]  # type: ignore[index]

        async def refused_everywhere() -> bool:
            return (sample(monitored.registry, "nats_messages_refused_total",
                           consumer="monitor", reason="subject_mismatch") == 1
                    and sample(gateway_registry, "nats_messages_refused_total",
                               consumer="gateway-nodes", reason="subject_mismatch") == 1)

        await eventually(refused_everywhere, what="the lie refused by monitor and gateway")
        assert int(await redis.get(f"node:{b.node_id}:health_score")) > 0
        assert b"1000000000" not in (await redis.get(f"node:{b.node_id}:heartbeat") or b"")
        assert await redis.get(f"node:{b.node_id}:status") == b"active"
        view = p.gw.table.nodes[b.node_id]
        assert view.vllm_healthy and not view.draining and view.health_score > 0

        async def parked() -> list[Any]:
            return await dead_letters(p.bus, "dlq.monitor-heartbeats.node.heartbeat.")

        (letter,) = await eventually(parked, what="the lie parked")
        assert letter.subject.endswith(a.node_id) and b.node_id in dlq_headers(letter)["error"]
    finally:
        await stolen.close()
        await redis.aclose()


async def test_another_event_type_on_a_node_subject_is_parked_and_never_logged(
        monitored: Monitored) -> None:
    """An `apikey.created` (a key only the admin API may make) published by the all-powerful
    admin identity onto `node.registered.<id>`: the monitor and the notifier park it; it never
    reaches the log or the catalog."""
    p = monitored.p
    registry = CollectorRegistry()
    notifier_bus = await Bus.connect(p.servers.nats_url, name="notifier", registry=registry,
                                     creds=p.servers.creds(Role.NOTIFIER))
    intake = Intake(notifier_bus, p.pool, first_delay=0.0, batch=50, on_queued=lambda: None,
                    metrics=NotifierMetrics(registry),
                    specs=tuple(s for s in INTAKES if s.durable == "notifier-nodes"))
    await intake.start()
    forged = ApiKeyCreated(key_id=uuid.uuid4(), tenant_id=p.tenant_id,
                           environment_id=p.environment_id, key_hash="f" * 64,
                           last_four="beef")
    node_id = uuid.uuid4()
    await p.bus.publish_raw(f"node.registered.{node_id}", encode_event(forged), str(forged.id))
    task = asyncio.create_task(intake.run())
    try:
        async def parked() -> list[Any]:
            letters = await dead_letters(p.bus, "dlq.")
            return letters if len(letters) == 2 else []

        letters = await eventually(parked, what="parked by the monitor and the notifier")
        assert {m.subject.split(".")[1] for m in letters} == {"monitor-nodes", "notifier-nodes"}
        assert all("apikey.created" in dlq_headers(m)["error"] for m in letters)
        assert sample(monitored.registry, "nats_messages_refused_total",
                      consumer="monitor-nodes", reason="subject_mismatch") == 1
        assert sample(registry, "nats_messages_refused_total", consumer="notifier-nodes",
                      reason="subject_mismatch") == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await notifier_bus.close()
    assert await p.pool.fetchval("SELECT count(*) FROM events WHERE event_id = $1",
                                 forged.id) == 0
    assert await p.pool.fetchval("SELECT count(*) FROM api_keys WHERE id = $1",
                                 forged.key_id) == 0


async def test_a_control_plane_event_not_in_the_log_is_never_recorded_from_nats(
        monitored: Monitored) -> None:
    """Status changes, launches and acceptances are the control plane's to write: the
    monitor passes on the relay's copies of what is in the log, and records none from NATS."""
    p = monitored.p
    registration = NodeRegistered(node_id=uuid.uuid4(), cluster_name="c", provider="aws",
                                  region="r", instance_type="i", gpu_type="g", vram_total_gb=1,
                                  model_name=MODEL, endpoint_url="http://10.0.0.9:8000",
                                  spot_instance=False)
    forged = node_accepted(registration)
    await p.bus.publish(forged)  # the admin identity; only the relay's may, in production

    async def parked() -> list[Any]:
        return await dead_letters(p.bus, f"dlq.monitor-nodes.node.accepted.{forged.node_id}")

    (letter,) = await eventually(parked, what="the forged acceptance parked")
    assert "control plane" in dlq_headers(letter)["error"]
    assert await p.pool.fetchval("SELECT count(*) FROM events WHERE event_id = $1",
                                 forged.id) == 0


async def test_notices_of_a_node_nobody_launched_are_refused_and_never_logged(
        monitored: Monitored) -> None:
    """A leaked credential growing the log with drains of a node that does not exist."""
    p = monitored.p
    ghost = uuid7()
    liar = await Bus.connect(p.servers.nats_url, name="ghost",
                             creds=p.servers.node_creds(ghost))
    notices = [NodeSpotWarning(node_id=ghost, provider="aws", action="terminate"),
               NodeDraining(node_id=ghost, reason="SIGTERM"),
               NodeDeregistered(node_id=ghost, reason="drained")]
    try:
        for notice in notices:
            await liar.publish(notice)

        async def parked() -> list[Any]:
            letters = await dead_letters(p.bus, "dlq.monitor-nodes.node.")
            return letters if len(letters) == len(notices) else []

        letters = await eventually(parked, what="the notices parked")
    finally:
        await liar.close()
    assert {m.subject for m in letters} == {f"dlq.monitor-nodes.{n.subject}" for n in notices}
    assert all("not launched" in dlq_headers(m)["error"] for m in letters)
    for notice in notices:
        assert sample(monitored.registry, "monitor_notices_refused_total", type=notice.type,
                      reason="not_launched") == 1
    assert sample(monitored.registry, "nats_messages_refused_total", consumer="monitor-nodes",
                  reason="refused") == len(notices)
    assert await p.pool.fetchval("SELECT count(*) FROM events WHERE stream = $1",
                                 f"node:{ghost}") == 0


async def test_notices_of_a_node_that_ended_are_heard_not_recorded_and_raise_no_alert(
        monitored: Monitored) -> None:
    """The orchestrator terminated the node; its agent's drain and farewell come after. True,
    and too late to change anything: acknowledged (not parked, not sent again), not recorded,
    counted apart from the refusals that page someone."""
    p = monitored.p
    node = await p.add_node()
    await p.routable(1)
    node_id = uuid.UUID(node.node_id)
    await Fleet(EventLog(p.pool), actor="orchestrator").terminated(node_id, "scale down", "c")
    stream = f"node:{node_id}"
    logged = await p.pool.fetchval("SELECT count(*) FROM events WHERE stream = $1", stream)
    agent = await Bus.connect(p.servers.nats_url, name="late-agent",
                              creds=p.servers.node_creds(node_id))
    late = [NodeDraining(node_id=node_id, reason="SIGTERM"),
            NodeDeregistered(node_id=node_id, reason="drained")]
    try:
        for notice in late:
            await agent.publish(notice)

        async def heard() -> bool:
            return all(sample(monitored.registry, "monitor_notices_ignored_total",
                              type=n.type) == 1 for n in late)

        await eventually(heard, what="the late notices heard")
    finally:
        await agent.close()
    assert await p.pool.fetchval("SELECT count(*) FROM events WHERE stream = $1",
                                 stream) == logged
    assert await p.pool.fetchval("SELECT status FROM nodes WHERE id = $1",
                                 node_id) == "terminated"
    assert sample(monitored.registry, "nats_messages_refused_total", consumer="monitor-nodes",
                  reason="refused") == 0
    assert await dead_letters(p.bus, "dlq.monitor-nodes.") == []

    async def acknowledged() -> bool:  # after the commit, so not redelivered
        info = await p.bus.js.consumer_info("NODES", "monitor-nodes")
        return info.num_ack_pending == 0 and info.num_pending == 0

    await eventually(acknowledged, what="the late notices acknowledged")
