"""Linking a tenant to a Stripe customer from the admin API and the CLI: once, whatever
happens (repeats, concurrent calls, a customer Stripe made before a crash), and a clear 503
where Stripe is not configured."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import msgspec
import nats
import pytest
from aiohttp import web

from schemas.commands import SettleOutcome, SettleResult
from schemas.events import (
    StripeCustomerLinked,
    SubscriptionChanged,
    UsageExported,
    UsageExportFailed,
    UsageExportHeld,
    UsageExportPlanned,
)
from schemas.subjects import BILLING_SETTLE
from services.billing.app import SETTLE_DESK, create_billing_app
from services.billing.hours import floor_hour, identifier
from services.billing.settings import BillingSettings
from services.billing.settle import SettleDesk
from services.domain.billing_ledger import record_billing_events
from services.domain.catalog import Catalog
from services.domain.catalog.projections import TenantsProjection
from services.infra.bus import Bus
from services.infra.eventlog import EventLog
from services.infra.natsauth.identities import Role
from services.infra.projections import ProjectionRunner
from services.infra.settings import Secret
from tests.conftest import Servers
from tests.doubles.stripe_server import StripeServer, running_stripe
from tests.helpers import eventually
from tests.integration.test_admin_api import TOKEN, Admin, assert_error, running_admin
from tests.integration.test_cli_admin import Cli, base_env

PRICES = {"stripe_price_input_tokens": "price_in_tokens",
          "stripe_price_output_tokens": "price_out_tokens"}


@pytest.fixture
async def stripe_server() -> AsyncIterator[StripeServer]:
    async with running_stripe() as server:
        yield server


@pytest.fixture
async def admin(servers: Servers, database_url: str, nats_url: str, redis_url: str,
                stripe_server: StripeServer) -> AsyncIterator[Admin]:
    async with running_admin(database_url, nats_url, redis_url,
                             creds=servers.creds(Role.ADMIN_API),
                             stripe_secret_key=Secret(stripe_server.api_key),
                             stripe_api_base=stripe_server.url, stripe_timeout=2.0,
                             **PRICES) as running:
        yield running


@pytest.fixture
async def billing(servers: Servers, stripe_server: StripeServer,
                  bus: Bus) -> AsyncIterator[SettleDesk]:
    """A billing service pushing to the Stripe double (`bus`: the platform's streams exist):
    its pusher leader settles held exports on the admin API's command."""
    async with running_billing(servers, stripe_server) as desk:
        yield desk


@contextlib.asynccontextmanager
async def running_billing(servers: Servers,
                          stripe_server: StripeServer) -> AsyncIterator[SettleDesk]:
    app = create_billing_app(BillingSettings(
        database_url=Secret(servers.database_url), nats_url=Secret(servers.nats_url),
        nats_creds=Secret(servers.creds(Role.BILLING)), log_json=False,
        event_poll_interval=0.2, db_min_connections=1,
        stripe_secret_key=Secret(stripe_server.api_key), stripe_api_base=stripe_server.url,
        stripe_timeout=2.0, billing_push_interval=0.2, billing_leader_retry=0.2))
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    try:
        desk = app[SETTLE_DESK]

        async def listening() -> bool:
            return desk.listening

        # A slow machine takes a while to elect; nothing is settled before.
        await eventually(listening, timeout=30, what="billing's leader hears settle commands")
        yield desk
    finally:
        await runner.cleanup()


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
    assert shown["totals"] == {"exported": 0, "planned": 0, "failed": 0, "skipped": 0,
                               "held": 0}
    assert [e["type"] for e in shown["events"]] == ["billing.customer_linked"]

    # The reference's columns: the tenant's Stripe customer, and each billing event's Stripe id.
    assert (await admin.ok("GET", f"/tenants/{tenant}"))["stripe_customer_id"] == \
        first["customer_id"]
    assert await pool.fetchval("SELECT stripe_id FROM billing_events WHERE tenant_id = $1",
                               uuid.UUID(tenant)) == first["customer_id"]
    # Rebuilt from the log, the tenants projection still has it.
    await ProjectionRunner(EventLog(pool), TenantsProjection()).rebuild()
    assert await pool.fetchval("SELECT stripe_customer_id FROM tenants WHERE id = $1",
                               uuid.UUID(tenant)) == first["customer_id"]
    assert (await admin.ok("GET", "/tenants/" + str(
        (await admin.ok("POST", "/tenants", {"name": "Unlinked"}, status=201))["id"])
    ))["stripe_customer_id"] is None


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


async def test_admin_without_stripe_answers_503(servers: Servers, database_url: str, nats_url: str,
                                                redis_url: str, pool: asyncpg.Pool) -> None:
    tenant = await Catalog(EventLog(pool)).create_tenant("Epsilon")
    async with running_admin(database_url, nats_url, redis_url,
                             creds=servers.creds(Role.ADMIN_API)) as admin:
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


# --------------------------------------------------------------------------- held exports

EVENT_NAMES = {"input_tokens": "crosslogic_input_tokens",
               "output_tokens": "crosslogic_output_tokens"}


async def held_export(pool: asyncpg.Pool, stripe_server: StripeServer, tenant: uuid.UUID, *,
                      meter: str = "input_tokens", value: int = 1234,
                      customer: str | None = None) -> str:
    """A meter export as the pusher leaves it once held: planned 30 hours ago, an attempt that
    may have reached Stripe (a 500), then held (the events it records, in its order)."""
    if customer is None:
        customer = stripe_server.state.add_customer(str(tenant))
    hour = floor_hour(datetime.now(UTC) - timedelta(hours=31))
    ident = identifier(tenant, meter, hour)
    planned_at = datetime.now(UTC) - timedelta(hours=30)
    async with pool.acquire() as conn, conn.transaction():
        await record_billing_events(conn, [
            StripeCustomerLinked(tenant_id=tenant, customer_id=customer),
            UsageExportPlanned(tenant_id=tenant, meter=meter, event_name=EVENT_NAMES[meter],
                               hour=hour, value=value, identifier=ident, sequence=0,
                               customer_id=customer, occurred_at=planned_at)],
            actor="billing-pusher")
    async with pool.acquire() as conn, conn.transaction():
        await record_billing_events(conn, [UsageExportFailed(
            tenant_id=tenant, meter=meter, hour=hour, identifier=ident,
            error="500 An unknown error occurred.", retryable=True, value=value,
            ambiguous=True)], actor="billing-pusher")
    async with pool.acquire() as conn, conn.transaction():
        await record_billing_events(conn, [UsageExportHeld(
            tenant_id=tenant, meter=meter, hour=hour, identifier=ident, value=value,
            planned_at=planned_at, reason="planned 30.0 h ago and an earlier attempt may "
                                          "have reached Stripe")], actor="billing-pusher")
    return ident


def settle(ident: str, action: str = "resend") -> dict[str, str]:
    return {"identifier": ident, "action": action}


async def test_a_held_export_is_shown_listed_and_resent_once(
        admin: Admin, billing: SettleDesk, stripe_server: StripeServer, pool: asyncpg.Pool) -> None:
    tenant = await Catalog(EventLog(pool)).create_tenant("Held")
    ident = await held_export(pool, stripe_server, tenant, value=1234)
    shown = await admin.ok("GET", f"/tenants/{tenant}/billing")
    assert shown["totals"]["held"] == 1234 and shown["totals"]["exported"] == 0
    [listed] = (await admin.ok("GET", "/billing/exports"))["data"]
    assert (listed["tenant_id"], listed["identifier"], listed["status"], listed["value"]) == (
        str(tenant), ident, "held", 1234)
    assert (await admin.ok("GET", "/billing/exports", params={"status": "planned"}))[
        "data"] == []

    sent_from = int(time.time())
    answer = await admin.ok("POST", f"/tenants/{tenant}/billing/exports/settle",
                            settle(ident, "resend"))
    assert answer["action"] == "resend" and answer["stripe"] == "sent"
    assert (answer["export"]["status"], answer["export"]["duplicate"]) == ("exported", False)
    event = stripe_server.state.meter_events[ident]
    assert event["payload"] == {"stripe_customer_id": listed["customer_id"], "value": "1234"}
    assert event["event_name"] == "crosslogic_input_tokens"
    assert event["timestamp"] >= sent_from  # stamped when sent: the hour's invoice may be final

    [recorded] = await pool.fetch(
        "SELECT data, metadata FROM events WHERE type = 'billing.usage_exported'")
    held_id = await pool.fetchval("SELECT event_id FROM events WHERE type = 'billing.export_held'")
    assert (recorded["data"]["identifier"], recorded["data"]["duplicate"]) == (ident, False)
    metadata = recorded["metadata"]
    assert metadata["actor"] == "admin-api" and metadata["causation_id"] == str(held_id)
    assert metadata["correlation_id"]
    shown = await admin.ok("GET", f"/tenants/{tenant}/billing")
    assert (shown["totals"]["held"], shown["totals"]["exported"]) == (0, 1234)
    assert (await admin.ok("GET", "/billing/exports"))["data"] == []

    # Settled is settled: a second try (another operator, a retry) changes nothing.
    status, again = await admin.call("POST", f"/tenants/{tenant}/billing/exports/settle",
                                     settle(ident, "resend"))
    assert status == 409 and again["error"]["code"] == "export_not_held"
    assert [c.outcome for c in stripe_server.state.calls if c.identifier == ident] == [
        "accepted"]


async def test_concurrent_settles_send_once(
        admin: Admin, billing: SettleDesk, stripe_server: StripeServer, pool: asyncpg.Pool) -> None:
    tenant = await Catalog(EventLog(pool)).create_tenant("Twice")
    ident = await held_export(pool, stripe_server, tenant)
    answers = await asyncio.gather(*(admin.call(
        "POST", f"/tenants/{tenant}/billing/exports/settle", settle(ident)) for _ in range(3)))
    assert sorted(status for status, _ in answers) == [200, 409, 409]
    assert len([c for c in stripe_server.state.calls if c.identifier == ident]) == 1
    assert await pool.fetchval(
        "SELECT count(*) FROM events WHERE type = 'billing.usage_exported'") == 1


async def test_an_export_stripe_has_is_marked_exported_without_sending(
        admin: Admin, billing: SettleDesk, stripe_server: StripeServer, pool: asyncpg.Pool) -> None:
    tenant = await Catalog(EventLog(pool)).create_tenant("Had")
    customer = stripe_server.state.add_customer(str(tenant))
    inputs = await held_export(pool, stripe_server, tenant, customer=customer, value=10)
    outputs = await held_export(pool, stripe_server, tenant, customer=customer,
                                meter="output_tokens", value=20)
    calls = len(stripe_server.state.calls)
    answer = await admin.ok("POST", f"/tenants/{tenant}/billing/exports/settle",
                            settle(inputs, "mark_exported"))
    assert answer["stripe"] is None
    assert (answer["export"]["status"], answer["export"]["duplicate"]) == ("exported", True)
    assert len(stripe_server.state.calls) == calls  # Stripe was not called

    # A resend of one Stripe still has (the earlier attempt did arrive) is counted once.
    stripe_server.state.meter_events[outputs] = {
        "event_name": "crosslogic_output_tokens", "identifier": outputs,
        "payload": {"stripe_customer_id": customer, "value": "20"}}
    answer = await admin.ok("POST", f"/tenants/{tenant}/billing/exports/settle",
                            settle(outputs, "resend"))
    assert answer["stripe"] == "duplicate" and answer["export"]["duplicate"] is True
    assert [c.outcome for c in stripe_server.state.calls][calls:] == ["duplicate"]
    assert stripe_server.state.total("crosslogic_output_tokens") == 20
    shown = await admin.ok("GET", f"/tenants/{tenant}/billing")
    assert (shown["totals"]["held"], shown["totals"]["exported"]) == (0, 30)


async def test_a_resend_stripe_fails_keeps_it_held_and_one_it_refuses_fails_it(
        admin: Admin, billing: SettleDesk, stripe_server: StripeServer, pool: asyncpg.Pool) -> None:
    tenant = await Catalog(EventLog(pool)).create_tenant("Flaky")
    ident = await held_export(pool, stripe_server, tenant)
    path = f"/tenants/{tenant}/billing/exports/settle"
    stripe_server.state.fail("/v1/billing/meter_events", "status", status=500)
    status, answer = await admin.call("POST", path, settle(ident))
    assert status == 503 and answer["error"]["code"] == "stripe_unavailable"
    assert "may have counted it" in answer["error"]["message"]  # a 500: look again first
    assert await pool.fetchval("SELECT status FROM meter_exports WHERE identifier = $1",
                               ident) == "held"
    failures = await pool.fetch(
        "SELECT data, metadata FROM events WHERE type = 'billing.export_failed' "
        "AND metadata->>'actor' = 'admin-api'")
    assert len(failures) == 1
    assert failures[0]["data"]["ambiguous"] is True and failures[0]["data"]["retryable"]

    stripe_server.state.fail("/v1/billing/meter_events", "status", status=400)
    status, answer = await admin.call("POST", path, settle(ident))
    assert status == 502 and answer["error"]["code"] == "stripe_refused"
    assert await pool.fetchval("SELECT status FROM meter_exports WHERE identifier = $1",
                               ident) == "failed"
    assert stripe_server.state.meter_events == {}


async def test_settle_refuses_bad_requests(
        admin: Admin, billing: SettleDesk, stripe_server: StripeServer, pool: asyncpg.Pool) -> None:
    tenant = await Catalog(EventLog(pool)).create_tenant("Strict")
    other = await Catalog(EventLog(pool)).create_tenant("Other")
    ident = await held_export(pool, stripe_server, tenant)
    path = f"/tenants/{tenant}/billing/exports/settle"
    for body, param in (({"identifier": ident, "action": "refund"}, "action"),
                        ({"action": "resend"}, "identifier"),
                        ({"identifier": "", "action": "resend"}, "identifier"),
                        ({"identifier": "x" * 101, "action": "resend"}, "identifier"),
                        ({**settle(ident), "force": True}, "force")):
        status, answer = await admin.call("POST", path, body)
        assert status == 400, (body, answer)
        assert_error(answer, "invalid_request_error", param)
    assert (await admin.call("POST", path, settle(ident), token="wrong"))[0] == 401
    assert (await admin.call("POST", path, settle(ident), token=None))[0] == 401
    assert (await admin.call("GET", "/billing/exports", token="wrong"))[0] == 401
    status, answer = await admin.call(
        "POST", f"/tenants/{uuid.uuid4()}/billing/exports/settle", settle(ident))
    assert status == 404 and "tenant" in answer["error"]["message"].lower()
    status, answer = await admin.call("POST", path, settle(f"{tenant}:input_tokens:2020-01-01T00"))
    assert status == 404 and "meter export" in answer["error"]["message"].lower()
    # Another tenant's export is not found through this one.
    status, _ = await admin.call("POST", f"/tenants/{other}/billing/exports/settle",
                                 settle(ident, "mark_exported"))
    assert status == 404
    for params, param in (({"status": "exported"}, "status"), ({"limit": "0"}, "limit"),
                          ({"limit": "many"}, "limit"), ({"tenant": str(tenant)}, "tenant")):
        status, answer = await admin.call("GET", "/billing/exports", params=params)
        assert status == 400, (params, answer)
        assert_error(answer, "invalid_request_error", param)
    # Nothing above changed it.
    assert await pool.fetchval("SELECT status FROM meter_exports WHERE identifier = $1",
                               ident) == "held"
    assert stripe_server.state.calls == []


async def test_only_held_exports_are_settled(
        admin: Admin, billing: SettleDesk, stripe_server: StripeServer, pool: asyncpg.Pool) -> None:
    tenant = await Catalog(EventLog(pool)).create_tenant("Planned")
    customer = stripe_server.state.add_customer(str(tenant))
    hour = floor_hour(datetime.now(UTC) - timedelta(hours=2))
    ident = identifier(tenant, "input_tokens", hour)
    async with pool.acquire() as conn, conn.transaction():
        await record_billing_events(conn, [
            StripeCustomerLinked(tenant_id=tenant, customer_id=customer),
            UsageExportPlanned(tenant_id=tenant, meter="input_tokens",
                               event_name="crosslogic_input_tokens", hour=hour, value=5,
                               identifier=ident, sequence=0, customer_id=customer),
            UsageExported(tenant_id=tenant, meter="input_tokens", hour=hour, value=5,
                          identifier=ident, customer_id=customer)], actor="billing-pusher")
    status, answer = await admin.call("POST", f"/tenants/{tenant}/billing/exports/settle",
                                      settle(ident, "mark_exported"))
    assert status == 409 and "is exported, not held" in answer["error"]["message"]


async def test_without_a_billing_leader_nothing_is_settled(
        admin: Admin, stripe_server: StripeServer, servers: Servers, bus: Bus,
        pool: asyncpg.Pool) -> None:
    tenant = await Catalog(EventLog(pool)).create_tenant("NoBilling")
    ident = await held_export(pool, stripe_server, tenant)
    path = f"/tenants/{tenant}/billing/exports/settle"
    for action in ("resend", "mark_exported"):
        status, answer = await admin.call("POST", path, settle(ident, action))
        assert status == 503 and answer["error"]["code"] == "billing_unavailable", answer
    assert await pool.fetchval("SELECT status FROM meter_exports WHERE identifier = $1",
                               ident) == "held"
    # Billing's leader comes: the same command settles it, without Stripe for a marking.
    async with running_billing(servers, stripe_server):
        answer = await admin.ok("POST", path, settle(ident, "mark_exported"))
        assert answer["export"]["status"] == "exported"
    assert stripe_server.state.calls == []


async def test_billing_reads_settle_commands_as_untrusted(
        billing: SettleDesk, stripe_server: StripeServer, servers: Servers, bus: Bus,
        pool: asyncpg.Pool, tmp_path: Path) -> None:
    tenant = await Catalog(EventLog(pool)).create_tenant("Untrusted")
    ident = await held_export(pool, stripe_server, tenant)
    good = {"tenant_id": str(tenant), "identifier": ident, "action": "mark_exported"}
    for payload in (b"not json", b"{" + b" " * 5000 + b"}",
                    json.dumps({**good, "force": True}).encode(),
                    json.dumps({**good, "identifier": "x" * 101}).encode(),
                    json.dumps({**good, "action": "refund"}).encode(),
                    json.dumps({**good, "tenant_id": "acme"}).encode()):
        msg = await bus.nc.request(BILLING_SETTLE, payload, timeout=30)
        answer = msgspec.json.decode(msg.data, type=SettleOutcome)
        assert answer.result is SettleResult.BAD_COMMAND, (payload[:60], answer)
    # Another tenant's id does not reach this tenant's export.
    other = json.dumps({**good, "tenant_id": str(uuid.uuid4())}).encode()
    msg = await bus.nc.request(BILLING_SETTLE, other, timeout=30)
    assert msgspec.json.decode(msg.data, type=SettleOutcome).result is SettleResult.NOT_FOUND

    # Only the admin API's identity may send it: NATS refuses a gateway's.
    creds = tmp_path / "gateway.creds"
    creds.write_text(servers.creds(Role.GATEWAY))
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            refused.set()

    nc = await nats.connect(servers.nats_url, user_credentials=str(creds), error_cb=on_error)
    try:
        await nc.publish(BILLING_SETTLE, json.dumps(good).encode(), reply="_INBOX.gateway.x")
        await asyncio.wait_for(refused.wait(), timeout=30)
    finally:
        await nc.close()
    assert await pool.fetchval("SELECT status FROM meter_exports WHERE identifier = $1",
                               ident) == "held"
    assert stripe_server.state.calls == []


async def test_cli_lists_and_settles_held_exports(
        admin: Admin, billing: SettleDesk, stripe_server: StripeServer, tmp_path: Path,
        pool: asyncpg.Pool) -> None:
    tenant = await Catalog(EventLog(pool)).create_tenant("Cli")
    ident = await held_export(pool, stripe_server, tenant, value=777)
    cli = Cli({**base_env(tmp_path), "CROSSLOGIC_ADMIN_URL": admin.url,
               "CROSSLOGIC_ADMIN_TOKEN": TOKEN})
    shown = await cli.ok("billing", "show", str(tenant))
    assert "tokens held" in shown and "777" in shown and "billing settle" in shown
    listed = await cli.ok("billing", "exports")
    assert ident in listed and str(tenant) in listed and "held" in listed
    assert (await cli.ok("billing", "exports", "--status", "failed")).strip() == "(none)"
    code, _, err = await cli.run("billing", "settle", str(tenant), ident)
    assert code == 2 and "--resend" in err  # one of the two is required
    out = await cli.ok("billing", "settle", str(tenant), ident, "--exported")
    assert "marked exported" in out and "exported" in out
    assert stripe_server.state.calls == []
    code, _, err = await cli.run("billing", "settle", str(tenant), ident, "--resend")
    assert code == 1 and "not held" in err
