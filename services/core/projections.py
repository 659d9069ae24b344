"""Projections: tables built from the log, exactly once, rebuildable from position zero.

A runner applies a batch of events and moves the projection's checkpoint in one transaction,
so a crash can neither skip nor repeat an event. The checkpoint row is locked with
``FOR UPDATE SKIP LOCKED``: several replicas can run the same projection; one applies a batch
while the others find it taken and wait for the next wake-up.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import asyncpg
import structlog

from services.core.db import Connection
from services.core.eventlog import (
    START,
    EventFilter,
    EventLog,
    LogPosition,
    LogWaker,
    RecordedEvent,
)

log = structlog.get_logger("projections")


class Projection(ABC):
    """A named read model. `tables` are emptied by a rebuild; `event_types` (globs) limit what
    `apply` sees (every event when empty)."""

    name: str
    tables: tuple[str, ...] = ()
    event_types: tuple[str, ...] = ()

    @abstractmethod
    async def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        """Apply events in order, inside the runner's transaction. Batch the SQL: this is
        the catch-up hot path."""

    async def reset(self, conn: Connection) -> None:
        """Forget everything before a rebuild. Default: truncate `tables`."""
        if self.tables:
            await conn.execute(f"TRUNCATE {', '.join(self.tables)}")


class UnknownProjection(KeyError):
    pass


class ProjectionRegistry:
    def __init__(self, projections: Iterable[Projection] = ()) -> None:
        self._by_name: dict[str, Projection] = {}
        for p in projections:
            self.add(p)

    def add(self, projection: Projection) -> None:
        if projection.name in self._by_name:
            raise ValueError(f"two projections named {projection.name!r}")
        self._by_name[projection.name] = projection

    def get(self, name: str) -> Projection:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownProjection(
                f"no projection {name!r}; known: {', '.join(sorted(self._by_name)) or 'none'}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __iter__(self) -> Iterator[Projection]:
        return iter(self._by_name.values())


@dataclass(frozen=True)
class StepResult:
    applied: int
    scanned: int
    caught_up: bool
    locked_elsewhere: bool = False


class ProjectionRunner:
    def __init__(self, log_: EventLog, projection: Projection, *, batch_size: int = 1000,
                 waker: LogWaker | None = None) -> None:
        self.log = log_
        self.pool = log_.pool
        self.projection = projection
        self.batch_size = batch_size
        self.waker = waker
        self.filter = EventFilter(types=projection.event_types)

    async def _locked_checkpoint(self, conn: Connection, *,
                                 wait: bool) -> LogPosition | None:
        await conn.execute("INSERT INTO checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING",
                           self.projection.name)
        row = await conn.fetchrow(
            "SELECT transaction_id, position FROM checkpoints WHERE name = $1 FOR UPDATE"
            + ("" if wait else " SKIP LOCKED"), self.projection.name)
        return None if row is None else LogPosition(row["transaction_id"], row["position"])

    async def step(self) -> StepResult:
        """Apply one batch. `locked_elsewhere` when another replica holds the projection."""
        async with self.pool.acquire() as conn, conn.transaction():
            after = await self._locked_checkpoint(conn, wait=False)
            if after is None:
                return StepResult(0, 0, caught_up=True, locked_elsewhere=True)
            page = await self.log.read_all(after, self.batch_size, self.filter, conn=conn)
            if page.events:
                await self.projection.apply(conn, page.events)
            if page.next != after:
                await conn.execute(
                    """UPDATE checkpoints SET transaction_id = $2, position = $3,
                       updated_at = now() WHERE name = $1""",
                    self.projection.name, page.next.transaction_id, page.next.position)
        return StepResult(len(page.events), page.scanned, page.caught_up)

    async def catch_up(self) -> int:
        """Apply batches until the log's readable end; returns events applied."""
        applied = 0
        while True:
            result = await self.step()
            applied += result.applied
            if result.caught_up:
                return applied

    async def run(self) -> None:
        """Catch up, then follow the log until cancelled. Errors are logged and retried: the
        checkpoint makes a retry safe."""
        bound = log.bind(projection=self.projection.name)
        delay = 0.5
        while True:
            generation = self.waker.generation if self.waker else 0
            try:
                result = await self.step()
                delay = 0.5
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                bound.warning("projection step failed; retrying", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if result.caught_up:
                if self.waker is not None:
                    await self.waker.wait(generation)
                else:
                    await asyncio.sleep(1.0)

    async def checkpoint(self) -> LogPosition:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT transaction_id, position FROM checkpoints WHERE name = $1",
                self.projection.name)
        return START if row is None else LogPosition(row["transaction_id"], row["position"])

    async def rebuild(self) -> int:
        """Empty the projection and replay the whole log into it. Live runners elsewhere wait
        for the reset to commit, then carry on from zero with everyone else."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self._locked_checkpoint(conn, wait=True)
            await self.projection.reset(conn)
            await conn.execute(
                """UPDATE checkpoints SET transaction_id = '0', position = 0, updated_at = now()
                   WHERE name = $1""", self.projection.name)
        log.info("projection reset; replaying", projection=self.projection.name)
        return await self.catch_up()
