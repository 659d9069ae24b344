"""Commands on the fleet: each appends a node event and updates the `nodes` row in one
transaction, after bringing the row up to date with everything already in the node's stream
(events agents published, recorded by the monitor, may not be projected yet). Each takes the
node's lock first (lock.py), as the monitor's intake does, so neither decides on a history the
other is about to change. The append also expects the stream's version: if anything lands in
between all the same (a writer that does not lock), the command re-reads and decides again, so
a decision is never made on a stale view of the node.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from schemas.events import (
    Event,
    EventMetadata,
    NodeLaunching,
    NodeReplaced,
    NodeStatus,
    NodeStatusChanged,
    NodeTerminated,
    NodeTerminateRequested,
)
from services.domain.fleet.lock import lock_node
from services.domain.fleet.projection import NodesProjection
from services.domain.node_states import FINAL, Signal, transition
from services.infra.db import Connection
from services.infra.eventlog import ConcurrencyError, EventLog

log = structlog.get_logger("fleet")

ATTEMPTS = 5

Decide = Callable[[NodeStatus | None], Event | None]
"""A decision: the node's current status → the event to append, or None."""


@dataclass(frozen=True)
class NodeView:
    id: uuid.UUID
    status: NodeStatus
    deployment_id: uuid.UUID | None
    cluster_name: str
    model_name: str
    region: str
    endpoint_url: str
    spot_instance: bool
    launch_deadline: datetime | None
    terminate_requested_at: datetime | None
    registered_at: datetime
    terminate_reason: str = ""
    status_since: datetime | None = None
    """When the node entered its current status (None: not known)."""


class UnknownNode(LookupError):
    pass


class Fleet:
    def __init__(self, eventlog: EventLog, *, actor: str) -> None:
        self.log = eventlog
        self.actor = actor
        self._projection = NodesProjection()

    async def _catch_up(self, conn: Connection, node_id: uuid.UUID) -> int:
        """Apply what the node's stream holds beyond its row; returns the stream's version."""
        row_version = await conn.fetchval("SELECT version FROM nodes WHERE id = $1 FOR UPDATE",
                                          node_id) or 0
        pending = await self.log.read_stream(f"node:{node_id}", after_version=int(row_version),
                                             conn=conn)
        if pending:
            await self._projection.apply(conn, pending)
            return pending[-1].stream_version
        return int(row_version)

    async def _append(self, node_id: uuid.UUID, decide: Decide) -> Event | None:
        """Run `decide` on the node's current status and append what it returns, retrying
        when the stream moved meanwhile."""
        for _ in range(ATTEMPTS):
            try:
                async with self.log.pool.acquire() as conn, conn.transaction():
                    await lock_node(conn, node_id)
                    version = await self._catch_up(conn, node_id)
                    status = await conn.fetchval("SELECT status FROM nodes WHERE id = $1",
                                                 node_id)
                    event = decide(NodeStatus(status) if status else None)
                    if event is None:
                        return None
                    event.metadata = EventMetadata(actor=self.actor)
                    result = await self.log.append(event.stream, [event], version, conn=conn)
                    await self._projection.apply(conn, result.events)
                    return event
            except ConcurrencyError:
                continue
        log.warning("node stream kept moving; decision dropped", node_id=str(node_id))
        return None

    async def signal(self, node_id: uuid.UUID, signal: Signal, *, reason: str = "",
                     health_score: int | None = None) -> NodeStatus | None:
        """Apply a signal; returns the new status when it changed."""

        def decide(status: NodeStatus | None) -> Event | None:
            after = transition(status, signal)
            if after is None or status is None:
                return None  # nothing to change, or a node we never heard of
            return NodeStatusChanged(node_id=node_id, from_status=status, to_status=after,
                                     reason=reason, health_score=health_score)

        event = await self._append(node_id, decide)
        return event.to_status if isinstance(event, NodeStatusChanged) else None

    async def launching(self, event: NodeLaunching) -> None:
        event.metadata = EventMetadata(actor=self.actor)
        async with self.log.pool.acquire() as conn, conn.transaction():
            # Expecting version 0 is a decision on the history too (there is none yet): under
            # the node's lock like the others, so the intake never reads half of it.
            await lock_node(conn, event.node_id)
            result = await self.log.append(event.stream, [event], 0, conn=conn)
            await self._projection.apply(conn, result.events)

    async def request_termination(self, node_id: uuid.UUID, reason: str) -> bool:
        def decide(status: NodeStatus | None) -> Event | None:
            if status is None:
                raise UnknownNode(f"node {node_id} not found")
            if status in (NodeStatus.TERMINATED, NodeStatus.FAILED):
                return None
            return NodeTerminateRequested(node_id=node_id, reason=reason)

        return await self._append(node_id, decide) is not None

    async def replaced(self, node_id: uuid.UUID, replacement: uuid.UUID, reason: str,
                       deployment_id: uuid.UUID | None) -> None:
        await self._append(node_id, lambda _: NodeReplaced(
            node_id=node_id, replacement_id=replacement, reason=reason,
            deployment_id=deployment_id))

    async def terminated(self, node_id: uuid.UUID, reason: str, cluster_name: str) -> None:
        def decide(status: NodeStatus | None) -> Event | None:
            if status is None or status in FINAL:
                return None  # a failed node stays failed: its end was not a termination
            return NodeTerminated(node_id=node_id, reason=reason, cluster_name=cluster_name)

        await self._append(node_id, decide)

    async def catch_up(self, node_id: uuid.UUID) -> None:
        """Bring the node's row up to date with its stream now, not when the projection
        runner gets there (it finds the work done: every write is guarded by the version)."""
        async with self.log.pool.acquire() as conn, conn.transaction():
            await self._catch_up(conn, node_id)

    async def status(self, node_id: uuid.UUID) -> NodeStatus | None:
        value = await self.log.pool.fetchval("SELECT status FROM nodes WHERE id = $1", node_id)
        return NodeStatus(value) if value else None

    async def nodes(self, *, deployment_id: uuid.UUID | None = None,
                    statuses: frozenset[NodeStatus] | None = None) -> list[NodeView]:
        rows = await self.log.pool.fetch(
            """SELECT id, status, deployment_id, cluster_name, model_name, region,
                      endpoint_url, spot_instance, launch_deadline, terminate_requested_at,
                      terminate_reason, registered_at, status_since
               FROM nodes
               WHERE ($1::uuid IS NULL OR deployment_id = $1)
                 AND ($2::text[] IS NULL OR status = ANY($2))
               ORDER BY registered_at, id""",
            deployment_id, sorted(s.value for s in statuses) if statuses else None)
        return [NodeView(id=r["id"], status=NodeStatus(r["status"]),
                         deployment_id=r["deployment_id"], cluster_name=r["cluster_name"],
                         model_name=r["model_name"], region=r["region"],
                         endpoint_url=r["endpoint_url"], spot_instance=r["spot_instance"],
                         launch_deadline=r["launch_deadline"],
                         terminate_requested_at=r["terminate_requested_at"],
                         terminate_reason=r["terminate_reason"],
                         registered_at=r["registered_at"],
                         status_since=r["status_since"]) for r in rows]

