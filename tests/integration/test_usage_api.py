"""Usage read back by tenants (GET /v1/usage on the gateway), fed by the billing recorder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import aiohttp
import pytest
from aiohttp import web

from services.billing.app import create_billing_app
from services.billing.settings import BillingSettings
from services.domain.pricing import cost
from services.infra.devstack import free_port
from services.infra.natsauth.identities import Role
from services.infra.settings import Secret
from tests.helpers import eventually
from tests.integration.gateway_fixtures import MODEL, Platform, platform  # noqa: F401

HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]


@pytest.fixture
async def billed(platform: Platform) -> AsyncIterator[Platform]:  # noqa: F811
    settings = BillingSettings(database_url=Secret(platform.servers.database_url),
                               nats_url=Secret(platform.servers.nats_url),
                               nats_creds=Secret(platform.servers.creds(Role.BILLING)),
                               event_poll_interval=0.2, log_json=False)
    runner = web.AppRunner(create_billing_app(settings), shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", free_port()).start()
    await platform.start_gateway()
    await platform.add_node()
    await platform.routable(1)
    yield platform
    await runner.cleanup()


async def get_usage(p: Platform, key: str, **params: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as s, s.get(
            f"{p.gateway_url}/v1/usage", params=params,
            headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, await r.json()


async def test_tenants_read_their_own_usage_only(billed: Platform) -> None:
    p = billed
    client = p.client()
    results = [await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=n)
               for n in (3, 4, 5)]
    await client.close()

    async def recorded() -> bool:
        return await p.pool.fetchval("SELECT count(*) FROM usage_records") == 3

    await eventually(recorded, what="usage recorded by billing")
    status, body = await get_usage(p, p.key.plaintext, granularity="hour")
    assert status == 200 and body["granularity"] == "hour"
    (row,) = body["data"]
    prompt = sum(r.usage.prompt_tokens for r in results)  # type: ignore[union-attr]
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (3, prompt, 12)
    assert row["tenant_id"] == str(p.tenant_id) and row["model"] == MODEL
    assert row["region"] == "us-east-1"  # the node's
    expected = sum(cost(r.usage.prompt_tokens, r.usage.completion_tokens,  # type: ignore[union-attr]
                        Decimal("0.10"), Decimal("0.20")) for r in results)
    assert Decimal(row["cost"]) == expected
    # The period's total: the one row's figures, in dollars.
    assert body["currency"] == "usd"
    assert body["total"] == {k: row[k] for k in ("requests", "prompt_tokens",
                                                  "completion_tokens", "total_tokens", "cost")}

    # Another tenant's key sees none of it, and cannot ask for it.
    other = await p.catalog.create_tenant("Other")
    other_env = await p.catalog.create_environment(other, "prod", "us-east-1")
    other_key = await p.catalog.create_api_key(other_env)
    status, body = await get_usage(p, other_key.plaintext)
    assert status == 200 and body["data"] == [] and body["total"]["requests"] == 0
    status, body = await get_usage(p, other_key.plaintext, tenant_id=str(p.tenant_id))
    assert status == 400 and body["error"]["param"] == "tenant_id"


@pytest.mark.parametrize(("params", "param"), [
    ({"granularity": "week"}, "granularity"), ({"start": "yesterday"}, "start"),
    ({"start": "1h", "end": "2h"}, "end"), ({"environment_id": "nope"}, "environment_id"),
    ({"start": "2000-01-01T00:00:00"}, "start"),
])
async def test_bad_usage_queries(billed: Platform, params: dict[str, str], param: str) -> None:
    status, body = await get_usage(billed, billed.key.plaintext, **params)
    assert status == 400 and body["error"]["param"] == param


async def test_usage_needs_a_key(billed: Platform) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{billed.gateway_url}/v1/usage") as r:
        assert r.status == 401


async def test_a_tenant_key_opens_nothing_on_the_admin_api(billed: Platform,
                                                           redis_url: str) -> None:
    from tests.integration.test_admin_api import running_admin

    async with running_admin(billed.servers.database_url, billed.servers.nats_url,
                             redis_url, creds=billed.servers.creds(Role.ADMIN_API)) as admin:
        for header in ({"Authorization": f"Bearer {billed.key.plaintext}"},
                       {"X-Admin-Token": billed.key.plaintext}):
            async with admin.session.get(admin.url + "/admin/v1/tenants",
                                         headers=header) as r:
                assert r.status == 401
