"""Billing records usage from NATS into the log and usage_records, priced once, exactly once."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest
from aiohttp import web

from schemas.events import UsageRecorded
from services.billing.app import create_billing_app
from services.billing.pricing import cost
from services.billing.projection import UsageRecordsProjection
from services.billing.settings import BillingSettings
from services.core.bus import Bus
from services.core.catalog import Catalog
from services.core.devstack import free_port
from services.core.eventlog import EventLog
from services.core.natsauth.identities import Role
from services.core.projections import ProjectionRunner
from services.core.settings import Secret
from tests.conftest import Servers
from tests.helpers import eventually

MODEL = "llama-8b"


@pytest.fixture
async def billing(servers: Servers, pool: asyncpg.Pool, bus: Bus) -> AsyncIterator[None]:
    await Catalog(EventLog(pool)).create_model(
        MODEL, family="llama", vram_gb=16, input_price_per_million=Decimal("0.15"),
        output_price_per_million=Decimal("0.60"), context_length=8192)
    settings = BillingSettings(database_url=Secret(servers.database_url),
                               nats_url=Secret(servers.nats_url), event_poll_interval=0.2,
                               nats_creds=Secret(servers.creds(Role.BILLING)),
                               region_multipliers="eu-west-1=1.10", log_json=False)
    runner = web.AppRunner(create_billing_app(settings), shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", free_port()).start()
    yield
    await runner.cleanup()


def usage(request_id: str, *, model: str = MODEL, region: str = "us-east-1", prompt: int = 123,
          completion: int = 456, tenant: uuid.UUID | None = None) -> UsageRecorded:
    return UsageRecorded(request_id=request_id, tenant_id=tenant or uuid.uuid4(),
                         environment_id=uuid.uuid4(), api_key_id=uuid.uuid4(), model=model,
                         endpoint="chat", region=region, node_id=None, prompt_tokens=prompt,
                         completion_tokens=completion, latency_ms=12.5)


async def records(pool: asyncpg.Pool, n: int) -> list[asyncpg.Record]:
    async def enough() -> list[asyncpg.Record] | None:
        rows = await pool.fetch("SELECT * FROM usage_records ORDER BY request_id")
        return rows if len(rows) >= n else None

    return await eventually(enough, what=f"{n} usage records")


async def test_usage_is_priced_and_recorded_once(billing: None, bus: Bus,
                                                 pool: asyncpg.Pool) -> None:
    a, b = usage("req-a"), usage("req-b", region="eu-west-1")
    await bus.publish(a)
    await bus.publish(b)
    await bus.publish(a)  # a retry: deduplicated by NATS
    rows = await records(pool, 2)
    assert [r["request_id"] for r in rows] == ["req-a", "req-b"]
    assert rows[0]["cost"] == cost(123, 456, Decimal("0.15"), Decimal("0.60"))
    assert rows[1]["cost"] == cost(123, 456, Decimal("0.15"), Decimal("0.60"), Decimal("1.10"))
    assert rows[0]["total_tokens"] == 579
    logged = await pool.fetch("SELECT data FROM events WHERE type = 'usage.recorded' "
                              "ORDER BY position")
    assert logged[0]["data"]["price"]["cost"] == str(rows[0]["cost"])

    # The price is in the log: a rebuild after a price change gives the same records.
    await pool.execute("UPDATE models SET input_price_per_million = 99")
    before = [tuple(r) for r in await pool.fetch("SELECT * FROM usage_records ORDER BY 1")]
    await ProjectionRunner(EventLog(pool), UsageRecordsProjection()).rebuild()
    after = [tuple(r) for r in await pool.fetch("SELECT * FROM usage_records ORDER BY 1")]
    assert after == before


async def test_requests_sharing_a_request_id_are_each_billed(billing: None, bus: Bus,
                                                             pool: asyncpg.Pool) -> None:
    """X-Request-ID is the caller's: one client reusing it, or another tenant choosing the
    same, is still a separate request."""
    tenant, other = uuid.uuid4(), uuid.uuid4()
    first, second = usage("same", tenant=tenant), usage("same", tenant=tenant, prompt=7)
    theirs = usage("same", tenant=other)
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


async def test_usage_of_an_unknown_model_is_parked(billing: None, bus: Bus,
                                                   pool: asyncpg.Pool) -> None:
    await bus.publish(usage("req-x", model="no-such-model"))
    await bus.publish(usage("req-y"))
    await records(pool, 1)

    async def parked() -> bool:
        return (await bus.js.stream_info("DLQ")).state.messages == 1

    await eventually(parked, what="unpriceable usage in the dead letters")
    msg = await bus.js.get_msg("DLQ", 1)
    assert "no price for model 'no-such-model'" in (msg.headers or {})["Crosslogic-Error"]
