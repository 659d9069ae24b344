"""What every catalog command shares: appending its events and applying them to the
projections in the caller's transaction, and the row reads and locks several commands make."""

from __future__ import annotations

import fnmatch
import uuid

import asyncpg

from schemas.events import Event, EventMetadata
from services.domain.catalog.errors import Conflict, NotFound
from services.domain.catalog.projections import catalog_projections
from services.infra.db import Connection
from services.infra.eventlog import ConcurrencyError, EventLog


class CatalogCommandBase:
    """Who is acting (`actor`, `correlation_id`) and how a command writes; the commands
    themselves are in the subclasses that `Catalog` combines."""

    def __init__(self, eventlog: EventLog, *, actor: str = "system",
                 correlation_id: str | None = None) -> None:
        self.log = eventlog
        self.actor = actor
        self.correlation_id = correlation_id
        self._projections = catalog_projections()

    async def _write(self, conn: Connection, stream: str, events: list[Event],
                     expected_version: int) -> None:
        meta = EventMetadata(actor=self.actor, correlation_id=self.correlation_id)
        for e in events:
            e.metadata = meta
        try:
            result = await self.log.append(stream, events, expected_version, conn=conn)
        except ConcurrencyError as exc:
            raise Conflict(f"{stream} changed concurrently; retry") from exc
        for projection in self._projections:
            mine = [r for r in result.events
                    if any(fnmatch.fnmatchcase(r.type, t) for t in projection.event_types)]
            if mine:
                try:
                    await projection.apply(conn, mine)
                except asyncpg.UniqueViolationError as exc:  # e.g. two models of one name
                    raise Conflict(exc.detail or str(exc)) from exc

    async def _version(self, conn: Connection, table: str, id_: uuid.UUID) -> int:
        version = await conn.fetchval(f"SELECT version FROM {table} WHERE id = $1", id_)
        if version is None:
            raise NotFound(f"{table[:-1]} {id_} not found")
        return int(version)

    async def _lock_tenant(self, conn: Connection, tenant_id: uuid.UUID) -> None:
        """Serializes the commands that check a name within a tenant: two creating
        `production` at once take turns, and the second sees the first's row."""
        if await conn.fetchval("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE",
                               tenant_id) is None:
            raise NotFound(f"tenant {tenant_id} not found")
