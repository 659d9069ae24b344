"""The monitor's intake and the fleet's commands (the orchestrator's and the monitor's status
changes) decide on a node's history under one lock (services/domain/fleet/lock.py), against real
PostgreSQL: whichever takes it first commits before the other reads, so a node's end and its
acceptance never cross (`node.accepted` after `failed` would put a dead node back in the
gateways' rotation).

Each test holds one side in the middle of its transaction and waits, on PostgreSQL's own
view of who blocks whom, until the other side is either done or waiting; without the shared
lock it is done, and the order in the log is wrong.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import asyncpg
import msgspec
from prometheus_client import CollectorRegistry

from schemas.events import Event, NodeRegistered, NodeStatus
from schemas.ids import uuid7
from services.domain.fleet import Fleet
from services.domain.node_states import Signal
from services.infra.db import Connection
from services.infra.eventlog import EventLog
from services.infra.recorder import Refusal, Verdict
from services.monitor.intake import NodeIntake
from tests.helpers import eventually, launched, node_registered


class Told:
    """The agents' refusals, as the monitor would publish them."""

    def __init__(self) -> None:
        self.refused: list[tuple[NodeRegistered, str]] = []

    async def __call__(self, event: NodeRegistered, reason: str) -> None:
        self.refused.append((event, reason))


def registration(node: uuid.UUID) -> NodeRegistered:
    return msgspec.structs.replace(node_registered(node), endpoint_url="http://10.0.0.7:8000")


async def record(conn: Connection, events: Sequence[Event], verdicts: Sequence[Verdict]
                 ) -> None:
    """What the recorder writes of a batch's verdicts (services/infra/recorder.py)."""
    log = EventLog(conn)
    for incoming, verdict in zip(events, verdicts, strict=True):
        if isinstance(verdict, Refusal):
            continue
        await log.record([e for e in verdict if e.id == incoming.id], origin="bus", conn=conn)
        await log.record([e for e in verdict if e.id != incoming.id], origin="log", conn=conn)


async def decide_and_record(conn: Connection, intake: NodeIntake,
                            events: Sequence[Event]) -> Sequence[Verdict]:
    """One recorder batch: decided and recorded in one transaction."""
    async with conn.transaction():
        verdicts = await intake(events, conn)
        await record(conn, events, verdicts)
    return verdicts


async def waits_on(pool: asyncpg.Pool, pid: int) -> bool:
    """Whether some session is waiting for a lock `pid` holds."""
    return bool(await pool.fetchval(
        "SELECT count(*) > 0 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid))


async def waiting(pool: asyncpg.Pool, pid: int) -> bool:
    """Whether session `pid` is waiting for a lock."""
    return bool(await pool.fetchval("SELECT cardinality(pg_blocking_pids($1)) > 0", pid))


async def types(pool: asyncpg.Pool, node: uuid.UUID) -> list[str]:
    return [r["type"] for r in await pool.fetch(
        "SELECT type FROM events WHERE stream = $1 ORDER BY stream_version", f"node:{node}")]


async def test_an_end_committed_while_a_registration_is_decided_refuses_it(
        pool: asyncpg.Pool) -> None:
    """The reconciler fails a late launch just as its registration arrives: the orchestrator
    has the node's lock, so the monitor waits, then reads the end and refuses the node."""
    node = uuid7()
    await launched(pool, node, model="llama-8b")
    fleet = Fleet(EventLog(pool), actor="orchestrator")
    told = Told()
    registry = CollectorRegistry()
    intake = NodeIntake(told, registry=registry)
    reg = registration(node)
    # Hold the orchestrator in the middle of its transaction: it takes the node's lock, then
    # the node's row, which this transaction holds.
    holder = await pool.acquire()
    held = holder.transaction()
    await held.start()
    conn = await pool.acquire()
    try:
        await holder.execute("SELECT 1 FROM nodes WHERE id = $1 FOR UPDATE", node)
        failing = asyncio.create_task(fleet.signal(node, Signal.CLOUD_LOST,
                                                   reason="no registration by the deadline"))

        async def orchestrator_waits() -> bool:
            return await waits_on(pool, holder.get_server_pid())

        await eventually(orchestrator_waits, what="the orchestrator inside its transaction")
        deciding = asyncio.create_task(decide_and_record(conn, intake, [reg]))

        async def monitor_done_or_waiting() -> bool:
            return deciding.done() or await waiting(pool, conn.get_server_pid())

        await eventually(monitor_done_or_waiting, what="the monitor deciding")
        await held.rollback()
        assert await failing is NodeStatus.FAILED
        (verdict,) = await deciding
    finally:
        await pool.release(holder)
        await pool.release(conn)
    assert isinstance(verdict, Refusal) and "has ended" in verdict.reason
    assert [(e.id, why) for e, why in told.refused] == [(reg.id, verdict.reason)]
    assert registry.get_sample_value("monitor_registrations_refused_total",
                                     {"reason": "ended"}) == 1
    assert await types(pool, node) == ["node.launching", "node.status_changed"]


async def test_an_end_decided_while_a_registration_is_accepted_comes_after_it(
        pool: asyncpg.Pool) -> None:
    """The other way round: the monitor has the lock and accepts; the orchestrator's end waits
    for that commit and is appended after the acceptance, which the gateways then undo."""
    node = uuid7()
    await launched(pool, node, model="llama-8b")
    fleet = Fleet(EventLog(pool), actor="orchestrator")
    intake = NodeIntake(Told(), registry=CollectorRegistry())
    reg = registration(node)
    conn = await pool.acquire()
    try:
        tx = conn.transaction()
        await tx.start()
        verdicts = await intake([reg], conn)
        assert not isinstance(verdicts[0], Refusal)
        failing = asyncio.create_task(fleet.signal(node, Signal.CLOUD_LOST,
                                                   reason="the cloud no longer has it"))

        async def orchestrator_done_or_waiting() -> bool:
            return failing.done() or await waits_on(pool, conn.get_server_pid())

        await eventually(orchestrator_done_or_waiting, what="the orchestrator deciding")
        await record(conn, [reg], verdicts)
        await tx.commit()
        assert await failing is NodeStatus.FAILED
    finally:
        await pool.release(conn)
    assert await types(pool, node) == ["node.launching", "node.registered", "node.accepted",
                                       "node.status_changed"]
    assert await pool.fetchval("SELECT status FROM nodes WHERE id = $1", node) == "failed"
