"""Projections: tables built from the log, exactly once, rebuildable from position zero.

A runner applies a batch of events and moves the projection's checkpoint in one transaction,
so a crash can neither skip nor repeat an event. The checkpoint row is locked with
``FOR UPDATE SKIP LOCKED``: several replicas can run the same projection; one applies a batch
while the others find it taken and wait for the next wake-up.

A running projection never stops for good: a failing batch (a bug in `apply`, an event type
this build cannot decode during a rolling deploy, the database gone) is retried with backoff
and shows in `projection_failing` / `projection_errors_total`, and `projection_lag_events`
keeps counting what it has not applied, so an alert fires instead of a silent stall.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import asyncpg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.infra.aio import stop_task
from services.infra.backoff import Backoff
from services.infra.db import Connection
from services.infra.eventlog import EventLog
from services.infra.log_records import START, EventFilter, LogPosition, RecordedEvent
from services.infra.log_waker import LogWaker

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


class ProjectionMetrics:
    """The projection metrics of one service: made once per registry, shared by every runner
    the service starts (labels keep them apart)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.lag = Gauge("projection_lag_events",
                         "Events in the log after the projection's checkpoint",
                         ["projection"], registry=registry)
        self.applied = Counter("projection_events_applied_total",
                               "Events applied to the projection by this process",
                               ["projection"], registry=registry)
        self.errors = Counter("projection_errors_total",
                              "Projection batches that failed (kind: database or apply)",
                              ["projection", "kind"], registry=registry)
        self.failing = Gauge("projection_failing",
                             "1 while the projection's batches keep failing (it retries)",
                             ["projection"], registry=registry)


# The database or the network is away: retried quietly. Anything else is a bug or an event
# this build cannot read, and is logged with its traceback (and retried all the same).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError, asyncpg.InsufficientResourcesError,
)


@dataclass(frozen=True)
class StepResult:
    applied: int
    scanned: int
    caught_up: bool
    locked_elsewhere: bool = False


class ProjectionRunner:
    def __init__(self, log_: EventLog, projection: Projection, *, batch_size: int = 1000,
                 waker: LogWaker | None = None, metrics: ProjectionMetrics | None = None,
                 lag_interval: float = 5.0, max_retry_delay: float = 30.0) -> None:
        self.log = log_
        self.pool = log_.pool
        self.projection = projection
        self.batch_size = batch_size
        self.waker = waker
        self.metrics = metrics
        self.lag_interval = lag_interval
        self.max_retry_delay = max_retry_delay
        self.filter = EventFilter(types=projection.event_types)
        self.failure: str | None = None
        """Why the last batch failed, while `run()` keeps retrying it; None when healthy."""

    async def _locked_checkpoint(self, conn: Connection, *,
                                 wait: bool) -> LogPosition | None:
        await conn.execute("INSERT INTO checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING",
                           self.projection.name)
        row = await conn.fetchrow(
            "SELECT transaction_id, position FROM checkpoints WHERE name = $1 FOR UPDATE"
            + ("" if wait else " SKIP LOCKED"), self.projection.name)
        return None if row is None else LogPosition(row["transaction_id"], row["position"])

    async def step(self, *, wait: bool = False) -> StepResult:
        """Apply one batch. `locked_elsewhere` when another replica holds the projection;
        with `wait`, wait for that replica's batch to commit and go on from its checkpoint."""
        async with self.pool.acquire() as conn, conn.transaction():
            after = await self._locked_checkpoint(conn, wait=wait)
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
        if self.metrics is not None and page.events:
            self.metrics.applied.labels(self.projection.name).inc(len(page.events))
        return StepResult(len(page.events), page.scanned, page.caught_up)

    async def catch_up(self) -> int:
        """Apply batches until the log's readable end; returns events applied. A replica
        applying the same projection meanwhile is waited for, not taken for the end: when
        this returns, the projection holds everything readable when it was called."""
        applied = 0
        while True:
            result = await self.step(wait=True)
            applied += result.applied
            if result.caught_up:
                return applied

    async def run(self) -> None:
        """Catch up, then follow the log until cancelled. A failed batch is rolled back with
        its checkpoint and retried with backoff, whatever the error: the task never ends
        on its own, and the failure shows in the metrics and in `failure`."""
        name = self.projection.name
        bound = log.bind(projection=name)
        backoff = Backoff(initial=min(0.5, self.max_retry_delay), maximum=self.max_retry_delay)
        lag: asyncio.Task[None] | None = None
        if self.metrics is not None:
            self.metrics.failing.labels(name).set(0)
            lag = asyncio.create_task(self._track_lag(), name=f"projection-lag-{name}")
        try:
            while True:
                generation = self.waker.generation if self.waker else 0
                try:
                    result = await self.step()
                except Exception as exc:
                    delay = backoff.next()
                    self._failed(exc, bound, delay)
                    await asyncio.sleep(delay)
                    continue
                if self.failure is not None:
                    bound.info("projection recovered")
                    self.failure = None
                    if self.metrics is not None:
                        self.metrics.failing.labels(name).set(0)
                backoff.reset()
                if result.caught_up:
                    if self.waker is not None:
                        await self.waker.wait(generation)
                    else:
                        await asyncio.sleep(1.0)
        finally:
            if lag is not None:
                await stop_task(lag)

    def _failed(self, exc: Exception, bound: structlog.typing.FilteringBoundLogger,
                delay: float) -> None:
        kind = "database" if isinstance(exc, _UNAVAILABLE) else "apply"
        first = self.failure is None
        self.failure = f"{type(exc).__name__}: {exc}"
        if self.metrics is not None:
            self.metrics.errors.labels(self.projection.name, kind).inc()
            self.metrics.failing.labels(self.projection.name).set(1)
        if kind == "database":
            bound.warning("projection step failed; retrying", error=self.failure,
                          retry_in=round(delay, 2))
        elif first:
            bound.error("projection batch failed; retrying", retry_in=round(delay, 2),
                        exc_info=exc)
        else:
            # The traceback was logged when the streak began; keep saying it still fails.
            bound.error("projection batch still failing; retrying", error=self.failure,
                        retry_in=round(delay, 2))

    async def lag(self) -> int:
        """Events in the log after this projection's checkpoint."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT transaction_id, position FROM checkpoints WHERE name = $1",
                self.projection.name)
            after = START if row is None else LogPosition(row["transaction_id"],
                                                          row["position"])
            return await self.log.count_after(after, conn=conn)

    async def _track_lag(self) -> None:
        # Apart from the applying loop: a runner stuck on a bad batch still reports its lag
        # growing (the point of the gauge).
        assert self.metrics is not None
        gauge = self.metrics.lag.labels(self.projection.name)
        while True:
            try:
                gauge.set(await self.lag())
            except Exception as exc:
                log.debug("projection lag unknown", projection=self.projection.name,
                          error=str(exc) or type(exc).__name__)
            await asyncio.sleep(self.lag_interval)

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
