"""The `crosslogic` command, run as an operator runs it: a real process against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from services.infra.eventlog import EventLog
from tests.helpers import node_registered, tenant_created

CLI = [sys.executable, "-m", "services.cli"]


def run_cli(*args: str, database_url: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if database_url:
        env["DATABASE_URL"] = database_url
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


async def seed(pool: asyncpg.Pool) -> tuple:
    log = EventLog(pool)
    t = tenant_created("acme")
    n = node_registered()
    await log.append(t.stream, [t])
    await log.append(n.stream, [n])
    return t, n


async def test_migrate_is_idempotent(database_url: str) -> None:
    result = run_cli("migrate", database_url=database_url)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_missing_database_url_is_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["CROSSLOGIC_STATE_DIR"] = str(tmp_path)
    result = subprocess.run([*CLI, "events", "tail", "--no-follow"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "set DATABASE_URL" in result.stderr


async def test_tail_history_with_filters(pool: asyncpg.Pool, database_url: str) -> None:
    tenant, node = await seed(pool)
    everything = run_cli("events", "tail", "--no-follow", database_url=database_url)
    assert everything.returncode == 0, everything.stderr
    lines = everything.stdout.splitlines()
    assert len(lines) == 2
    assert "tenant.created" in lines[0]
    assert tenant.stream in lines[0]
    assert '"name":"acme"' in lines[0]
    assert "node.registered" in lines[1]

    nodes = run_cli("events", "tail", "--no-follow", "--type", "node.*", "--json",
                    database_url=database_url)
    records = [json.loads(line) for line in nodes.stdout.splitlines()]
    assert [r["event"]["id"] for r in records] == [str(node.id)]
    assert records[0]["event"]["type"] == "node.registered"
    assert records[0]["position"] == 2 and records[0]["origin"] == "log"

    by_stream = run_cli("events", "tail", "--no-follow", "--stream", tenant.stream,
                        database_url=database_url)
    assert len(by_stream.stdout.splitlines()) == 1

    recent = run_cli("events", "tail", "--no-follow", "--since", "10m", "--json",
                     database_url=database_url)
    assert len(recent.stdout.splitlines()) == 2
    future = run_cli("events", "tail", "--no-follow", "--since", "2999-01-01T00:00:00",
                     database_url=database_url)
    assert future.stdout == ""
    from_two = run_cli("events", "tail", "--no-follow", "--from", "2", "--json",
                       database_url=database_url)
    assert [json.loads(x)["position"] for x in from_two.stdout.splitlines()] == [2]


async def test_tail_bad_since_is_a_clear_error(database_url: str) -> None:
    result = run_cli("events", "tail", "--since", "yesterday-ish", database_url=database_url)
    assert result.returncode != 0
    assert "--since wants a duration" in result.stderr


@pytest.fixture
async def follower(database_url: str) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {**os.environ, "DATABASE_URL": database_url}
    proc = await asyncio.create_subprocess_exec(*CLI, "events", "tail", "--type", "tenant.*",
                                                env=env, stdout=asyncio.subprocess.PIPE)
    yield proc
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 10)


async def test_tail_follows_live(pool: asyncpg.Pool, follower: asyncio.subprocess.Process) -> None:
    assert follower.stdout is not None
    log = EventLog(pool)
    first = tenant_created("before")
    await log.append(first.stream, [first])
    line = await asyncio.wait_for(follower.stdout.readline(), 20)
    assert str(first.tenant_id) in line.decode()
    # Events appended after it caught up arrive as they are committed; others are filtered.
    n = node_registered()
    await log.append(n.stream, [n])
    later = tenant_created("after")
    await log.append(later.stream, [later])
    line = await asyncio.wait_for(follower.stdout.readline(), 20)
    assert str(later.tenant_id) in line.decode() and "node." not in line.decode()
    follower.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(follower.wait(), 10) == 0


async def test_stats_are_current(pool: asyncpg.Pool, database_url: str) -> None:
    await seed(pool)
    stats = run_cli("events", "stats", database_url=database_url)
    assert stats.returncode == 0, stats.stderr
    rows = {line.split()[0]: line.split()[1] for line in stats.stdout.splitlines()[1:]}
    assert rows == {"node.registered": "1", "tenant.created": "1"}


async def test_projections_rebuild_and_list(pool: asyncpg.Pool, database_url: str) -> None:
    await seed(pool)
    listed = run_cli("projections", "list", database_url=database_url)
    assert "event_type_stats" in listed.stdout.split()
    rebuilt = run_cli("projections", "rebuild", "event_type_stats", database_url=database_url)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "2 events applied" in rebuilt.stdout
    rows = await pool.fetch("SELECT type, events FROM event_type_stats ORDER BY type")
    assert [tuple(r) for r in rows] == [("node.registered", 1), ("tenant.created", 1)]

    unknown = run_cli("projections", "rebuild", "nope", database_url=database_url)
    assert unknown.returncode != 0
    assert "no projection 'nope'" in unknown.stderr and "event_type_stats" in unknown.stderr
