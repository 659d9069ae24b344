"""The gateway's node feed: a gateway (or worker) that starts while the fleet is quiet routes
on its first request, from what NATS has stored; only nodes the monitor accepted, and nothing a
message says that its subject does not name."""

from __future__ import annotations

import time
import uuid

from prometheus_client import CollectorRegistry

from schemas.events import ApiKeyCreated, NodeHeartbeat, NodeStatus, NodeStatusChanged, encode_event
from services.gateway.node_feed import CONSUMER, NodeFeed
from services.gateway.nodes import NodeTable, RoutingRules
from services.infra.bus import Bus
from services.infra.natsauth.identities import Role
from tests.conftest import Servers
from tests.helpers import eventually, node_accepted, node_registered

RULES = RoutingRules(health_threshold=50, heartbeat_timeout=60)


def beat(node_id: uuid.UUID, score: int) -> NodeHeartbeat:
    return NodeHeartbeat(node_id=node_id, sequence=1, health_score=score, vllm_healthy=True)


async def test_start_returns_with_the_stored_fleet_routable(bus: Bus) -> None:
    up, gone, sick, unaccepted = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for n in (up, gone, sick):
        await bus.publish(registration := node_registered(n, model="m"))
        await bus.publish(node_accepted(registration))
    await bus.publish(node_registered(unaccepted, model="m"))  # never accepted: not a node
    await bus.publish(beat(unaccepted, 90))
    await bus.publish(NodeStatusChanged(node_id=gone, from_status=NodeStatus.ACTIVE,
                                        to_status=NodeStatus.TERMINATED, reason="test"))
    # Heartbeats are sent on core NATS; the HEARTBEATS stream keeps them a few minutes.
    await bus.publish(beat(up, 40))
    await bus.publish(beat(up, 90))  # the latest one counts
    await bus.publish(beat(sick, 10))
    table = NodeTable()
    feed = NodeFeed(bus, table)
    try:
        await feed.start(warm_timeout=5)
        # No waiting: the table is warm when start returns.
        assert [c.node_id for c in table.candidates("m", time.monotonic(), RULES)] == [str(up)]
        assert table.nodes[str(up)].health_score == 90
        assert set(table.nodes) == {str(up), str(sick)}
    finally:
        await feed.stop()


async def test_start_on_an_empty_fleet_does_not_wait(bus: Bus) -> None:
    feed = NodeFeed(bus, NodeTable())
    started = time.monotonic()
    try:
        await feed.start(warm_timeout=5)
        assert time.monotonic() - started < 2
    finally:
        await feed.stop()


async def test_a_stored_heartbeat_keeps_its_age(bus: Bus) -> None:
    """A beat NATS stored long ago does not make a node look alive now."""
    n = uuid.uuid4()
    await bus.publish(node_accepted(node_registered(n, model="m")))
    await bus.publish(beat(n, 90))
    table = NodeTable()
    # As if this gateway started two minutes after that heartbeat was stored.
    feed = NodeFeed(bus, table, wall_clock=lambda: time.time() + 120)
    try:
        await feed.start(warm_timeout=5)
        node = table.nodes[str(n)]
        assert node.last_heartbeat is not None
        assert time.monotonic() - node.last_heartbeat >= 119
        assert table.candidates("m", time.monotonic(), RULES) == []
    finally:
        await feed.stop()


async def test_what_a_subject_does_not_name_is_dropped_and_counted(servers: Servers,
                                                                   bus: Bus) -> None:
    """Node A, with its own credential, heartbeats on its own subject saying it is B (dying);
    someone slips an `apikey.created` onto a node subject: B stays as it was, both counted."""
    a, b = uuid.uuid4(), uuid.uuid4()
    await bus.publish(node_accepted(node_registered(b, model="m")))
    registry = CollectorRegistry()
    gateway = await Bus.connect(servers.nats_url, name="gateway", registry=registry,
                                creds=servers.creds(Role.GATEWAY))
    node_a = await Bus.connect(servers.nats_url, name="node-a", creds=servers.node_creds(a))
    table = NodeTable()
    feed = NodeFeed(gateway, table)

    def refused(reason: str) -> float:
        return registry.get_sample_value("nats_messages_refused_total",
                                         {"consumer": CONSUMER, "reason": reason}) or 0.0

    try:
        await feed.start(warm_timeout=5)
        await bus.nc.publish(f"node.heartbeat.{b}", encode_event(beat(b, 90)))

        async def b_serving() -> bool:
            return bool(table.candidates("m", time.monotonic(), RULES))

        await eventually(b_serving, what="b routable")
        lie = NodeHeartbeat(node_id=b, sequence=99, health_score=0, vllm_healthy=False,
                            draining=True)
        await node_a.nc.publish(f"node.heartbeat.{a}", encode_event(lie))
        forged = ApiKeyCreated(key_id=uuid.uuid4(), tenant_id=uuid.uuid4(),
                               environment_id=uuid.uuid4(), key_hash="0" * 64,
                               last_four="abcd")
        await bus.publish_raw(f"node.accepted.{b}", encode_event(forged), str(forged.id))

        async def both_refused() -> bool:
            return refused("subject_mismatch") == 2

        await eventually(both_refused, what="both counted")
        node = table.nodes[str(b)]
        assert (node.health_score, node.vllm_healthy, node.draining) == (90, True, False)
        assert set(table.nodes) == {str(b)}
    finally:
        await feed.stop()
        await node_a.close()
        await gateway.close()
