"""The PostgreSQL event log: append with optimistic concurrency, read a stream, read everything.

Global order is (transaction id, position), not position alone: positions are handed out when
rows are inserted, but transactions commit in another order, so a reader that went by position
could pass a gap that a slow transaction fills later. `read_all` returns only events whose
transaction id is below the oldest transaction still running
(``pg_snapshot_xmin(pg_current_snapshot())``): everything below it has committed or never
will, so no event can appear behind a reader's checkpoint. The cost: a long-running transaction
anywhere in the database holds readers back until it ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
import msgspec
import structlog

from schemas.events import Event, payload_of
from services.infra.db import Connection
from services.infra.log_records import (
    START,
    EventFilter,
    LogPosition,
    Origin,
    RecordedEvent,
    filter_sql,
)

log = structlog.get_logger("eventlog")

ANY: Final = -1
"""Append whatever the stream's version is."""
NO_STREAM: Final = 0
"""Append only if the stream has no events yet."""


class ConcurrencyError(Exception):
    """The stream moved on since the caller read it: re-read, decide again, retry."""

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream!r} is at version {actual}, expected {expected}")
        self.stream = stream
        self.expected = expected
        self.actual = actual


class DuplicateEventError(Exception):
    """An append carried an event id the log holds already: the same event appended twice
    (say, a retried command that had committed). Nothing was written. `record()` is the
    idempotent way in for events that may arrive again."""

    def __init__(self, event_ids: Sequence[Any], detail: str | None = None) -> None:
        super().__init__("an event of this append is in the log already"
                         + (f" ({detail})" if detail else ""))
        self.event_ids = list(event_ids)
        """The ids of the append (one or more of them is taken)."""


@dataclass(frozen=True)
class Page:
    events: list[RecordedEvent]
    next: LogPosition
    """Resume after this: the last event scanned, matched or not."""
    scanned: int
    limit: int

    @property
    def caught_up(self) -> bool:
        return self.scanned < self.limit


@dataclass(frozen=True)
class AppendResult:
    stream: str
    version: int
    """The stream's version after the append."""
    events: list[RecordedEvent] = field(default_factory=list)


# jsonb comes back as text: RecordedEvent parses it only when asked (see `wire`).
_COLUMNS = ("position, transaction_id, event_id, stream, stream_version, type, "
            "data::text AS data, metadata::text AS metadata, occurred_at, recorded_at, origin")

_INSERT = f"""
INSERT INTO events (event_id, stream, stream_version, type, data, metadata, occurred_at, origin)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::jsonb[], $6::jsonb[],
                     $7::timestamptz[], $8::text[])
RETURNING {_COLUMNS}
"""

_json = msgspec.json.Encoder()


def _row_to_recorded(row: asyncpg.Record, event: Event | None = None) -> RecordedEvent:
    return RecordedEvent(position=row["position"], transaction_id=row["transaction_id"],
                         event_id=row["event_id"], stream=row["stream"],
                         stream_version=row["stream_version"], type=row["type"],
                         raw_data=row["data"], raw_metadata=row["metadata"],
                         occurred_at=row["occurred_at"], recorded_at=row["recorded_at"],
                         origin=row["origin"], event=event)


def _insert_args(events: Sequence[Event], versions: Sequence[int],
                 origin: Origin) -> list[Any]:
    return [
        [e.id for e in events],
        [e.stream for e in events],
        list(versions),
        [e.type for e in events],
        [_json.encode(payload_of(e)).decode() for e in events],
        [_json.encode(e.metadata).decode() for e in events],
        [e.occurred_at for e in events],
        [origin] * len(events),
    ]


class EventLog:
    """Append to and read from the log. Pass `conn` to take part in the caller's transaction
    (a command appends its event and updates its projection atomically)."""

    def __init__(self, source: asyncpg.Pool[asyncpg.Record] | Connection) -> None:
        self.source = source

    @property
    def pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if not isinstance(self.source, asyncpg.Pool):
            raise TypeError("this EventLog works on a single connection, not a pool")
        return self.source

    @contextlib.asynccontextmanager
    async def _conn(self, conn: Connection | None) -> AsyncIterator[Connection]:
        if conn is not None:
            yield conn
        elif isinstance(self.source, asyncpg.Pool):
            async with self.source.acquire() as acquired:
                yield acquired
        else:
            yield self.source

    async def append(self, stream: str, events: Sequence[Event], expected_version: int = ANY,
                     *, conn: Connection | None = None) -> AppendResult:
        """Append `events` to `stream` if it is at `expected_version` (ANY, NO_STREAM or a
        version); ConcurrencyError otherwise. All or nothing."""
        if not events:
            raise ValueError("append needs at least one event")
        for e in events:
            if e.stream != stream:
                raise ValueError(f"event {e.id} belongs to stream {e.stream!r}, not {stream!r}")
        n = len(events)
        async with self._conn(conn) as c, c.transaction():
            if expected_version == ANY:
                version = await c.fetchval(
                    """INSERT INTO streams (stream, version) VALUES ($1, $2)
                       ON CONFLICT (stream) DO UPDATE SET version = streams.version + $2
                       RETURNING version""", stream, n)
            elif expected_version == NO_STREAM:
                version = await c.fetchval(
                    """INSERT INTO streams (stream, version) VALUES ($1, $2)
                       ON CONFLICT (stream) DO NOTHING RETURNING version""", stream, n)
            elif expected_version > 0:
                version = await c.fetchval(
                    """UPDATE streams SET version = version + $3
                       WHERE stream = $1 AND version = $2 RETURNING version""",
                    stream, expected_version, n)
            else:
                raise ValueError(f"bad expected_version {expected_version}")
            if version is None:
                actual = await c.fetchval("SELECT version FROM streams WHERE stream = $1", stream)
                raise ConcurrencyError(stream, expected_version, actual or 0)
            try:
                rows = await c.fetch(_INSERT, *_insert_args(events, range(version - n + 1,
                                                                            version + 1), "log"))
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != "events_event_id_key":
                    raise
                raise DuplicateEventError([e.id for e in events], exc.detail) from exc
        return AppendResult(stream, version,
                            [_row_to_recorded(r, e) for r, e in zip(rows, events, strict=True)])

    async def record(self, events: Sequence[Event], *, origin: Origin = "bus",
                     conn: Connection | None = None) -> list[RecordedEvent]:
        """Append events that happened outside the database (arrived over NATS), at whatever
        version each stream is at, skipping any whose id is already in the log. Idempotent:
        redeliveries and replicas racing on the same message record it once. Returns the events
        this call recorded."""
        while True:
            try:
                return await self._record_once(events, origin, conn)
            except asyncpg.UniqueViolationError as exc:
                # Another recorder committed one of these ids between our check and our insert;
                # the retry's check sees it and skips it.
                if exc.constraint_name != "events_event_id_key":
                    raise
                log.debug("concurrent record of the same event; retrying")

    async def _record_once(self, events: Sequence[Event], origin: Origin,
                           conn: Connection | None) -> list[RecordedEvent]:
        unique: dict[Any, Event] = {}
        for e in events:
            unique.setdefault(e.id, e)
        if not unique:
            return []
        async with self._conn(conn) as c, c.transaction():
            existing = await c.fetch("SELECT event_id FROM events WHERE event_id = ANY($1::uuid[])",
                                     list(unique))
            for row in existing:
                unique.pop(row["event_id"], None)
            if not unique:
                return []
            fresh = list(unique.values())
            counts: dict[str, int] = {}
            for e in fresh:
                counts[e.stream] = counts.get(e.stream, 0) + 1
            streams = sorted(counts)
            # Sorted, so concurrent recorders lock stream rows in the same order: no deadlock.
            rows = await c.fetch(
                """INSERT INTO streams (stream, version)
                   SELECT s, n FROM unnest($1::text[], $2::bigint[]) AS t(s, n) ORDER BY s
                   ON CONFLICT (stream) DO UPDATE SET version = streams.version + EXCLUDED.version
                   RETURNING stream, version""",
                streams, [counts[s] for s in streams])
            next_version = {r["stream"]: r["version"] - counts[r["stream"]] + 1 for r in rows}
            versions = []
            for e in fresh:
                versions.append(next_version[e.stream])
                next_version[e.stream] += 1
            inserted = await c.fetch(_INSERT, *_insert_args(fresh, versions, origin))
        return [_row_to_recorded(r, e) for r, e in zip(inserted, fresh, strict=True)]

    async def stream_version(self, stream: str, *, conn: Connection | None = None) -> int:
        async with self._conn(conn) as c:
            version = await c.fetchval("SELECT version FROM streams WHERE stream = $1", stream)
        return int(version or 0)

    async def read_stream(self, stream: str, *, after_version: int = 0, limit: int | None = None,
                          conn: Connection | None = None) -> list[RecordedEvent]:
        async with self._conn(conn) as c:
            rows = await c.fetch(
                f"""SELECT {_COLUMNS} FROM events WHERE stream = $1 AND stream_version > $2
                    ORDER BY stream_version LIMIT $3""",
                stream, after_version, limit)
        return [_row_to_recorded(r) for r in rows]

    async def read_all(self, after: LogPosition = START, limit: int = 1000,
                       flt: EventFilter | None = None, *,
                       conn: Connection | None = None) -> Page:
        """Up to `limit` events after `after`, in log order, only from transactions that can no
        longer be joined by an earlier one. With a filter, non-matching events are scanned and
        skipped; `Page.next` moves past them either way."""
        flt = flt or EventFilter()
        where, params = filter_sql(flt, 4)
        sql = f"""
            SELECT position, transaction_id, event_id, stream, stream_version, type,
                   CASE WHEN m THEN data::text END AS data, metadata::text AS metadata,
                   occurred_at, recorded_at, origin, m
            FROM (
                SELECT *, ({where}) AS m FROM events
                WHERE (transaction_id, position) > ($1::xid8, $2::bigint)
                  AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
                ORDER BY transaction_id, position
                LIMIT $3
            ) page"""
        async with self._conn(conn) as c:
            rows = await c.fetch(sql, after.transaction_id, after.position, limit, *params)
        if not rows:
            return Page([], after, 0, limit)
        last = rows[-1]
        return Page([_row_to_recorded(r) for r in rows if r["m"]],
                    LogPosition(last["transaction_id"], last["position"]), len(rows), limit)

    async def count_after(self, after: LogPosition, *, origin: Origin | None = None,
                          conn: Connection | None = None) -> int:
        """Committed events after `after` in log order (readable yet or not): a reader's lag.
        An index range scan: cheap while the reader keeps up."""
        async with self._conn(conn) as c:
            count = await c.fetchval(
                """SELECT count(*) FROM events
                   WHERE (transaction_id, position) > ($1::xid8, $2::bigint)
                     AND ($3::text IS NULL OR origin = $3)""",
                after.transaction_id, after.position, origin)
        return int(count)

    async def head(self, *, conn: Connection | None = None) -> LogPosition:
        """The last readable position: where a reader that only wants new events starts."""
        async with self._conn(conn) as c:
            row = await c.fetchrow(
                """SELECT transaction_id, position FROM events
                   WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
                   ORDER BY transaction_id DESC, position DESC LIMIT 1""")
        return START if row is None else LogPosition(row["transaction_id"], row["position"])

