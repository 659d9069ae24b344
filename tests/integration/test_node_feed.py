"""The gateway's node feed: a gateway (or worker) that starts while the fleet is quiet routes
on its first request, from what NATS has stored."""

from __future__ import annotations

import time
import uuid

from schemas.events import NodeHeartbeat, NodeStatus, NodeStatusChanged
from services.core.bus import Bus
from services.gateway.node_feed import NodeFeed
from services.gateway.nodes import NodeTable, RoutingRules
from tests.helpers import node_registered

RULES = RoutingRules(health_threshold=50, heartbeat_timeout=60)


def beat(node_id: uuid.UUID, score: int) -> NodeHeartbeat:
    return NodeHeartbeat(node_id=node_id, sequence=1, health_score=score, vllm_healthy=True)


async def test_start_returns_with_the_stored_fleet_routable(bus: Bus) -> None:
    up, gone, sick = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for n in (up, gone, sick):
        await bus.publish(node_registered(n, model="m"))
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
    await bus.publish(node_registered(n, model="m"))
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
