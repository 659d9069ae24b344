"""`crosslogic backup` / `crosslogic restore` against a real PostgreSQL: back up, wipe,
restore, rebuild every projection from the restored log, and find every table as it was."""

from __future__ import annotations

import secrets
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from schemas.events import NodeLaunching, NodeStatus, UsagePrice, UsageRecorded
from schemas.ids import uuid7
from services.cli.main import _run_projections
from services.cli.registry import all_projections
from services.domain.catalog import Catalog
from services.domain.fleet import Fleet
from services.domain.node_states import Signal
from services.infra.db import create_pool
from services.infra.devstack import DevStack
from services.infra.eventlog import EventLog
from services.infra.log_records import START, EventFilter, LogPosition
from services.infra.migrate import migrate
from tests.conftest import Servers
from tests.helpers import node_registered, tenant_created
from tests.integration.test_cli import run_cli


@pytest.fixture
async def own_database(servers: Servers) -> AsyncIterator[str]:
    """A database of its own: this test drops its schema."""
    name = f"backup_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(servers.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = urllib.parse.urlsplit(servers.database_url)._replace(path=f"/{name}").geturl()
    try:
        await migrate(url)
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _seed(pool: asyncpg.Pool) -> None:
    log = EventLog(pool)
    catalog = Catalog(log, actor="test")
    tenant = await catalog.create_tenant("Acme", "ops@acme.test")
    env = await catalog.create_environment(tenant, "production", "us-east-1")
    key = await catalog.create_api_key(env, name="prod")
    await catalog.rotate_api_key(key.key_id)
    await catalog.create_model("m", family="llama", vram_gb=16,
                               input_price_per_million=Decimal("0.10"),
                               output_price_per_million=Decimal("0.20"), context_length=8192)
    deployment = await catalog.create_deployment("m", regions=["aws/us-east-1"], gpu_type="A10G",
                                                 spot=True, min_nodes=1, max_nodes=3)
    await catalog.update_deployment(deployment, max_nodes=4)
    fleet = Fleet(log, actor="test")
    launched = uuid7()
    await fleet.launching(NodeLaunching(
        node_id=launched, deployment_id=deployment, cluster_name="crosslogic-m-1", model_name="m",
        provider="aws", region="us-east-1", gpu_type="A10G", spot=True,
        deadline=datetime.now(UTC) + timedelta(minutes=15)))
    registered = node_registered(launched, model="m")
    await log.record([registered])
    assert await fleet.signal(launched, Signal.HEALTHY) == NodeStatus.ACTIVE
    price = UsagePrice(input_price_per_million=Decimal("0.10"),
                       output_price_per_million=Decimal("0.20"),
                       region_multiplier=Decimal("1"), cost=Decimal("0.000005"))
    await log.record([UsageRecorded(
        request_id=f"req-{i}", tenant_id=tenant, environment_id=env, api_key_id=key.key_id,
        model="m", endpoint="/v1/chat/completions", region="us-east-1", node_id=launched,
        prompt_tokens=10 + i, completion_tokens=20, latency_ms=12.5, price=price)
        for i in range(5)])


async def _snapshot(pool: asyncpg.Pool) -> dict[str, list[Any]]:
    """Every table; transaction ids left out (a restore renumbers them: only their order is
    the log's, compared as `log order`)."""
    tables = sorted({t for p in all_projections() for t in p.tables})
    out: dict[str, list[Any]] = {}
    for table in [*tables, "events", "streams"]:
        rows = await pool.fetch(f"SELECT * FROM {table}")
        out[table] = sorted((tuple(v for k, v in r.items() if k != "transaction_id")
                             for r in rows), key=repr)
    out["log order"] = [r["event_id"] for r in await pool.fetch(
        "SELECT event_id FROM events ORDER BY transaction_id, position")]
    return out


async def test_backup_wipe_restore_rebuild_gives_back_every_table(own_database: str,
                                                                  tmp_path: Path) -> None:
    pool = await create_pool(own_database, min_size=1, max_size=4)
    try:
        await _seed(pool)
        await _run_projections(own_database, all_projections().names(), rebuild=False)
        before = await _snapshot(pool)
        assert before["tenants"] and before["api_keys"] and before["nodes"]
        assert len(before["usage_records"]) == 5
    finally:
        await pool.close()

    dump = tmp_path / "backups" / "crosslogic.dump"
    done = run_cli("backup", "-o", str(dump), database_url=own_database)
    assert done.returncode == 0, done.stderr
    assert f"wrote {dump}" in done.stdout and dump.stat().st_size > 0
    assert not dump.with_name(dump.name + ".partial").exists()

    wipe = await asyncpg.connect(own_database)
    await wipe.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    await wipe.close()

    refused = run_cli("restore", str(dump), database_url=own_database)
    assert refused.returncode != 0 and "--yes" in refused.stderr
    done = run_cli("restore", str(dump), "--yes", database_url=own_database)
    assert done.returncode == 0, done.stderr
    for name in all_projections().names():
        assert f"rebuilt {name}:" in done.stdout

    pool = await create_pool(own_database, min_size=1, max_size=4)
    try:
        after = await _snapshot(pool)
    finally:
        await pool.close()
    assert after.keys() == before.keys()
    for table in before:
        assert after[table] == before[table], table


async def test_restore_of_a_missing_file_changes_nothing(own_database: str,
                                                         tmp_path: Path) -> None:
    pool = await create_pool(own_database, min_size=1, max_size=2)
    try:
        tenant = await Catalog(EventLog(pool), actor="test").create_tenant("Keep")
        done = run_cli("restore", str(tmp_path / "nope.dump"), "--yes",
                       database_url=own_database)
        assert done.returncode != 0 and "no such file" in done.stderr
        assert await pool.fetchval("SELECT name FROM tenants WHERE id = $1", tenant) == "Keep"
    finally:
        await pool.close()


def test_the_password_stays_off_the_command_line() -> None:
    from services.cli.backup import split_password

    target = split_password("postgresql://app:s%40cret@db.internal:5432/crosslogic?sslmode=require")
    assert target.url == "postgresql://app@db.internal:5432/crosslogic?sslmode=require"
    assert target.password == "s@cret"
    assert target.env()["PGPASSWORD"] == "s@cret"
    plain = split_password("postgresql://postgres@127.0.0.1:5432/x")
    assert plain.url == "postgresql://postgres@127.0.0.1:5432/x" and plain.password == ""


@pytest.fixture
def second_cluster(tmp_path: Path) -> Iterator[str]:
    """Another PostgreSQL cluster, fresh: its transaction ids have nothing to do with the
    first one's. Started from the test's own thread, which outlives it."""
    stack = DevStack(tmp_path / "second", redis=False, nats=False)
    stack.start()
    try:
        yield stack.urls.database_url
    finally:
        stack.stop()


async def _use_transaction_ids(url: str, until: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        while int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint")) < until:
            pass
    finally:
        await conn.close()


async def test_restore_into_another_cluster_keeps_the_log_readable_and_relayable(
        own_database: str, second_cluster: str, tmp_path: Path) -> None:
    # The source cluster is far ahead of the fresh one, as a production cluster would be.
    fresh = await asyncpg.connect(second_cluster)
    fresh_xid = int(await fresh.fetchval("SELECT pg_current_xact_id()::text::bigint"))
    await fresh.close()
    await _use_transaction_ids(own_database, fresh_xid + 3000)
    pool = await create_pool(own_database, min_size=1, max_size=4)
    try:
        # Overlapping transactions: log order differs from position order, and must survive.
        log = EventLog(pool)
        slow = await pool.acquire()
        tx = slow.transaction()
        await tx.start()
        await slow.execute("SELECT pg_current_xact_id()")  # takes its id first
        await Catalog(log, actor="test").create_tenant("Early")
        late = tenant_created("late")
        await log.append(late.stream, [late], conn=slow)
        await tx.commit()
        await pool.release(slow)
        await _seed(pool)
        await _run_projections(own_database, all_projections().names(), rebuild=False)
        # The relay has published everything so far.
        await pool.execute(
            """INSERT INTO checkpoints (name, transaction_id, position)
               SELECT 'outbox-relay', transaction_id, position FROM events
               ORDER BY transaction_id DESC, position DESC LIMIT 1""")
        before = await _snapshot(pool)
        positions = [r["position"] for r in await pool.fetch(
            "SELECT position FROM events ORDER BY transaction_id, position")]
        assert positions != sorted(positions)  # the overlap is in the log
    finally:
        await pool.close()

    dump = tmp_path / "prod.dump"
    assert run_cli("backup", "-o", str(dump), database_url=own_database).returncode == 0
    done = run_cli("restore", str(dump), "--yes", database_url=second_cluster)
    assert done.returncode == 0, done.stderr

    pool = await create_pool(second_cluster, min_size=1, max_size=4)
    try:
        after = await _snapshot(pool)
        for table in before:
            assert after[table] == before[table], table
        log = EventLog(pool)
        # Every restored event is readable on this cluster, in the old order.
        page = await log.read_all(START, 10_000)
        assert [e.event_id for e in page.events] == before["log order"]
        # The relay's checkpoint still means "all of those published": a new event is next.
        relay = await pool.fetchrow(
            "SELECT transaction_id, position FROM checkpoints WHERE name = 'outbox-relay'")
        checkpoint = LogPosition(relay["transaction_id"], relay["position"])
        assert (await log.read_all(checkpoint, 100, EventFilter(origin="log"))).events == []
        new = tenant_created("after restore")
        await log.append(new.stream, [new])
        fresh_page = await log.read_all(checkpoint, 100, EventFilter(origin="log"))
        assert [e.event_id for e in fresh_page.events] == [new.id]
        # And the projections follow the new event too.
        await _run_projections(second_cluster, ["tenants"], rebuild=False)
        assert await pool.fetchval("SELECT name FROM tenants WHERE id = $1",
                                   new.tenant_id) == "after restore"
    finally:
        await pool.close()
