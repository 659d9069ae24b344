"""Linking a tenant to a Stripe customer from the admin API and the CLI: once, whatever
happens (repeats, concurrent calls, a customer Stripe made before a crash), and a clear 503
where Stripe is not configured."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from schemas.events import SubscriptionChanged
from services.core.billing_ledger import record_billing_events
from services.core.catalog import Catalog
from services.core.eventlog import EventLog
from tests.doubles.stripe_server import StripeServer, running_stripe
from tests.integration.test_admin_api import TOKEN, Admin, running_admin
from tests.integration.test_cli_admin import Cli, base_env

PRICES = {"stripe_price_input_tokens": "price_in_tokens",
          "stripe_price_output_tokens": "price_out_tokens"}


@pytest.fixture
async def stripe_server() -> AsyncIterator[StripeServer]:
    async with running_stripe() as server:
        yield server


@pytest.fixture
async def admin(database_url: str, nats_url: str, redis_url: str,
                stripe_server: StripeServer) -> AsyncIterator[Admin]:
    from services.core.settings import Secret

    async with running_admin(database_url, nats_url, redis_url,
                             stripe_secret_key=Secret(stripe_server.api_key),
                             stripe_api_base=stripe_server.url, stripe_timeout=2.0,
                             **PRICES) as running:
        yield running


async def test_link_creates_customer_and_subscription_once(admin: Admin,
                                                           stripe_server: StripeServer,
                                                           pool: asyncpg.Pool) -> None:
    tenant = (await admin.ok("POST", "/tenants", {"name": "Acme", "email": "ops@acme.test"},
                             status=201))["id"]
    first = await admin.ok("POST", f"/tenants/{tenant}/billing/customer")
    assert first["created"] is True
    assert first["customer_id"].startswith("cus_") and first["subscription_id"].startswith("sub_")
    again = await admin.ok("POST", f"/tenants/{tenant}/billing/customer")
    assert again == {**first, "created": False}
    state = stripe_server.state
    [customer] = state.customers.values()
    assert customer["metadata"] == {"tenant_id": tenant}
    assert (customer["name"], customer["email"]) == ("Acme", "ops@acme.test")
    [sub] = state.subscriptions.values()
    assert [i["price"]["id"] for i in sub["items"]["data"]] == ["price_in_tokens",
                                                                "price_out_tokens"]
    linked = await pool.fetch("SELECT data, metadata FROM events "
                              "WHERE type = 'billing.customer_linked'")
    assert len(linked) == 1
    assert linked[0]["metadata"]["actor"] == "admin-api"

    shown = await admin.ok("GET", f"/tenants/{tenant}/billing")
    assert shown["account"]["customer_id"] == first["customer_id"]
    assert shown["account"]["payment_status"] == "ok"
    assert shown["totals"] == {"exported": 0, "planned": 0, "failed": 0, "skipped": 0}
    assert [e["type"] for e in shown["events"]] == ["billing.customer_linked"]


async def test_concurrent_links_and_a_customer_left_by_a_crash(admin: Admin,
                                                               stripe_server: StripeServer,
                                                               pool: asyncpg.Pool) -> None:
    tenant = await Catalog(EventLog(pool)).create_tenant("Beta")
    answers = await asyncio.gather(*(admin.ok("POST", f"/tenants/{tenant}/billing/customer")
                                     for _ in range(4)))
    assert len({a["customer_id"] for a in answers}) == 1
    assert sorted(a["created"] for a in answers) == [False, False, False, True]
    assert len(stripe_server.state.customers) == 1
    assert len(stripe_server.state.subscriptions) == 1

    # A link that crashed after Stripe made the customer, and past the idempotency window:
    # the customer is found by its tenant id, not made twice.
    other = await Catalog(EventLog(pool)).create_tenant("Gamma")
    made_before = stripe_server.state.add_customer(str(other), "Gamma")
    answer = await admin.ok("POST", f"/tenants/{other}/billing/customer")
    assert answer["customer_id"] == made_before
    assert len(stripe_server.state.customers) == 2


async def test_a_tenant_whose_subscription_ended_is_subscribed_again(
        admin: Admin, stripe_server: StripeServer, pool: asyncpg.Pool) -> None:
    tenant = await Catalog(EventLog(pool)).create_tenant("Eta")
    first = await admin.ok("POST", f"/tenants/{tenant}/billing/customer")
    old = first["subscription_id"]
    # Stripe ends it; its webhook reaches billing (recorded here as the webhook records it).
    stripe_server.state.cancel_subscription(old)
    async with pool.acquire() as conn, conn.transaction():
        await record_billing_events(conn, [SubscriptionChanged(
            tenant_id=tenant, subscription_id=old, status="canceled",
            stripe_event_id="evt_deleted")], actor="stripe-webhook")

    again = await admin.ok("POST", f"/tenants/{tenant}/billing/customer")
    assert again["created"] is True
    assert again["customer_id"] == first["customer_id"]
    # A new subscription, not the ended one replayed under the first link's idempotency key.
    assert again["subscription_id"] not in (None, old)
    assert stripe_server.state.subscriptions[again["subscription_id"]]["status"] == "active"
    assert len(stripe_server.state.subscriptions) == 2
    shown = await admin.ok("GET", f"/tenants/{tenant}/billing")
    assert (shown["account"]["subscription_id"], shown["account"]["subscription_status"]) == (
        again["subscription_id"], "active")
    assert await admin.ok("POST", f"/tenants/{tenant}/billing/customer") == {
        **again, "created": False}
    assert len(stripe_server.state.subscriptions) == 2


async def test_link_errors(admin: Admin, stripe_server: StripeServer,
                           pool: asyncpg.Pool) -> None:
    status, answer = await admin.call("POST", f"/tenants/{uuid.uuid4()}/billing/customer")
    assert status == 404
    tenant = await Catalog(EventLog(pool)).create_tenant("Delta")
    stripe_server.state.fail("/v1/customers", "status", status=500)
    status, answer = await admin.call("POST", f"/tenants/{tenant}/billing/customer")
    assert status == 503
    assert answer["error"]["code"] == "stripe_unavailable"
    assert await pool.fetchval("SELECT count(*) FROM billing_accounts") == 0
    assert (await admin.ok("POST", f"/tenants/{tenant}/billing/customer"))["created"] is True


async def test_admin_without_stripe_answers_503(database_url: str, nats_url: str,
                                                redis_url: str, pool: asyncpg.Pool) -> None:
    tenant = await Catalog(EventLog(pool)).create_tenant("Epsilon")
    async with running_admin(database_url, nats_url, redis_url) as admin:
        status, answer = await admin.call("POST", f"/tenants/{tenant}/billing/customer")
        assert status == 503
        assert answer["error"]["code"] == "stripe_not_configured"
        assert "STRIPE_SECRET_KEY" in answer["error"]["message"]
        shown = await admin.ok("GET", f"/tenants/{tenant}/billing")
        assert shown["account"] is None
        assert (await admin.call("GET", f"/tenants/{uuid.uuid4()}/billing"))[0] == 404


async def test_cli_billing_link_and_show(admin: Admin, tmp_path: Path,
                                         pool: asyncpg.Pool) -> None:
    tenant = await Catalog(EventLog(pool)).create_tenant("Zeta")
    cli = Cli({**base_env(tmp_path), "CROSSLOGIC_ADMIN_URL": admin.url,
               "CROSSLOGIC_ADMIN_TOKEN": TOKEN})
    linked = json.loads(await cli.ok("billing", "link", str(tenant), "--json"))
    assert linked["created"] is True
    out = await cli.ok("billing", "link", str(tenant))
    assert "created" in out and "no" in out and linked["customer_id"] in out
    shown = await cli.ok("billing", "show", str(tenant))
    assert linked["customer_id"] in shown and "payment" in shown
    code, _, err = await cli.run("billing", "show", str(uuid.uuid4()))
    assert code == 1 and "not found" in err
