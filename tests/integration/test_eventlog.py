"""The event log against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from schemas.events import EventMetadata, TenantSuspended
from services.infra import log_waker as log_waker_module
from services.infra.eventlog import ANY, NO_STREAM, ConcurrencyError, DuplicateEventError, EventLog
from services.infra.log_records import START, EventFilter, LogPosition
from services.infra.log_waker import LogWaker
from tests.helpers import eventually, node_registered, tenant_created, tenant_renamed


@pytest.fixture
def log(pool: asyncpg.Pool) -> EventLog:
    return EventLog(pool)


async def read_everything(log: EventLog, after: LogPosition = START,
                          flt: EventFilter | None = None) -> list:
    out = []
    while True:
        page = await log.read_all(after, 100, flt)
        out.extend(page.events)
        after = page.next
        if page.caught_up:
            return out


async def test_append_and_read_stream_round_trip(log: EventLog) -> None:
    created = tenant_created("acme")
    created.metadata = EventMetadata(correlation_id="req-1", actor="admin")
    renamed = tenant_renamed(created.tenant_id, "acme inc")
    result = await log.append(created.stream, [created, renamed], NO_STREAM)
    assert result.version == 2
    assert [e.stream_version for e in result.events] == [1, 2]

    events = await log.read_stream(created.stream)
    assert [e.event for e in events] == [created, renamed]
    assert events[0].metadata == {"correlation_id": "req-1", "actor": "admin"}
    assert events[0].event_id == created.id
    assert await log.stream_version(created.stream) == 2
    later = await log.read_stream(created.stream, after_version=1)
    assert [e.event for e in later] == [renamed]


async def test_expected_version_conflicts(log: EventLog) -> None:
    created = tenant_created()
    stream = created.stream
    await log.append(stream, [created], NO_STREAM)

    with pytest.raises(ConcurrencyError) as info:
        await log.append(stream, [tenant_renamed(created.tenant_id, "x")], NO_STREAM)
    assert (info.value.expected, info.value.actual) == (NO_STREAM, 1)

    with pytest.raises(ConcurrencyError) as info:
        await log.append(stream, [tenant_renamed(created.tenant_id, "x")], 5)
    assert info.value.actual == 1

    await log.append(stream, [tenant_renamed(created.tenant_id, "y")], 1)
    await log.append(stream, [TenantSuspended(tenant_id=created.tenant_id)], ANY)
    assert await log.stream_version(stream) == 3
    # The failed appends left nothing behind.
    assert len(await log.read_stream(stream)) == 3


async def test_racing_writers_at_the_same_version_one_wins(log: EventLog) -> None:
    created = tenant_created()
    await log.append(created.stream, [created], NO_STREAM)

    async def write(name: str) -> str:
        try:
            await log.append(created.stream, [tenant_renamed(created.tenant_id, name)], 1)
        except ConcurrencyError:
            return "conflict"
        return "ok"

    results = await asyncio.gather(*(write(f"n{i}") for i in range(8)))
    assert sorted(results) == ["conflict"] * 7 + ["ok"]
    assert await log.stream_version(created.stream) == 2


async def test_append_rejects_events_of_another_stream(log: EventLog) -> None:
    a, b = tenant_created(), tenant_created()
    with pytest.raises(ValueError, match="belongs to stream"):
        await log.append(a.stream, [a, b])
    assert await read_everything(log) == []


async def test_reader_never_skips_an_event_whose_lower_position_commits_last(
        log: EventLog, database_url: str) -> None:
    early = tenant_created("early")   # gets the lower position, commits last
    late = tenant_created("late")     # gets the higher position, commits first
    slow = await asyncpg.connect(database_url)
    try:
        tx = slow.transaction()
        await tx.start()
        await log.append(early.stream, [early], conn=slow)
        await log.append(late.stream, [late])

        positions = {}
        for e in await log.read_stream(late.stream):
            positions["late"] = e.position

        # While the slow transaction is open, a reader must not pass it.
        page = await log.read_all(START, 100)
        assert page.events == []
        assert page.next == START

        await tx.commit()
    finally:
        await slow.close()

    events = await read_everything(log)
    assert [e.event for e in events] == [early, late]
    assert events[0].position < events[1].position == positions["late"]


async def test_transaction_order_wins_over_position_order(log: EventLog,
                                                          database_url: str) -> None:
    # The first transaction takes its id first but inserts last: its event gets the higher
    # position, yet it belongs before the other in the log's order (transaction id, position).
    first, second = tenant_created("first"), tenant_created("second")
    conn = await asyncpg.connect(database_url)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.fetchval("SELECT pg_current_xact_id()")
        await log.append(second.stream, [second])
        assert await read_everything(log) == []  # held back by the open transaction
        await log.append(first.stream, [first], conn=conn)
        await tx.commit()
    finally:
        await conn.close()
    events = await read_everything(log)
    assert [e.event for e in events] == [first, second]
    assert events[0].position > events[1].position


async def test_reader_resumes_from_its_checkpoint_under_concurrent_writers(
        log: EventLog) -> None:
    writers = 6
    per_writer = 40

    async def writer() -> None:
        for _ in range(per_writer):
            e = tenant_created()
            await log.append(e.stream, [e])

    seen: list = []
    checkpoint = START

    async def reader(stop: asyncio.Event) -> None:
        nonlocal checkpoint
        while True:
            page = await log.read_all(checkpoint, 7)
            seen.extend(page.events)
            checkpoint = page.next
            if stop.is_set() and page.caught_up:
                return
            await asyncio.sleep(0)

    stop = asyncio.Event()
    reading = asyncio.create_task(reader(stop))
    await asyncio.gather(*(writer() for _ in range(writers)))
    stop.set()
    await asyncio.wait_for(reading, 10)
    ids = [e.event_id for e in seen]
    assert len(ids) == writers * per_writer
    assert len(set(ids)) == len(ids)
    keys = [(e.transaction_id, e.position) for e in seen]
    assert keys == sorted(keys)


async def test_filters_scan_past_non_matching_events(log: EventLog) -> None:
    node = node_registered()
    tenants = [tenant_created(f"t{i}") for i in range(5)]
    await log.append(node.stream, [node])
    for t in tenants:
        await log.append(t.stream, [t])
    await log.record([node_registered()], origin="bus")

    page = await log.read_all(START, 100, EventFilter(types=("node.*",)))
    assert [e.type for e in page.events] == ["node.registered", "node.registered"]
    assert page.scanned == 7
    assert page.next.position == 7  # past the tenants too

    only_log = await read_everything(log, flt=EventFilter(types=("node.*",), origin="log"))
    assert [e.event for e in only_log] == [node]

    by_stream = await read_everything(log, flt=EventFilter(stream=tenants[2].stream))
    assert [e.event for e in by_stream] == [tenants[2]]
    by_glob = await read_everything(log, flt=EventFilter(stream="tenant:*"))
    assert len(by_glob) == 5

    from_pos = await read_everything(log, flt=EventFilter(min_position=5))
    assert [e.position for e in from_pos] == [5, 6, 7]

    # The SQL filter and the in-memory one agree.
    everything = await read_everything(log)
    for flt in (EventFilter(types=("tenant.created",)), EventFilter(stream="node:*"),
                EventFilter(origin="bus"), EventFilter(min_position=3)):
        assert [e.position for e in everything if flt.matches(e)] == \
            [e.position for e in await read_everything(log, flt=flt)]


async def test_type_filter_escapes_like_wildcards(log: EventLog) -> None:
    t = tenant_created()
    await log.append(t.stream, [t])
    page = await log.read_all(START, 10, EventFilter(types=("tenant_created",)))
    assert page.events == []  # '_' is not a wildcard


async def test_record_is_idempotent_on_event_id(log: EventLog) -> None:
    a, b = node_registered(), node_registered()
    first = await log.record([a, b, a])
    assert [r.event for r in first] == [a, b]
    again = await log.record([b, a])
    assert again == []
    assert len(await read_everything(log)) == 2
    assert all(e.origin == "bus" for e in await read_everything(log))


async def test_racing_recorders_record_each_event_once(log: EventLog) -> None:
    events = [node_registered() for _ in range(50)]
    # Many concurrent, overlapping batches of the same events, in different orders.
    batches = [events[i:] + events[:i] for i in range(0, 50, 5)]
    await asyncio.gather(*(log.record(b) for b in batches))
    recorded = await read_everything(log)
    assert sorted(e.event_id for e in recorded) == sorted(e.id for e in events)


async def test_record_versions_streams_contiguously(log: EventLog) -> None:
    node_id = uuid.uuid4()
    first = node_registered(node_id)
    await log.append(first.stream, [first])
    more = [node_registered(node_id) for _ in range(3)]
    await log.record(more)
    versions = [e.stream_version for e in await log.read_stream(first.stream)]
    assert versions == [1, 2, 3, 4]


async def test_events_are_immutable(log: EventLog, pool: asyncpg.Pool) -> None:
    t = tenant_created()
    await log.append(t.stream, [t])
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await pool.execute("UPDATE events SET type = 'x'")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await pool.execute("DELETE FROM events")


async def test_waker_wakes_on_append_and_polls_without_listener(log: EventLog,
                                                                database_url: str) -> None:
    waker = LogWaker(database_url, poll_interval=30)
    await waker.start()
    try:
        assert waker.listening
        generation = waker.generation
        t = tenant_created()
        waiting = asyncio.create_task(waker.wait(generation))
        await log.append(t.stream, [t])
        await asyncio.wait_for(waiting, 5)  # long before the 30 s poll
        assert waker.generation > generation
    finally:
        await waker.close()

    polling = LogWaker("postgresql://nobody@127.0.0.1:1/none", poll_interval=0.05)
    await polling.start()
    try:
        assert not polling.listening
        await asyncio.wait_for(polling.wait(polling.generation), 2)  # returns on the poll
    finally:
        await polling.close()


async def test_head_is_the_last_readable_position(log: EventLog) -> None:
    assert await log.head() == START
    t = tenant_created()
    result = await log.append(t.stream, [t])
    assert await log.head() == result.events[0].checkpoint


async def test_appending_an_event_twice_is_a_clear_error(log: EventLog,
                                                         pool: asyncpg.Pool) -> None:
    t = tenant_created()
    await log.append(t.stream, [t])
    again = tenant_renamed(t.tenant_id, "x")
    with pytest.raises(DuplicateEventError) as caught:
        await log.append(t.stream, [again, t])  # a retried command carrying the same event
    assert t.id in caught.value.event_ids and str(t.id) in str(caught.value)
    assert await pool.fetchval("SELECT count(*) FROM events") == 1
    assert await log.stream_version(t.stream) == 1  # nothing written, the version neither
    # Inside a caller's transaction too, which stays usable.
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(DuplicateEventError):
            await log.append(t.stream, [t], conn=conn)
        await log.append(t.stream, [again], expected_version=1, conn=conn)
    assert await log.stream_version(t.stream) == 2


async def test_waker_outlives_a_connection_closed_under_it(log: EventLog, database_url: str,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    real = log_waker_module.connect
    closed = 0

    async def closing_twice(dsn: str) -> asyncpg.Connection:
        nonlocal closed
        conn = await real(dsn)
        if closed < 2:
            # PostgreSQL restarting between the connect and the LISTEN: the connection is
            # closed under the listener, and asyncpg says so with an InterfaceError.
            closed += 1
            await conn.close()
        return conn

    monkeypatch.setattr(log_waker_module, "connect", closing_twice)
    waker = LogWaker(database_url, poll_interval=30)
    await waker.start()
    try:
        assert not waker.listening

        async def listening() -> bool:
            return waker.listening

        await eventually(listening, what="listening again after two failures")
        assert closed == 2
        generation = waker.generation
        waiting = asyncio.create_task(waker.wait(generation))
        t = tenant_created()
        await log.append(t.stream, [t])
        await asyncio.wait_for(waiting, 5)  # by notification, long before the 30 s poll
    finally:
        await waker.close()
