"""Cost per model and region: through the real gateway and billing (nodes in two regions, two
models, a region multiplier), and the migration that gave usage_hourly its region."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from schemas.events import UsagePrice, UsageRecorded
from services.billing.app import create_billing_app
from services.billing.settings import BillingSettings
from services.domain.pricing import cost
from services.domain.usage_records import UsageRecordsProjection
from services.infra.db import create_pool
from services.infra.devstack import free_port
from services.infra.eventlog import EventLog
from services.infra.migrate import MIGRATIONS_DIR, migrate
from services.infra.natsauth.identities import Role
from services.infra.projections import ProjectionRunner
from services.infra.settings import Secret
from tests.helpers import eventually
from tests.integration.gateway_fixtures import MODEL, Platform, platform  # noqa: F401
from tests.integration.test_migrate import fresh_db  # noqa: F401

OTHER = "Qwen/Qwen2.5-7B-Instruct"
PRICES = {MODEL: (Decimal("0.10"), Decimal("0.20")), OTHER: (Decimal("0.30"), Decimal("0.90"))}
MULTIPLIERS = {"us-east-1": Decimal(1), "eu-west-1": Decimal("1.10")}
HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]


@pytest.fixture
async def two_regions(platform: Platform) -> AsyncIterator[Platform]:  # noqa: F811
    """Billing (eu-west-1 at 1.10x), a gateway that takes turns, and a node of each of two
    models in each of two regions."""
    p = platform
    await p.catalog.create_model(OTHER, family="qwen", vram_gb=16,
                                 input_price_per_million=PRICES[OTHER][0],
                                 output_price_per_million=PRICES[OTHER][1],
                                 context_length=8192)
    settings = BillingSettings(database_url=Secret(p.servers.database_url),
                               nats_url=Secret(p.servers.nats_url),
                               nats_creds=Secret(p.servers.creds(Role.BILLING)),
                               region_multipliers="eu-west-1=1.10", event_poll_interval=0.2,
                               log_json=False)
    runner = web.AppRunner(create_billing_app(settings), shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", free_port()).start()
    # Round robin: each model's requests alternate between its two nodes, so both regions
    # serve some of each model's requests.
    await p.start_gateway(lb_strategy="round_robin")
    for model in (MODEL, OTHER):
        for region in MULTIPLIERS:
            await p.add_node(model=model, region=region)
        await p.routable(2, model)
    yield p
    await runner.cleanup()


async def get_usage(p: Platform, **params: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(
            f"{p.gateway_url}/v1/usage", params=params,
            headers={"Authorization": f"Bearer {p.key.plaintext}"}) as r:
        body: dict[str, Any] = await r.json()
        assert r.status == 200, body
        return body


def by_model_and_region(rows: list[dict[str, Any]]) -> dict[tuple[str, str], Decimal]:
    """Cost per (model, region), over however many periods the rows span."""
    out: dict[tuple[str, str], Decimal] = {}
    for r in rows:
        key = (r["model"], r["region"])
        out[key] = out.get(key, Decimal(0)) + Decimal(r["cost"])
    return out


async def test_tenants_see_their_cost_per_model_and_region(two_regions: Platform) -> None:
    p = two_regions
    client = p.client()
    for model in (MODEL, OTHER):
        for n in (3, 4, 5, 6):
            await client.chat.completions.create(model=model, messages=HELLO, max_tokens=n)
    await client.close()

    async def recorded() -> bool:
        return await p.pool.fetchval("SELECT count(*) FROM usage_records") == 8

    await eventually(recorded, what="usage recorded by billing")
    records = await p.pool.fetch(
        "SELECT model, region, prompt_tokens, completion_tokens, cost FROM usage_records "
        "WHERE tenant_id = $1", p.tenant_id)
    # Each request priced by its model and the region of the node that served it.
    for r in records:
        assert r["cost"] == cost(r["prompt_tokens"], r["completion_tokens"],
                                 *PRICES[r["model"]], MULTIPLIERS[r["region"]])
    expected: dict[tuple[str, str], Decimal] = {}
    for r in records:
        expected[(r["model"], r["region"])] = \
            expected.get((r["model"], r["region"]), Decimal(0)) + r["cost"]
    assert set(expected) == {(m, region) for m in PRICES for region in MULTIPLIERS}
    recorded_cost = sum((r["cost"] for r in records), Decimal(0))

    # The period around now in whole hours (from usage_hourly), from now's partial hours
    # (usage_records), and by key (usage_records throughout): the same figures each time.
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    whole = {"start": (hour - timedelta(hours=1)).isoformat(),
             "end": (hour + timedelta(hours=2)).isoformat()}
    for params in ({**whole, "group_by": "model,region"},
                   {"start": "1h", "granularity": "hour", "group_by": "model,region"},
                   {**whole, "group_by": "key,model,region"},
                   {**whole}):
        body = await get_usage(p, **params)
        assert body["currency"] == "usd"
        assert by_model_and_region(body["data"]) == expected, params
        total = body["total"]
        assert Decimal(total["cost"]) == sum(Decimal(r["cost"]) for r in body["data"]) \
            == recorded_cost, params
        assert total["requests"] == 8 == sum(r["requests"] for r in body["data"])
        assert total["total_tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"]
                                            for r in records)
        assert total["total_tokens"] == total["prompt_tokens"] + total["completion_tokens"]

    # Only one region: its rows, and a total that is its share.
    eu = await get_usage(p, **whole, group_by="model", region="eu-west-1")
    assert {r["model"]: Decimal(r["cost"]) for r in eu["data"]} == \
        {m: c for (m, region), c in expected.items() if region == "eu-west-1"}
    assert Decimal(eu["total"]["cost"]) == sum(
        c for (_, region), c in expected.items() if region == "eu-west-1")
    assert all("region" not in r for r in eu["data"])
    nowhere = await get_usage(p, **whole, region="ap-south-1")
    assert nowhere["data"] == [] and nowhere["total"]["cost"] == "0.000000000"


def copy_migrations(to: Path, *, through: int) -> None:
    for f in sorted(MIGRATIONS_DIR.glob("*.sql")):
        if int(f.name[:4]) <= through:
            shutil.copy(f, to / f.name)


async def test_the_migration_splits_old_hours_by_region(fresh_db: str,  # noqa: F811
                                                        tmp_path: Path) -> None:
    """usage_hourly as it was before 0018 (regions added together; rows from before 0014 at
    last_position 0 and the time 0008 ran): rebuilt per region, each row's figures, latest
    usage and latest log position exact, as a rebuild of the projection from the log gives."""
    folder = tmp_path / "migrations"
    folder.mkdir()
    copy_migrations(folder, through=17)
    await migrate(fresh_db, folder)
    pool = await create_pool(fresh_db, min_size=1, max_size=2)
    try:
        log = EventLog(pool)
        tenant, env, key = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        hour = datetime(2025, 3, 10, 9, tzinfo=UTC)
        events, costs = [], {}
        for i in range(12):
            region = ("us-east-1", "eu-west-1", "ap-south-1")[i % 3]
            multiplier = Decimal("1.10") if region == "eu-west-1" else Decimal(1)
            price = UsagePrice(input_price_per_million=Decimal("1"),
                               output_price_per_million=Decimal("2"),
                               region_multiplier=multiplier,
                               cost=cost(10 + i, 2 * i, Decimal(1), Decimal(2), multiplier))
            events.append(UsageRecorded(
                request_id=f"req-{i}", tenant_id=tenant, environment_id=env, api_key_id=key,
                model=("m", "n")[i % 4 == 0], endpoint="chat", region=region, node_id=None,
                prompt_tokens=10 + i, completion_tokens=2 * i, latency_ms=1.0, price=price,
                occurred_at=hour + timedelta(minutes=17 * i)))
            costs[events[-1].id] = price.cost
        recorded = await log.record(events)
        position = {r.event.id: r.position for r in recorded}
        # usage_records as the projection wrote it then; usage_hourly with every region of
        # an hour in one row, the early hours from before last_position existed.
        await pool.executemany(
            """INSERT INTO usage_records (request_id, event_id, tenant_id, environment_id,
                   api_key_id, model, endpoint, region, node_id, prompt_tokens,
                   completion_tokens, total_tokens, cost, latency_ms, ttft_ms, status,
                   streamed, occurred_at)
               VALUES ($1, $2, $3, $4, $5, $6, 'chat', $7, NULL, $8, $9, $8::int + $9::int,
                   $10, 1.0, NULL, 200, false, $11)""",
            [(e.request_id, e.id, e.tenant_id, e.environment_id, e.api_key_id, e.model,
              e.region, e.prompt_tokens, e.completion_tokens, costs[e.id], e.occurred_at)
             for e in events])
        await pool.execute(
            """INSERT INTO usage_hourly (tenant_id, environment_id, model, hour, requests,
                   prompt_tokens, completion_tokens, cost, updated_at, last_position)
               SELECT r.tenant_id, r.environment_id, r.model,
                      date_trunc('hour', r.occurred_at, 'UTC') AS h, count(*),
                      sum(r.prompt_tokens), sum(r.completion_tokens), sum(r.cost),
                      CASE WHEN date_trunc('hour', r.occurred_at, 'UTC') < $1 THEN now()
                           ELSE max(r.occurred_at) END,
                      CASE WHEN date_trunc('hour', r.occurred_at, 'UTC') < $1 THEN 0
                           ELSE max(e.position) END
               FROM usage_records r JOIN events e USING (event_id)
               GROUP BY 1, 2, 3, 4""", hour + timedelta(hours=2))
        before = await pool.fetchrow("SELECT count(*) AS n, sum(requests) AS requests, "
                                     "sum(cost) AS cost FROM usage_hourly")
        assert before["n"] < 12 and before["requests"] == 12
        assert await pool.fetchval("SELECT count(*) FROM usage_hourly "
                                   "WHERE last_position = 0") > 0

        copy_migrations(folder, through=18)
        assert [m.version for m in await migrate(fresh_db, folder)] == [18]

        expected: dict[tuple[Any, ...], list[Any]] = {}
        for e in events:
            group = (e.tenant_id, e.occurred_at.replace(minute=0), e.environment_id, e.model,
                     e.region)
            row = expected.setdefault(group, [0, 0, 0, Decimal(0), e.occurred_at, 0])
            row[0] += 1
            row[1] += e.prompt_tokens
            row[2] += e.completion_tokens
            row[3] += costs[e.id]
            row[4] = max(row[4], e.occurred_at)
            row[5] = max(row[5], position[e.id])
        columns = ("SELECT tenant_id, hour, environment_id, model, region, requests, "
                   "prompt_tokens, completion_tokens, cost, updated_at, last_position "
                   "FROM usage_hourly ORDER BY tenant_id, hour, environment_id, model, region")
        after = [tuple(r) for r in await pool.fetch(columns)]
        assert after == sorted((*k, *v) for k, v in expected.items())
        assert len({r[4] for r in after}) == 3
        assert sum(r[8] for r in after) == before["cost"]
        # The table is what the projection gives from the log, and keeps the same shape.
        await ProjectionRunner(log, UsageRecordsProjection()).rebuild()
        assert [tuple(r) for r in await pool.fetch(columns)] == after
        key_columns = await pool.fetchval(
            """SELECT array_agg(a.attname::text ORDER BY k.n)
               FROM pg_index i CROSS JOIN unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
               WHERE i.indrelid = 'usage_hourly'::regclass AND i.indisprimary""")
        assert key_columns == ["tenant_id", "hour", "environment_id", "model", "region"]
        indexes = {r["indexname"] for r in await pool.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'usage_hourly'")}
        assert {"usage_hourly_hour", "usage_hourly_last_position"} <= indexes
    finally:
        await pool.close()
