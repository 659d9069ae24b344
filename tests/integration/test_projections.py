"""Projections against a real PostgreSQL: exactly once, follow live, rebuild identically."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from services.infra.event_stats import EventTypeStats
from services.infra.eventlog import EventLog
from services.infra.log_records import RecordedEvent
from services.infra.log_waker import LogWaker
from services.infra.projections import Projection, ProjectionMetrics, ProjectionRunner
from tests.helpers import eventually, node_registered, tenant_created, tenant_renamed


class TenantNames(Projection):
    """A test projection that would show any double or skipped application: it keeps every
    rename in order, and counts applications per event."""

    name = "test_tenant_names"
    tables = ("test_tenant_names",)
    event_types = ("tenant.*",)

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on

    async def apply(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        for e in events:
            name = e.data.get("name")
            if name is not None and name == self.fail_on:
                raise RuntimeError("projection bug")
            await conn.execute(
                """INSERT INTO test_tenant_names (tenant_id, names, applied)
                   VALUES ($1, ARRAY[$2::text], 1)
                   ON CONFLICT (tenant_id) DO UPDATE SET
                     names = test_tenant_names.names || $2::text,
                     applied = test_tenant_names.applied + 1""",
                e.data["tenant_id"], name)


@pytest.fixture
async def names_table(pool: asyncpg.Pool) -> AsyncIterator[None]:
    await pool.execute("""CREATE TABLE IF NOT EXISTS test_tenant_names (
        tenant_id text PRIMARY KEY, names text[] NOT NULL, applied int NOT NULL)""")
    await pool.execute("TRUNCATE test_tenant_names")
    yield
    await pool.execute("DROP TABLE test_tenant_names")


async def snapshot(pool: asyncpg.Pool, table: str) -> list[tuple]:
    return [tuple(r) for r in await pool.fetch(f"SELECT * FROM {table} ORDER BY 1")]


async def seed(log: EventLog, tenants: int, renames: int) -> None:
    for i in range(tenants):
        t = tenant_created(f"t{i}")
        await log.append(t.stream, [t] + [tenant_renamed(t.tenant_id, f"t{i}-{j}")
                                         for j in range(renames)])


async def test_catch_up_applies_each_event_once_and_checkpoints(pool: asyncpg.Pool,
                                                               names_table: None) -> None:
    log = EventLog(pool)
    await seed(log, 10, 3)
    await log.record([node_registered()])  # not a tenant event: scanned, not applied
    runner = ProjectionRunner(log, TenantNames(), batch_size=7)
    assert await runner.catch_up() == 40
    rows = await snapshot(pool, "test_tenant_names")
    assert len(rows) == 10
    assert all(applied == 4 for _, _, applied in rows)
    for _, names, _ in rows:
        assert names == [names[0]] + [f"{names[0]}-{j}" for j in range(3)]
    assert (await runner.checkpoint()).position == 41
    assert await runner.catch_up() == 0  # nothing twice


async def test_failed_batch_rolls_back_with_its_checkpoint(pool: asyncpg.Pool,
                                                          names_table: None) -> None:
    log = EventLog(pool)
    await seed(log, 3, 1)
    broken = ProjectionRunner(log, TenantNames(fail_on="t2-0"), batch_size=100)
    with pytest.raises(RuntimeError):
        await broken.catch_up()
    assert await snapshot(pool, "test_tenant_names") == []
    assert (await broken.checkpoint()).position == 0
    fixed = ProjectionRunner(log, TenantNames(), batch_size=100)
    assert await fixed.catch_up() == 6
    assert all(applied == 2 for *_, applied in await snapshot(pool, "test_tenant_names"))


async def test_replicas_share_a_projection_without_double_applying(pool: asyncpg.Pool,
                                                                  names_table: None) -> None:
    log = EventLog(pool)
    await seed(log, 30, 4)
    runners = [ProjectionRunner(log, TenantNames(), batch_size=5) for _ in range(4)]

    async def drain(r: ProjectionRunner) -> int:
        total = 0
        while True:
            result = await r.step()
            total += result.applied
            if result.caught_up and not result.locked_elsewhere:
                return total

    totals = await asyncio.gather(*(drain(r) for r in runners))
    assert sum(totals) == 150
    assert all(applied == 5 for *_, applied in await snapshot(pool, "test_tenant_names"))


async def test_live_projection_equals_its_rebuild(pool: asyncpg.Pool, database_url: str,
                                                  names_table: None) -> None:
    log = EventLog(pool)
    waker = LogWaker(database_url, poll_interval=0.2)
    await waker.start()
    live = ProjectionRunner(log, TenantNames(), batch_size=16, waker=waker)
    running = asyncio.create_task(live.run())
    stats_runner = ProjectionRunner(log, EventTypeStats(), waker=waker)
    running_stats = asyncio.create_task(stats_runner.run())
    try:
        # Concurrent writers, one of them holding a transaction open across others' commits.
        slow = await asyncpg.connect(database_url)
        tx = slow.transaction()
        await tx.start()
        late = tenant_created("late")
        await log.append(late.stream, [late], conn=slow)
        await asyncio.gather(*(seed(log, 5, 3) for _ in range(4)))
        await tx.commit()
        await slow.close()
        await asyncio.gather(*(seed(log, 3, 2) for _ in range(3)))

        total = await pool.fetchval("SELECT count(*) FROM events")

        async def caught_up() -> bool:
            applied = await pool.fetchval("SELECT coalesce(sum(applied), 0) "
                                          "FROM test_tenant_names")
            return applied == total

        await eventually(caught_up, what="live projection caught up")
        await eventually(lambda: _stats_total(pool, total), what="stats caught up")
        live_rows = await snapshot(pool, "test_tenant_names")
        live_stats = await snapshot(pool, "event_type_stats")
        assert ("late" in [r[1][0] for r in live_rows])
    finally:
        running.cancel()
        running_stats.cancel()
        await asyncio.gather(running, running_stats, return_exceptions=True)
        await waker.close()

    rebuilt = ProjectionRunner(log, TenantNames(), batch_size=1000)
    assert await rebuilt.rebuild() == total
    assert await snapshot(pool, "test_tenant_names") == live_rows
    stats = ProjectionRunner(log, EventTypeStats())
    await stats.rebuild()
    assert await snapshot(pool, "event_type_stats") == live_stats


async def _stats_total(pool: asyncpg.Pool, total: int) -> bool:
    return bool(await pool.fetchval("SELECT coalesce(sum(events), 0) FROM event_type_stats")
                == total)


async def test_catch_up_waits_for_a_replica_holding_the_projection(pool: asyncpg.Pool,
                                                                   database_url: str,
                                                                   names_table: None) -> None:
    log = EventLog(pool)
    await seed(log, 4, 2)
    runner = ProjectionRunner(log, TenantNames(), batch_size=5)
    await pool.execute("INSERT INTO checkpoints (name) VALUES ($1)", TenantNames.name)
    # Another replica in the middle of a batch: it holds the checkpoint row.
    other = await asyncpg.connect(database_url)
    tx = other.transaction()
    await tx.start()
    await other.execute("SELECT 1 FROM checkpoints WHERE name = $1 FOR UPDATE",
                        TenantNames.name)
    catching_up = asyncio.create_task(runner.catch_up())
    try:
        async def waiting_for_the_lock() -> bool:
            return bool(await pool.fetchval(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"))

        await eventually(waiting_for_the_lock, what="catch-up waiting for the other replica")
        assert not catching_up.done()  # not a partial answer while the other one works
    finally:
        await tx.commit()
        await other.close()
    assert await asyncio.wait_for(catching_up, 10) == 12
    assert len(await snapshot(pool, "test_tenant_names")) == 4


async def test_run_survives_a_failing_batch_and_shows_it(pool: asyncpg.Pool, database_url: str,
                                                         names_table: None) -> None:
    log = EventLog(pool)
    await seed(log, 3, 1)
    registry = CollectorRegistry()
    metrics = ProjectionMetrics(registry)
    projection = TenantNames(fail_on="t1-0")  # a bug in apply
    waker = LogWaker(database_url, poll_interval=0.1)
    await waker.start()
    runner = ProjectionRunner(log, projection, batch_size=100, waker=waker, metrics=metrics,
                              lag_interval=0.05, max_retry_delay=0.1)
    labels = {"projection": TenantNames.name}

    def sample(name: str, **extra: str) -> float | None:
        return registry.get_sample_value(name, {**labels, **extra})

    running = asyncio.create_task(runner.run())
    try:
        async def failing_again_and_again() -> bool:
            errors = sample("projection_errors_total", kind="apply") or 0
            return sample("projection_failing") == 1 and errors >= 3

        await eventually(failing_again_and_again, what="the failure counted, and retried")
        assert not running.done()  # the task lives on
        assert runner.failure is not None and "projection bug" in runner.failure
        assert sample("projection_lag_events") == 6  # nothing applied: all six behind

        # More events arrive while it is stuck: the lag grows.
        await seed(log, 1, 0)

        async def lag_is(n: int) -> bool:
            return sample("projection_lag_events") == n

        await eventually(lambda: lag_is(7), what="lag counting new events")

        projection.fail_on = None  # the fix is deployed
        await eventually(lambda: lag_is(0), what="lag back to zero")
        assert sample("projection_failing") == 0 and runner.failure is None
        assert sample("projection_events_applied_total") == 7
        assert len(await snapshot(pool, "test_tenant_names")) == 4
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await waker.close()
