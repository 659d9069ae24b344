"""The catalog commands the admin API added (updates, rotation, deployments): events and rows
written together, and the projections idempotent and rebuildable with them."""

from __future__ import annotations

import uuid
from decimal import Decimal

import asyncpg
import pytest

from schemas.events import EntityStatus, Quota
from services.domain.catalog import Catalog, Conflict, Invalid, NotFound, catalog_projections
from services.domain.catalog import queries as q
from services.infra.eventlog import EventLog
from services.infra.projections import ProjectionRunner

TABLES = ("tenants", "environments", "api_keys", "models", "deployments")


@pytest.fixture
def catalog(pool: asyncpg.Pool) -> Catalog:
    return Catalog(EventLog(pool), actor="test", correlation_id="req-1")


async def snapshot(pool: asyncpg.Pool) -> dict[str, list[tuple]]:
    return {t: [tuple(r) for r in await pool.fetch(f"SELECT * FROM {t} ORDER BY id")]
            for t in TABLES}


async def build_everything(catalog: Catalog) -> None:
    tenant = await catalog.create_tenant("Acme")
    await catalog.update_tenant(tenant, email="ops@acme.test")
    env = await catalog.create_environment(tenant, "prod", "us-east-1",
                                           Quota(requests_per_minute=100, tokens_per_day=9))
    await catalog.update_environment(env, quota={"tokens_per_day": None},
                                     status=EntityStatus.SUSPENDED)
    key = await catalog.create_api_key(env, name="ci", limits=Quota(concurrency=2))
    await catalog.update_api_key(key.key_id, limits={"requests_per_minute": 7}, role="admin")
    await catalog.rotate_api_key(key.key_id)
    model = await catalog.create_model("m", family="f", vram_gb=1,
                                       input_price_per_million=Decimal("0.1"),
                                       output_price_per_million=Decimal("0.2"),
                                       context_length=10)
    await catalog.update_model(model, output_price_per_million=Decimal("0.3"))
    await catalog.update_model(model, weights_source="r2://models-bucket/m/")
    await catalog.create_model("n", family="f", vram_gb=1, input_price_per_million=Decimal(1),
                               output_price_per_million=Decimal(1), context_length=1,
                               weights_source="file:///srv/n")
    kept = await catalog.create_deployment("m", regions=["r1"], gpu_type="g", spot=True,
                                           min_nodes=0, max_nodes=2)
    await catalog.update_deployment(kept, regions=["r1", "r2"], max_nodes=5)
    gone = await catalog.create_deployment(model, regions=["r1"], gpu_type="g", spot=False,
                                           min_nodes=1, max_nodes=1)
    await catalog.delete_deployment(gone, "done")


async def test_runner_reapplying_is_a_no_op_and_rebuild_is_identical(
        catalog: Catalog, pool: asyncpg.Pool) -> None:
    await build_everything(catalog)
    inline = await snapshot(pool)
    log = EventLog(pool)
    for projection in catalog_projections():
        await ProjectionRunner(log, projection).catch_up()
    assert await snapshot(pool) == inline
    for projection in catalog_projections():
        await ProjectionRunner(log, projection).rebuild()
    assert await snapshot(pool) == inline
    metas = await pool.fetch("SELECT metadata FROM events")
    assert all(m["metadata"] == {"actor": "test", "correlation_id": "req-1"} for m in metas)


async def test_updates_merge_and_rotation_keeps_everything(catalog: Catalog,
                                                           pool: asyncpg.Pool) -> None:
    await build_everything(catalog)
    env = (await pool.fetchrow("SELECT * FROM environments"))
    assert (env["requests_per_minute"], env["tokens_per_day"], env["status"]) == \
        (100, None, "suspended")
    keys = await pool.fetch("SELECT * FROM api_keys ORDER BY created_at, id")
    assert [k["status"] for k in keys] == ["revoked", "active"]
    old, new = keys
    for column in ("environment_id", "tenant_id", "name", "role", "requests_per_minute",
                   "concurrency", "expires_at"):
        assert old[column] == new[column], column
    assert (new["role"], new["requests_per_minute"], new["concurrency"]) == ("admin", 7, 2)
    # The rotation's two events were committed in one transaction.
    txs = await pool.fetch("SELECT DISTINCT transaction_id FROM events WHERE "
                           "(type = 'apikey.revoked' AND stream = $1) OR "
                           "(type = 'apikey.created' AND stream = $2)",
                           f"apikey:{old['id']}", f"apikey:{new['id']}")
    assert len(txs) == 1
    deployments = await q.list_deployments(pool, include_deleted=True)
    assert [(d.regions, d.max_nodes, d.status) for d in deployments] == \
        [(["r1", "r2"], 5, "active"), (["r1"], 1, "deleted")]
    assert [d.status for d in await q.list_deployments(pool)] == ["active"]
    model, other = sorted(await q.list_models(pool), key=lambda m: m.name)
    assert (str(model.input_price_per_million), str(model.output_price_per_million)) == \
        ("0.1", "0.3")
    assert (model.weights_source, other.weights_source) == ("r2://models-bucket/m",
                                                            "file:///srv/n")


async def test_refusals(catalog: Catalog) -> None:
    tenant = await catalog.create_tenant("Acme")
    env = await catalog.create_environment(tenant, "prod", "r")
    key = await catalog.create_api_key(env)
    await catalog.revoke_api_key(key.key_id)
    with pytest.raises(Conflict):
        await catalog.rotate_api_key(key.key_id)
    with pytest.raises(Conflict):
        await catalog.update_api_key(key.key_id, name="x")
    with pytest.raises(NotFound):
        await catalog.update_environment(uuid.uuid4(), name="x")
    with pytest.raises(NotFound):
        await catalog.create_deployment("nope", regions=["r"], gpu_type="g", spot=False,
                                        min_nodes=0, max_nodes=1)
    with pytest.raises(Invalid) as err:
        await catalog.create_deployment("nope", regions=[], gpu_type="g", spot=False,
                                        min_nodes=0, max_nodes=1)
    assert err.value.field == "regions"
    model = await catalog.create_model("m", family="f", vram_gb=1,
                                       input_price_per_million=Decimal(1),
                                       output_price_per_million=Decimal(1), context_length=1)
    for source in ("s3://b/x", "r2://models/../x", "file://relative"):
        with pytest.raises(Invalid) as err:
            await catalog.update_model(model, weights_source=source)
        assert err.value.field == "weights_source"
        with pytest.raises(Invalid):
            await catalog.create_model("m2", family="f", vram_gb=1,
                                       input_price_per_million=Decimal(1),
                                       output_price_per_million=Decimal(1), context_length=1,
                                       weights_source=source)
    await catalog.update_model(model, status=EntityStatus.DELETED)
    with pytest.raises(Conflict, match="deleted"):
        await catalog.create_deployment("m", regions=["r"], gpu_type="g", spot=False,
                                        min_nodes=0, max_nodes=1)
