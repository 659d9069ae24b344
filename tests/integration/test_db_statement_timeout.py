"""Every PostgreSQL pool has a statement timeout: a runaway statement is cancelled by the
server, and the connection serves the next one."""

from __future__ import annotations

import time

import asyncpg
import pytest
from aiohttp import web

from services.infra.db import DEFAULT_STATEMENT_TIMEOUT_MS, connect, create_pool
from services.infra.http import DB, Needs, create_app
from services.infra.settings import CoreSettings, Secret


async def test_a_pool_cancels_a_statement_longer_than_its_timeout(database_url: str) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=1, statement_timeout_ms=200)
    try:
        started = time.monotonic()
        with pytest.raises(asyncpg.QueryCanceledError, match="statement timeout"):
            await pool.fetchval("SELECT pg_sleep(30)")
        assert time.monotonic() - started < 10
        assert await pool.fetchval("SELECT 1") == 1  # the connection is still good
        assert await pool.fetchval("SHOW statement_timeout") == "200ms"
    finally:
        await pool.close()


async def test_pools_and_connections_have_one_by_default(database_url: str) -> None:
    assert DEFAULT_STATEMENT_TIMEOUT_MS == 30_000
    pool = await create_pool(database_url, min_size=1, max_size=1)
    conn = await connect(database_url)
    try:
        assert await pool.fetchval("SHOW statement_timeout") == "30s"
        assert await conn.fetchval("SHOW statement_timeout") == "30s"
    finally:
        await conn.close()
        await pool.close()


async def test_a_dedicated_connection_cancels_too(database_url: str) -> None:
    conn = await connect(database_url, statement_timeout_ms=200)
    try:
        with pytest.raises(asyncpg.QueryCanceledError):
            await conn.fetchval("SELECT pg_sleep(30)")
        assert await conn.fetchval("SELECT 2") == 2
    finally:
        await conn.close()


async def test_a_service_pool_takes_db_statement_timeout_ms(database_url: str) -> None:
    settings = CoreSettings(database_url=Secret(database_url), db_min_connections=1,
                            db_statement_timeout_ms=250)
    app = create_app(settings, needs=Needs(postgres=True, redis=False, nats=False))
    runner = web.AppRunner(app)
    await runner.setup()  # opens the service's resources, as serving would
    try:
        db = app[DB]
        assert await db.fetchval("SHOW statement_timeout") == "250ms"
        with pytest.raises(asyncpg.QueryCanceledError):
            await db.fetchval("SELECT pg_sleep(30)")
    finally:
        await runner.cleanup()

