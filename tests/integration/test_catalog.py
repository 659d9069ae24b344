"""Catalog commands and projections against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from schemas.events import Quota
from services.domain.catalog import (
    API_KEY_PREFIX,
    Catalog,
    Conflict,
    NotFound,
    catalog_projections,
    hash_api_key,
)
from services.infra.eventlog import EventLog
from services.infra.projections import ProjectionRunner


@pytest.fixture
def catalog(pool: asyncpg.Pool) -> Catalog:
    return Catalog(EventLog(pool), actor="test")


async def snapshot(pool: asyncpg.Pool) -> dict[str, list[tuple]]:
    out = {}
    for table in ("tenants", "environments", "api_keys", "models"):
        out[table] = [tuple(r) for r in await pool.fetch(f"SELECT * FROM {table} ORDER BY id")]
    return out


async def test_commands_write_events_and_rows_together(catalog: Catalog,
                                                       pool: asyncpg.Pool) -> None:
    tenant = await catalog.create_tenant("Acme", "ops@acme.test")
    env = await catalog.create_environment(tenant, "production", "us-east-1",
                                           Quota(requests_per_minute=600))
    expires = datetime.now(UTC) + timedelta(days=30)
    key = await catalog.create_api_key(env, name="ci", limits=Quota(concurrency=4),
                                       expires_at=expires)
    model = await catalog.create_model("llama-8b", family="llama", vram_gb=16,
                                       input_price_per_million=Decimal("0.10"),
                                       output_price_per_million=Decimal("0.20"),
                                       context_length=8192)

    assert key.plaintext.startswith(API_KEY_PREFIX) and len(key.plaintext) == 50
    assert key.plaintext not in repr(key)
    row = await pool.fetchrow("SELECT * FROM api_keys WHERE id = $1", key.key_id)
    assert row["key_hash"] == hash_api_key(key.plaintext)
    assert key.plaintext not in str(dict(row))
    assert (row["tenant_id"], row["environment_id"], row["status"], row["concurrency"],
            row["last_four"]) == (tenant, env, "active", 4, key.plaintext[-4:])
    assert row["expires_at"] == expires.replace(microsecond=row["expires_at"].microsecond)
    assert await pool.fetchval("SELECT requests_per_minute FROM environments") == 600
    assert await pool.fetchval("SELECT input_price_per_million FROM models WHERE id = $1",
                               model) == Decimal("0.10")
    types = [r["type"] for r in await pool.fetch("SELECT type FROM events ORDER BY position")]
    assert types == ["tenant.created", "environment.created", "apikey.created", "model.created"]
    actor = await pool.fetchval("SELECT metadata->>'actor' FROM events LIMIT 1")
    assert actor == "test"
    # The event carries the hash, never the key.
    assert key.plaintext not in str(await pool.fetch("SELECT data FROM events"))


async def test_suspend_reactivate_and_revoke(catalog: Catalog, pool: asyncpg.Pool) -> None:
    tenant = await catalog.create_tenant("Acme")
    env = await catalog.create_environment(tenant, "prod", "eu-west-1")
    key = await catalog.create_api_key(env)
    await catalog.suspend_tenant(tenant, "unpaid")
    assert tuple(await pool.fetchrow("SELECT status, status_reason FROM tenants")) == \
        ("suspended", "unpaid")
    await catalog.reactivate_tenant(tenant)
    assert await pool.fetchval("SELECT status FROM tenants") == "active"
    await catalog.revoke_api_key(key.key_id, "leaked")
    await catalog.revoke_api_key(key.key_id, "again")  # idempotent: no second event
    assert await pool.fetchval("SELECT status FROM api_keys") == "revoked"
    assert await pool.fetchval("SELECT count(*) FROM events WHERE type = 'apikey.revoked'") == 1


async def test_unknown_ids_and_conflicts(catalog: Catalog) -> None:
    with pytest.raises(NotFound, match="tenant"):
        await catalog.create_environment(uuid.uuid4(), "x", "us-east-1")
    with pytest.raises(NotFound, match="environment"):
        await catalog.create_api_key(uuid.uuid4())
    with pytest.raises(NotFound):
        await catalog.suspend_tenant(uuid.uuid4())
    with pytest.raises(NotFound):
        await catalog.revoke_api_key(uuid.uuid4())
    kwargs = dict(family="llama", vram_gb=16, input_price_per_million=Decimal(1),
                  output_price_per_million=Decimal(2), context_length=8192)
    await catalog.create_model("m", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(Conflict, match="already exists"):
        await catalog.create_model("m", **kwargs)  # type: ignore[arg-type]


async def test_concurrent_model_creation_of_one_name(catalog: Catalog, pool: asyncpg.Pool) -> None:
    kwargs = dict(family="llama", vram_gb=16, input_price_per_million=Decimal(1),
                  output_price_per_million=Decimal(2), context_length=8192)
    results = await asyncio.gather(*(catalog.create_model("same", **kwargs)  # type: ignore[arg-type]
                                      for _ in range(5)), return_exceptions=True)
    assert sum(isinstance(r, uuid.UUID) for r in results) == 1
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, uuid.UUID))
    assert await pool.fetchval("SELECT count(*) FROM events") == 1


async def test_runner_reapplying_is_a_no_op_and_rebuild_is_identical(
        catalog: Catalog, pool: asyncpg.Pool) -> None:
    for i in range(3):
        tenant = await catalog.create_tenant(f"t{i}")
        env = await catalog.create_environment(tenant, "prod", "us-east-1")
        key = await catalog.create_api_key(env)
        if i == 1:
            await catalog.suspend_tenant(tenant)
            await catalog.revoke_api_key(key.key_id)
    await catalog.create_model("m", family="f", vram_gb=1, input_price_per_million=Decimal(1),
                               output_price_per_million=Decimal(1), context_length=10)
    inline = await snapshot(pool)
    log = EventLog(pool)
    for projection in catalog_projections():  # the runner sees events already applied inline
        await ProjectionRunner(log, projection).catch_up()
    assert await snapshot(pool) == inline
    for projection in catalog_projections():
        await ProjectionRunner(log, projection).rebuild()
    assert await snapshot(pool) == inline
