"""Billing records usage from NATS into the log and usage_records, priced once, exactly once;
priced from the catalog whatever the message says, and only usage that is plausible and whose
tenant, environment and key exist and belong together."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest
from aiohttp import web
from asyncpg.connection import LoggedQuery
from prometheus_client import CollectorRegistry

from schemas.events import UsageRecorded
from services.billing.app import create_billing_app
from services.billing.intake import UsageIntake
from services.billing.prices import PriceBook
from services.billing.settings import BillingSettings
from services.domain.catalog import Catalog
from services.domain.pricing import cost
from services.domain.usage_records import UsageRecordsProjection
from services.infra.bus import Bus
from services.infra.db import Connection, create_pool
from services.infra.devstack import free_port
from services.infra.eventlog import EventLog
from services.infra.http import REGISTRY
from services.infra.natsauth.identities import Role
from services.infra.projections import ProjectionRunner
from services.infra.recorder import Refusal
from services.infra.settings import Secret
from tests.conftest import Servers
from tests.helpers import UsageOwner, eventually, usage_owner

MODEL = "llama-8b"


@pytest.fixture
async def billing(servers: Servers, pool: asyncpg.Pool, bus: Bus
                  ) -> AsyncIterator[web.Application]:
    await Catalog(EventLog(pool)).create_model(
        MODEL, family="llama", vram_gb=16, input_price_per_million=Decimal("0.15"),
        output_price_per_million=Decimal("0.60"), context_length=8192)
    settings = BillingSettings(database_url=Secret(servers.database_url),
                               nats_url=Secret(servers.nats_url), event_poll_interval=0.2,
                               nats_creds=Secret(servers.creds(Role.BILLING)),
                               region_multipliers="eu-west-1=1.10", log_json=False)
    app = create_billing_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", free_port()).start()
    yield app
    await runner.cleanup()


@pytest.fixture
async def owner(pool: asyncpg.Pool) -> UsageOwner:
    return await usage_owner(pool)


def usage(request_id: str, owner: UsageOwner, *, model: str = MODEL, region: str = "us-east-1",
          prompt: int = 123, completion: int = 456) -> UsageRecorded:
    return UsageRecorded(request_id=request_id, tenant_id=owner.tenant_id,
                         environment_id=owner.environment_id, api_key_id=owner.api_key_id,
                         model=model, endpoint="chat", region=region, node_id=None,
                         prompt_tokens=prompt, completion_tokens=completion, latency_ms=12.5)


async def records(pool: asyncpg.Pool, n: int) -> list[asyncpg.Record]:
    async def enough() -> list[asyncpg.Record] | None:
        rows = await pool.fetch("SELECT * FROM usage_records ORDER BY request_id")
        return rows if len(rows) >= n else None

    return await eventually(enough, what=f"{n} usage records")


async def test_usage_is_priced_and_recorded_once(billing: web.Application, bus: Bus,
                                                 pool: asyncpg.Pool, owner: UsageOwner) -> None:
    a, b = usage("req-a", owner), usage("req-b", owner, region="eu-west-1")
    await bus.publish(a)
    await bus.publish(b)
    await bus.publish(a)  # a retry: deduplicated by NATS
    rows = await records(pool, 2)
    assert [r["request_id"] for r in rows] == ["req-a", "req-b"]
    assert rows[0]["cost"] == cost(123, 456, Decimal("0.15"), Decimal("0.60"))
    assert rows[1]["cost"] == cost(123, 456, Decimal("0.15"), Decimal("0.60"), Decimal("1.10"))
    assert rows[0]["total_tokens"] == 579
    # Two fetchers share the consumer: the log's order is not the publishing order.
    logged = await pool.fetch("SELECT data FROM events WHERE type = 'usage.recorded' "
                              "ORDER BY data->>'request_id'")
    assert logged[0]["data"]["price"]["cost"] == str(rows[0]["cost"])

    # The price is in the log: a rebuild after a price change gives the same records.
    await pool.execute("UPDATE models SET input_price_per_million = 99")
    before = [tuple(r) for r in await pool.fetch("SELECT * FROM usage_records ORDER BY 1")]
    await ProjectionRunner(EventLog(pool), UsageRecordsProjection()).rebuild()
    after = [tuple(r) for r in await pool.fetch("SELECT * FROM usage_records ORDER BY 1")]
    assert after == before


async def test_requests_sharing_a_request_id_are_each_billed(billing: web.Application,
                                                             bus: Bus, pool: asyncpg.Pool,
                                                             owner: UsageOwner) -> None:
    """X-Request-ID is the caller's: one client reusing it, or another tenant choosing the
    same, is still a separate request."""
    someone = await usage_owner(pool)
    tenant, other = owner.tenant_id, someone.tenant_id
    first, second = usage("same", owner), usage("same", owner, prompt=7)
    theirs = usage("same", someone)
    for e in (first, second, theirs, first):  # the last: a redelivery, not a new request
        await bus.publish(e)
    rows = await records(pool, 3)
    assert sorted((r["tenant_id"], r["prompt_tokens"]) for r in rows) == \
        sorted([(tenant, 123), (tenant, 7), (other, 123)])
    hourly = await pool.fetch("SELECT tenant_id, sum(requests)::int, sum(prompt_tokens)::int "
                              "FROM usage_hourly GROUP BY tenant_id")
    assert sorted(tuple(h) for h in hourly) == sorted([(tenant, 2, 130), (other, 1, 123)])
    await ProjectionRunner(EventLog(pool), UsageRecordsProjection()).rebuild()
    assert await pool.fetchval("SELECT count(*) FROM usage_records") == 3


async def test_usage_of_an_unknown_model_is_parked(billing: web.Application, bus: Bus,
                                                   pool: asyncpg.Pool, owner: UsageOwner) -> None:
    await bus.publish(usage("req-x", owner, model="no-such-model"))
    await bus.publish(usage("req-y", owner))
    await records(pool, 1)

    async def parked() -> bool:
        return (await bus.js.stream_info("DLQ")).state.messages == 1

    await eventually(parked, what="unpriceable usage in the dead letters")
    msg = await bus.js.get_msg("DLQ", 1)
    assert "no price for model 'no-such-model'" in (msg.headers or {})["Crosslogic-Error"]



def refused(app: web.Application, reason: str) -> float:
    return app[REGISTRY].get_sample_value("billing_usage_refused_total",
                                          {"reason": reason}) or 0.0


async def test_a_batch_naming_unknown_models_asks_the_catalog_once(
        pool: asyncpg.Pool, database_url: str, owner: UsageOwner) -> None:
    """Usage with made-up model names (a gateway's credential in the wrong hands) costs one
    query per batch, not one per record; the same names again cost none."""
    await Catalog(EventLog(pool)).create_model(
        MODEL, family="llama", vram_gb=16, input_price_per_million=Decimal("0.15"),
        output_price_per_million=Decimal("0.60"), context_length=8192)
    asked: list[str] = []

    def on_query(q: LoggedQuery) -> None:
        if "FROM models" in q.query:
            asked.append(q.query)

    async def watched(conn: Connection) -> None:
        conn.add_query_logger(on_query)

    # Billing's own pool, every query on it watched: what really reaches PostgreSQL (asyncpg
    # calls its loggers soon after each query: counted once the transaction is over).
    billing_db = await create_pool(database_url, min_size=2, max_size=2, setup=watched)
    try:
        prices = PriceBook(billing_db, {}, refresh_seconds=3600)
        await prices.refresh()
        registry = CollectorRegistry()
        intake = UsageIntake(prices, max_tokens=10_000_000, registry=registry)

        def batch(tag: str) -> list[UsageRecorded]:
            return [*(usage(f"{tag}-{i}", owner, model=f"made-up-{i}") for i in range(50)),
                    usage(f"{tag}-real", owner)]

        async with billing_db.acquire() as conn:
            async with conn.transaction():
                first = await intake(batch("a"), conn)
            async with conn.transaction():
                again = await intake(batch("b"), conn)
    finally:
        await billing_db.close()
    assert len(asked) == 2  # the start's refresh, and the first batch's one lookup
    assert prices.queries == 2
    for verdicts in (first, again):
        assert all(isinstance(v, Refusal) and "no price" in v.reason for v in verdicts[:-1])
        (priced,) = verdicts[-1]
        assert isinstance(priced, UsageRecorded) and priced.price is not None
        assert priced.price.cost == cost(123, 456, Decimal("0.15"), Decimal("0.60"))
    assert registry.get_sample_value("billing_usage_refused_total",
                                     {"reason": "unknown_model"}) == 100


async def test_a_model_added_to_the_catalog_is_priced_by_the_next_batch(
        pool: asyncpg.Pool, owner: UsageOwner) -> None:
    """A name found missing is asked again once its memory lapses (here at once), and the
    lookup brings in its price."""
    prices = PriceBook(pool, {}, refresh_seconds=3600, unknown_seconds=0)
    await prices.refresh()
    intake = UsageIntake(prices, max_tokens=10_000_000, registry=CollectorRegistry())
    async with pool.acquire() as conn:
        (early,) = await intake([usage("early", owner, model="new-model")], conn)
    assert isinstance(early, Refusal)
    await Catalog(EventLog(pool)).create_model(
        "new-model", family="llama", vram_gb=16, input_price_per_million=Decimal("1"),
        output_price_per_million=Decimal("2"), context_length=8192)
    async with pool.acquire() as conn:
        ((priced,),) = await intake([usage("later", owner, model="new-model")], conn)
    assert isinstance(priced, UsageRecorded) and priced.price is not None
    assert priced.price.cost == cost(123, 456, Decimal("1"), Decimal("2"))
