"""Migrations against a real PostgreSQL: once each, serialized across starters."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from services.infra.migrate import MigrationError, load_migrations, migrate
from tests.conftest import Servers


@pytest.fixture
async def fresh_db(servers: Servers) -> AsyncIterator[str]:
    """An empty database on the same server, dropped afterwards."""
    name = f"mig_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(servers.database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    base, _, _ = servers.database_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


def write(folder: Path, name: str, sql: str) -> None:
    (folder / name).write_text(sql)


async def test_project_migrations_apply_once(fresh_db: str) -> None:
    applied = await migrate(fresh_db)
    assert [m.version for m in applied] == [m.version for m in load_migrations()]
    assert await migrate(fresh_db) == []
    conn = await asyncpg.connect(fresh_db)
    try:
        count = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(load_migrations())
        assert await conn.fetchval("SELECT to_regclass('events') IS NOT NULL")
    finally:
        await conn.close()


async def test_two_starters_racing_apply_each_migration_once(fresh_db: str,
                                                             tmp_path: Path) -> None:
    # The first migration is slow, so both starters are inside `migrate` at once; without the
    # lock the second would try CREATE TABLE again and fail.
    write(tmp_path, "0001_slow.sql", "SELECT pg_sleep(0.5); CREATE TABLE once (id int);")
    write(tmp_path, "0002_more.sql", "INSERT INTO once VALUES (1);")
    results = await asyncio.gather(migrate(fresh_db, tmp_path), migrate(fresh_db, tmp_path))
    assert sorted(len(r) for r in results) == [0, 2]
    conn = await asyncpg.connect(fresh_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM once") == 1
    finally:
        await conn.close()


async def test_failed_migration_rolls_back_and_stops(fresh_db: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_ok.sql", "CREATE TABLE a (id int);")
    write(tmp_path, "0002_bad.sql", "CREATE TABLE b (id int); SELECT nonsense;")
    write(tmp_path, "0003_never.sql", "CREATE TABLE c (id int);")
    with pytest.raises(asyncpg.PostgresError):
        await migrate(fresh_db, tmp_path)
    conn = await asyncpg.connect(fresh_db)
    try:
        assert await conn.fetchval("SELECT to_regclass('a') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('b') IS NULL")
        assert await conn.fetchval("SELECT to_regclass('c') IS NULL")
        assert await conn.fetchval("SELECT array_agg(version) FROM schema_migrations") == [1]
    finally:
        await conn.close()


async def test_edited_migration_is_refused(fresh_db: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_a.sql", "CREATE TABLE a (id int);")
    await migrate(fresh_db, tmp_path)
    write(tmp_path, "0001_a.sql", "CREATE TABLE a (id bigint);")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(fresh_db, tmp_path)


def test_bad_file_names_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "1_x.sql", "")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        load_migrations(tmp_path)
    (tmp_path / "1_x.sql").unlink()
    write(tmp_path, "0001_a.sql", "")
    write(tmp_path, "0001_b.sql", "")
    with pytest.raises(MigrationError, match="two migrations numbered 0001"):
        load_migrations(tmp_path)
