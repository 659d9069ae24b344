"""The `nodes` projection keeps final states final: an agent's late registration, spot notice,
drain or goodbye (recorded from NATS, never through the state machine) does not bring an
ended node back, nor a draining one into service. What the launch said of a node, a
registration does not change. Live and rebuilt alike."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest

from schemas.events import (
    Event,
    NodeDeregistered,
    NodeDraining,
    NodeLaunching,
    NodeRegistered,
    NodeSpotWarning,
    NodeStatus,
    NodeStatusChanged,
    NodeTerminated,
)
from services.domain.fleet import NodesProjection
from services.infra.eventlog import EventLog
from services.infra.projections import ProjectionRunner
from tests.helpers import node_registered

Late = Callable[[uuid.UUID], Event]

LATE: dict[str, Late] = {
    "registered": lambda n: node_registered(n),
    "spot-warning": lambda n: NodeSpotWarning(node_id=n, provider="aws", action="terminate"),
    "draining": lambda n: NodeDraining(node_id=n, reason="SIGTERM"),
    "deregistered": lambda n: NodeDeregistered(node_id=n, reason="bye"),
}

ENDS: dict[str, Callable[[uuid.UUID], list[Event]]] = {
    "terminated": lambda n: [NodeTerminated(node_id=n, reason="scale down")],
    "failed": lambda n: [NodeStatusChanged(node_id=n, from_status=NodeStatus.ACTIVE,
                                           to_status=NodeStatus.FAILED,
                                           reason="the cloud no longer has its machine")],
}


async def run(pool: asyncpg.Pool, *events: Event) -> asyncpg.Record:
    log = EventLog(pool)
    node = events[0].node_id  # type: ignore[attr-defined]
    for e in events:
        await log.record([e], origin="bus")
    runner = ProjectionRunner(log, NodesProjection())
    await runner.catch_up()
    live = await pool.fetchrow("SELECT * FROM nodes WHERE id = $1", node)
    await runner.rebuild()
    await runner.catch_up()
    rebuilt = await pool.fetchrow("SELECT * FROM nodes WHERE id = $1", node)
    assert live is not None and rebuilt is not None
    assert dict(live) == dict(rebuilt)
    return live


def active(n: uuid.UUID) -> list[Event]:
    return [node_registered(n), NodeStatusChanged(node_id=n, from_status=NodeStatus.REGISTERED,
                                                  to_status=NodeStatus.ACTIVE)]


@pytest.mark.parametrize("late", LATE, ids=list(LATE))
@pytest.mark.parametrize("end", ENDS, ids=list(ENDS))
async def test_an_ended_node_stays_ended(pool: asyncpg.Pool, end: str, late: str) -> None:
    n = uuid.uuid4()
    ended = await run(pool, *active(n), *ENDS[end](n))
    assert ended["status"] == end
    row = await run(pool, LATE[late](n))
    assert row["status"] == end
    assert row["status_reason"] == ended["status_reason"]
    assert row["endpoint_url"] == ended["endpoint_url"]
    assert row["spot_deadline"] == ended["spot_deadline"]
    # The row has seen the event all the same: nothing is read again on the next command.
    assert row["version"] == ended["version"] + 1


async def test_a_draining_node_that_registers_again_stays_draining(pool: asyncpg.Pool) -> None:
    n = uuid.uuid4()
    await run(pool, *active(n), NodeSpotWarning(node_id=n, provider="aws", action="terminate"))
    again: NodeRegistered = node_registered(n)
    row = await run(pool, again)
    assert row["status"] == "draining" and row["status_reason"] == "spot terminate"


async def test_a_stale_node_that_registers_again_is_registered(pool: asyncpg.Pool) -> None:
    n = uuid.uuid4()
    await run(pool, *active(n), NodeStatusChanged(node_id=n, from_status=NodeStatus.ACTIVE,
                                                  to_status=NodeStatus.STALE))
    row = await run(pool, node_registered(n))
    assert row["status"] == "registered"


async def test_a_draining_node_ends(pool: asyncpg.Pool) -> None:
    n = uuid.uuid4()
    await run(pool, *active(n), NodeDraining(node_id=n, reason="SIGTERM"))
    row = await run(pool, NodeDeregistered(node_id=n, reason="drained"))
    assert row["status"] == "terminated"


async def test_status_since_moves_with_the_status_only(pool: asyncpg.Pool) -> None:
    n = uuid.uuid4()
    first = node_registered(n)
    row = await run(pool, first)
    assert row["status_since"] == first.occurred_at
    again = node_registered(n)  # the agent restarted before it served: still the first
    row = await run(pool, again)
    assert row["status_since"] == first.occurred_at
    up = NodeStatusChanged(node_id=n, from_status=NodeStatus.REGISTERED,
                           to_status=NodeStatus.ACTIVE)
    row = await run(pool, up)
    assert row["status_since"] == up.occurred_at
    row = await run(pool, NodeStatusChanged(node_id=n, from_status=NodeStatus.ACTIVE,
                                            to_status=NodeStatus.ACTIVE, reason="no change"))
    assert row["status_since"] == up.occurred_at
    drain = NodeDraining(node_id=n, reason="SIGTERM")
    row = await run(pool, drain)
    assert row["status_since"] == drain.occurred_at
    row = await run(pool, NodeDraining(node_id=n, reason="again"))
    assert row["status_since"] == drain.occurred_at


async def test_a_registration_does_not_rename_what_the_launch_said(pool: asyncpg.Pool) -> None:
    """The orchestrator tears down the cluster the row names: a node's credential (leaked)
    registering under another node's cluster name must not point the teardown there. The
    agent adds only what it alone knows."""
    n = uuid.uuid4()
    launch = NodeLaunching(node_id=n, deployment_id=None, cluster_name="crosslogic-mine",
                           model_name="llama-8b", provider="aws", region="us-east-1",
                           gpu_type="A10G", spot=True,
                           deadline=datetime.now(UTC) + timedelta(minutes=10))
    lie = msgspec.structs.replace(node_registered(n), cluster_name="crosslogic-victim",
                                  provider="gcp", region="eu-west-1", gpu_type="H100",
                                  spot_instance=False, instance_type="g5.4xlarge",
                                  vram_total_gb=48, endpoint_url="http://10.0.0.7:8000",
                                  agent_version="1.2.3")
    row = await run(pool, launch, lie)
    assert (row["cluster_name"], row["provider"], row["region"], row["gpu_type"],
            row["spot_instance"], row["model_name"]) == \
        ("crosslogic-mine", "aws", "us-east-1", "A10G", True, "llama-8b")
    assert (row["instance_type"], row["vram_total_gb"], row["endpoint_url"],
            row["agent_version"], row["status"]) == \
        ("g5.4xlarge", 48, "http://10.0.0.7:8000", "1.2.3", "registered")
