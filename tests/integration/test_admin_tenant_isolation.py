"""Tenant isolation where a tenant can name another's ids: its own `GET /v1/usage` on the
gateway, asked with tenant B's environment or key, and the admin listings per tenant."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import pytest

from schemas.events import UsagePrice, UsageRecorded
from services.domain.usage_records import UsageRecordsProjection
from services.infra.eventlog import EventLog
from services.infra.natsauth.identities import Role
from services.infra.projections import ProjectionRunner
from tests.conftest import Servers
from tests.integration.gateway_fixtures import MODEL, Platform, platform  # noqa: F401
from tests.integration.test_admin_api import Admin, running_admin


async def record_usage(pool: asyncpg.Pool, tenant: uuid.UUID, env: uuid.UUID, key: uuid.UUID,
                       n: int) -> None:
    price = UsagePrice(input_price_per_million=Decimal("1"),
                       output_price_per_million=Decimal("1"), region_multiplier=Decimal("1"),
                       cost=Decimal("0.01"))
    # All in one hour: a report's rows are per hour, and records that straddled one (a test
    # run at :58) came back as two rows.
    when = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=10, second=0, microsecond=0)
    log = EventLog(pool)
    await log.record([UsageRecorded(
        request_id=uuid.uuid4().hex, tenant_id=tenant, environment_id=env, api_key_id=key,
        model=MODEL, endpoint="/v1/chat/completions", region="us-east-1", node_id=None,
        prompt_tokens=10, completion_tokens=5, latency_ms=1.0, price=price,
        occurred_at=when + timedelta(minutes=i)) for i in range(n)])
    await ProjectionRunner(log, UsageRecordsProjection()).catch_up()


async def own_usage(p: Platform, key: str,
                    params: list[tuple[str, str]]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(
            f"{p.gateway_url}/v1/usage", params=params,
            headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, await r.json()


async def test_a_tenant_key_never_reads_another_tenants_usage(
        platform: Platform) -> None:  # noqa: F811
    p = platform
    await p.start_gateway()
    a_env, a_key = p.environment_id, p.key
    b = await p.catalog.create_tenant("B")
    b_env = await p.catalog.create_environment(b, "production", "us-east-1")
    b_key = await p.catalog.create_api_key(b_env)
    await record_usage(p.pool, p.tenant_id, a_env, a_key.key_id, 2)
    await record_usage(p.pool, b, b_env, b_key.key_id, 3)

    # Everything A may see: its own two requests, however it groups them.
    for group_by in ("tenant,environment,key,model", "tenant", "model", "environment,key"):
        status, body = await own_usage(p, a_key.plaintext, [("start", "1d"),
                                                            ("group_by", group_by)])
        assert status == 200, body
        assert sum(r["requests"] for r in body["data"]) == 2
        for row in body["data"]:
            assert row.get("tenant_id", str(p.tenant_id)) == str(p.tenant_id)
            assert row.get("environment_id") != str(b_env)
            assert row.get("api_key_id") != str(b_key.key_id)

    # Naming B's environment or key narrows A's own usage to nothing; it never widens it.
    for params in ([("environment_id", str(b_env))], [("api_key_id", str(b_key.key_id))],
                   [("environment_id", str(b_env)), ("group_by", "model")],
                   [("api_key_id", str(b_key.key_id)), ("group_by", "tenant")]):
        status, body = await own_usage(p, a_key.plaintext, [("start", "1d"), *params])
        assert (status, body["data"]) == (200, []), params

    # B sees its three, not A's two; A's ids narrow B's to nothing either.
    status, body = await own_usage(p, b_key.plaintext, [("start", "1d"),
                                                        ("group_by", "tenant")])
    assert [(r["tenant_id"], r["requests"]) for r in body["data"]] == [(str(b), 3)]
    status, body = await own_usage(p, b_key.plaintext, [("start", "1d"),
                                                        ("environment_id", str(a_env))])
    assert body["data"] == []

    # Asking for a tenant, twice for an environment, or for something unknown: refused.
    for params, param in (([("tenant_id", str(b))], "tenant_id"),
                          ([("environment_id", str(a_env)), ("environment_id", str(b_env))],
                           "environment_id"),
                          ([("tenants", str(b))], "tenants")):
        status, body = await own_usage(p, a_key.plaintext, params)
        assert status == 400 and body["error"]["param"] == param, (params, body)


@pytest.fixture
async def admin(servers: Servers, database_url: str, nats_url: str,
                redis_url: str) -> AsyncIterator[Admin]:
    async with running_admin(database_url, nats_url, redis_url,
                             creds=servers.creds(Role.ADMIN_API)) as running:
        yield running


async def test_a_tenants_environment_listing_never_holds_anothers(admin: Admin) -> None:
    a = await admin.ok("POST", "/tenants", {"name": "A"}, 201)
    b = await admin.ok("POST", "/tenants", {"name": "B"}, 201)
    mine, theirs = [], []
    for i in range(4):  # interleaved, so ids of B fall between A's
        mine.append((await admin.ok("POST", f"/tenants/{a['id']}/environments",
                                    {"name": f"a{i}", "region": "r"}, 201))["id"])
        theirs.append((await admin.ok("POST", f"/tenants/{b['id']}/environments",
                                      {"name": f"b{i}", "region": "r"}, 201))["id"])
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        page = await admin.ok("GET", f"/tenants/{a['id']}/environments", params=params)
        seen += [e["id"] for e in page["data"]]
        assert all(e["tenant_id"] == a["id"] for e in page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == mine
    # A cursor taken from B's listing does not open B's rows on A's route.
    b_page = await admin.ok("GET", f"/tenants/{b['id']}/environments", params={"limit": "1"})
    crossed = await admin.ok("GET", f"/tenants/{a['id']}/environments",
                             params={"cursor": b_page["next_cursor"]})
    assert {e["tenant_id"] for e in crossed["data"]} <= {a["id"]}
    assert not set(theirs) & {e["id"] for e in crossed["data"]}
