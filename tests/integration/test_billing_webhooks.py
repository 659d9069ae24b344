"""POST /webhooks/stripe over real HTTP: signatures checked by the `stripe` library, one effect
per Stripe event id, payment failures flag the tenant, a deleted subscription suspends it (by
policy), meter error reports become events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from services.billing.hours import identifier
from services.domain.billing_ledger import BillingProjection
from services.infra.eventlog import EventLog
from services.infra.projections import ProjectionRunner
from tests.doubles.stripe_server import sign, snapshot_event, thin_event
from tests.integration.test_billing_stripe import (
    WEBHOOK_SECRET,
    BillingRig,
    hours_ago,
    usage,
)
from tests.integration.test_billing_stripe import (
    rig as rig,
)


@pytest.fixture
async def hook(rig: BillingRig) -> AsyncIterator[Hook]:
    await rig.start()
    async with aiohttp.ClientSession() as session:
        yield Hook(rig, session, rig.urls[-1] + "/webhooks/stripe")


class Hook:
    def __init__(self, rig: BillingRig, session: aiohttp.ClientSession, url: str) -> None:
        self.rig = rig
        self.session = session
        self.url = url

    async def post(self, body: bytes, *, secret: str = WEBHOOK_SECRET,
                   timestamp: int | None = None, signature: str | None = None,
                   url: str | None = None) -> tuple[int, Any]:
        header = signature if signature is not None else sign(body, secret, timestamp)
        async with self.session.post(url or self.url, data=body, headers={
                "Stripe-Signature": header, "Content-Type": "application/json"}) as r:
            return r.status, await r.json()

    async def billing_events(self, type_: str) -> list[dict[str, Any]]:
        rows = await self.rig.pool.fetch(
            "SELECT data FROM billing_events WHERE type = $1 ORDER BY occurred_at", type_)
        return [r["data"] for r in rows]


def invoice(customer: str, invoice_id: str = "in_1", amount: int = 4200) -> dict[str, Any]:
    return {"id": invoice_id, "object": "invoice", "customer": customer, "amount_paid": amount,
            "amount_due": amount, "currency": "usd", "status": "paid",
            "parent": {"type": "subscription_details",
                       "subscription_details": {"subscription": "sub_x", "metadata": {}}}}


async def test_signatures_good_bad_old_missing(hook: Hook) -> None:
    tenant = await hook.rig.tenant("acme")
    customer = (await hook.rig.pool.fetchval(
        "SELECT customer_id FROM billing_accounts WHERE tenant_id = $1", tenant))
    body = snapshot_event("evt_sig", "invoice.paid", invoice(customer))

    assert (await hook.post(body, secret="whsec_someone_else"))[0] == 400
    old = int(time.time()) - 301  # past the 300 s tolerance
    status, answer = await hook.post(body, timestamp=old)
    assert status == 400
    assert answer["error"]["code"] == "invalid_signature"
    assert (await hook.post(body, signature=""))[0] == 400
    tampered = body.replace(b"4200", b"1")
    assert (await hook.post(tampered, signature=sign(body, WEBHOOK_SECRET)))[0] == 400
    assert await hook.billing_events("billing.invoice_paid") == []
    assert await hook.rig.pool.fetchval("SELECT count(*) FROM stripe_webhook_events") == 0

    status, answer = await hook.post(body, timestamp=int(time.time()) - 290)
    assert (status, answer) == (200, {"received": True, "outcome": "recorded"})
    [paid] = await hook.billing_events("billing.invoice_paid")
    assert (paid["tenant_id"], paid["amount_paid"], paid["stripe_event_id"]) == (
        str(tenant), 4200, "evt_sig")


async def test_a_duplicate_delivery_has_one_effect(hook: Hook) -> None:
    tenant = await hook.rig.tenant("acme")
    customer = await hook.rig.pool.fetchval(
        "SELECT customer_id FROM billing_accounts WHERE tenant_id = $1", tenant)
    body = snapshot_event("evt_dup", "invoice.payment_failed", invoice(customer, "in_9"))
    first = await hook.post(body)
    again = await hook.post(body)
    together = await asyncio.gather(*(hook.post(snapshot_event(
        "evt_twice", "invoice.payment_failed", invoice(customer, "in_10"))) for _ in range(5)))
    assert first == (200, {"received": True, "outcome": "recorded"})
    assert again == (200, {"received": True, "outcome": "duplicate"})
    assert sorted(a["outcome"] for _, a in together) == ["duplicate"] * 4 + ["recorded"]
    failed = await hook.billing_events("billing.payment_failed")
    assert [f["invoice_id"] for f in failed] == ["in_9", "in_10"]
    assert await hook.rig.pool.fetchval(
        "SELECT count(*) FROM events WHERE type = 'billing.payment_failed'") == 2
    # The feed keeps what Stripe knows each event by, as the reference's table has it.
    rows = await hook.rig.pool.fetch(
        "SELECT type, stripe_id FROM billing_events WHERE tenant_id = $1", tenant)
    assert sorted((r["type"], r["stripe_id"]) for r in rows) == [
        ("billing.customer_linked", customer), ("billing.payment_failed", "evt_dup"),
        ("billing.payment_failed", "evt_twice")]


async def test_payment_failed_flags_paid_clears_and_tenant_stays_active(hook: Hook) -> None:
    tenant = await hook.rig.tenant("acme")
    customer = await hook.rig.pool.fetchval(
        "SELECT customer_id FROM billing_accounts WHERE tenant_id = $1", tenant)
    await hook.post(snapshot_event("evt_a", "invoice.payment_action_required",
                                   invoice(customer, "in_1")))
    account = await hook.rig.pool.fetchrow(
        "SELECT * FROM billing_accounts WHERE tenant_id = $1", tenant)
    assert account["payment_status"] == "action_required"
    assert account["payment_flagged_at"] is not None
    await hook.post(snapshot_event("evt_b", "invoice.payment_failed", invoice(customer, "in_1")))
    assert await hook.rig.pool.fetchval(
        "SELECT payment_status FROM billing_accounts WHERE tenant_id = $1", tenant) == "failed"
    assert await hook.rig.pool.fetchval("SELECT status FROM tenants WHERE id = $1",
                                        tenant) == "active"  # the default policy: flag
    await hook.post(snapshot_event("evt_c", "invoice.paid", invoice(customer, "in_1")))
    account = await hook.rig.pool.fetchrow(
        "SELECT * FROM billing_accounts WHERE tenant_id = $1", tenant)
    assert (account["payment_status"], account["payment_flagged_at"]) == ("ok", None)


async def test_payment_standing_follows_stripes_time_per_invoice(hook: Hook) -> None:
    """Stripe retries a delivery for days and does not keep order: an old payment_failed may
    come after the invoice was paid, and another invoice's payment says nothing of this one."""
    tenant = await hook.rig.tenant("acme")
    customer = await hook.rig.pool.fetchval(
        "SELECT customer_id FROM billing_accounts WHERE tenant_id = $1", tenant)
    t0 = int(time.time()) - 3600

    async def deliver(event_id: str, type_: str, invoice_id: str, at: int) -> None:
        status, answer = await hook.post(snapshot_event(
            event_id, type_, invoice(customer, invoice_id), created=t0 + at))
        assert (status, answer["outcome"]) == (200, "recorded")

    async def standing() -> tuple[str, Any, str]:
        row = await hook.rig.pool.fetchrow(
            """SELECT payment_status, payment_flagged_at, last_invoice_id FROM billing_accounts
               WHERE tenant_id = $1""", tenant)
        return row["payment_status"], row["payment_flagged_at"], row["last_invoice_id"]

    await deliver("evt_f1", "invoice.payment_failed", "in_A", 10)
    await deliver("evt_p1", "invoice.paid", "in_A", 20)
    await deliver("evt_f0", "invoice.payment_failed", "in_A", 5)  # an old one, retried late
    assert await standing() == ("ok", None, "in_A")

    await deliver("evt_f2", "invoice.payment_failed", "in_B", 30)
    await deliver("evt_p2", "invoice.paid", "in_C", 40)  # another invoice paid: B still owed
    status, flagged_at, last = await standing()
    assert (status, last) == ("failed", "in_C")
    assert flagged_at == datetime.fromtimestamp(t0 + 30, UTC)
    await deliver("evt_a2", "invoice.payment_action_required", "in_B", 50)
    await deliver("evt_f3", "invoice.payment_failed", "in_B", 45)  # older than the last word
    assert (await standing())[0] == "action_required"
    # The events carry Stripe's time, so the feed reads in Stripe's order.
    failed = await hook.billing_events("billing.payment_failed")
    assert [f["stripe_event_id"] for f in failed] == ["evt_f0", "evt_f1", "evt_f2", "evt_f3",
                                                      "evt_a2"]
    await deliver("evt_p3", "invoice.paid", "in_B", 60)
    assert await standing() == ("ok", None, "in_B")

    # A rebuild from the log gives the same standing.
    before = await hook.rig.pool.fetch("SELECT * FROM billing_accounts ORDER BY tenant_id")
    await ProjectionRunner(EventLog(hook.rig.pool), BillingProjection()).rebuild()
    assert await hook.rig.pool.fetch(
        "SELECT * FROM billing_accounts ORDER BY tenant_id") == before


async def test_a_deleted_subscription_suspends_the_tenant(hook: Hook) -> None:
    tenant = await hook.rig.tenant("acme")
    account = await hook.rig.pool.fetchrow(
        "SELECT customer_id, subscription_id FROM billing_accounts WHERE tenant_id = $1", tenant)
    sub = {"id": account["subscription_id"], "object": "subscription",
           "customer": account["customer_id"], "status": "past_due", "metadata": {}}
    await hook.post(snapshot_event("evt_u", "customer.subscription.updated", sub))
    assert await hook.rig.pool.fetchval(
        "SELECT subscription_status FROM billing_accounts WHERE tenant_id = $1",
        tenant) == "past_due"
    body = snapshot_event("evt_d", "customer.subscription.deleted", {**sub, "status": "canceled"})
    assert (await hook.post(body))[0] == 200
    assert (await hook.post(body))[1]["outcome"] == "duplicate"
    row = await hook.rig.pool.fetchrow("SELECT status, status_reason FROM tenants WHERE id = $1",
                                       tenant)
    assert row["status"] == "suspended"
    assert account["subscription_id"] in row["status_reason"]
    suspended = await hook.rig.pool.fetch(
        "SELECT metadata FROM events WHERE type = 'tenant.suspended'")
    assert len(suspended) == 1  # once, though Stripe delivered twice
    assert suspended[0]["metadata"]["actor"] == "stripe-webhook"
    assert await hook.rig.pool.fetchval(
        "SELECT subscription_status FROM billing_accounts WHERE tenant_id = $1",
        tenant) == "canceled"


async def test_an_old_subscription_ending_changes_nothing(hook: Hook) -> None:
    tenant = await hook.rig.tenant("acme")
    account = await hook.rig.pool.fetchrow(
        "SELECT customer_id, subscription_id FROM billing_accounts WHERE tenant_id = $1", tenant)
    current = account["subscription_id"]

    async def state() -> tuple[str, str, str]:
        row = await hook.rig.pool.fetchrow(
            """SELECT t.status, a.subscription_id, a.subscription_status FROM tenants t
               JOIN billing_accounts a ON a.tenant_id = t.id WHERE t.id = $1""", tenant)
        return row["status"], row["subscription_id"], row["subscription_status"]

    # A subscription of the same customer that the tenant is not billed through ends.
    old = {"id": "sub_old", "object": "subscription", "customer": account["customer_id"],
           "status": "canceled", "metadata": {}}
    assert (await hook.post(snapshot_event("evt_old", "customer.subscription.deleted", old))
            )[1]["outcome"] == "recorded"
    assert await state() == ("active", current, "active")
    assert [e["subscription_id"] for e in
            await hook.billing_events("billing.subscription_changed")] == ["sub_old"]

    # The current one ends: suspended. Linked again: a new subscription; a late, second
    # notice about the ended one neither replaces it nor suspends again.
    ended = {**old, "id": current}
    hook.rig.stripe.state.cancel_subscription(current)
    await hook.post(snapshot_event("evt_cur", "customer.subscription.deleted", ended))
    assert await state() == ("suspended", current, "canceled")
    await hook.rig.catalog.reactivate_tenant(tenant)
    await hook.rig.link(tenant)
    status, renewed, renewed_status = await state()
    assert (status, renewed_status) == ("active", "active") and renewed != current
    await hook.post(snapshot_event("evt_late", "customer.subscription.updated", ended))
    await hook.post(snapshot_event("evt_late2", "customer.subscription.deleted", ended))
    assert await state() == ("active", renewed, "active")


async def test_flag_policy_keeps_the_tenant_active(rig: BillingRig) -> None:
    await rig.start(subscription_deleted_policy="flag")
    tenant = await rig.tenant("acme")
    account = await rig.pool.fetchrow(
        "SELECT customer_id, subscription_id FROM billing_accounts WHERE tenant_id = $1", tenant)
    async with aiohttp.ClientSession() as session:
        h = Hook(rig, session, rig.urls[-1] + "/webhooks/stripe")
        await h.post(snapshot_event("evt_d", "customer.subscription.deleted", {
            "id": account["subscription_id"], "object": "subscription",
            "customer": account["customer_id"], "status": "canceled"}))
    assert await rig.pool.fetchval("SELECT status FROM tenants WHERE id = $1",
                                   tenant) == "active"


async def test_meter_error_reports_are_recorded_with_their_details(hook: Hook) -> None:
    tenant = await hook.rig.tenant("acme")
    await hook.rig.record([usage(tenant, hours_ago(1), 5, 5)])
    await hook.rig.all_exported()
    ours = identifier(tenant, "input_tokens", hours_ago(1))
    hook.rig.stripe.state.v2_events["evt_mer"] = {
        "id": "evt_mer", "object": "v2.core.event",
        "type": "v1.billing.meter.error_report_triggered", "created": "2026-01-01T00:00:00Z",
        "livemode": False, "related_object": {"id": "mtr_in", "type": "billing.meter",
                                              "url": "/v1/billing/meters/mtr_in"},
        "data": {"developer_message_summary": "1 invalid meter event",
                 "validation_start": "2026-01-01T00:00:00Z",
                 "validation_end": "2026-01-01T01:00:00Z",
                 "reason": {"error_count": 1, "error_types": [{
                     "code": "meter_event_customer_not_found", "error_count": 1,
                     "sample_errors": [{"error_message": "no such customer",
                                        "request": {"identifier": ours}}]}]}}}
    body = thin_event("evt_mer", "v1.billing.meter.error_report_triggered",
                      {"id": "mtr_in", "type": "billing.meter",
                       "url": "/v1/billing/meters/mtr_in"})
    assert (await hook.post(body, secret="whsec_wrong"))[0] == 400
    assert (await hook.post(body))[1]["outcome"] == "recorded"
    assert (await hook.post(body))[1]["outcome"] == "duplicate"
    [report] = await hook.billing_events("billing.meter_error_reported")
    assert report["meter_id"] == "mtr_in"
    assert report["error_counts"] == {"meter_event_customer_not_found": 1}
    assert report["sample_identifiers"] == [ours]
    assert await hook.rig.pool.fetchval(
        "SELECT stripe_error FROM meter_exports WHERE identifier = $1",
        ours) == "meter_event_customer_not_found"


async def test_no_meter_found_is_recorded_as_a_meter_error(hook: Hook) -> None:
    tenant = await hook.rig.tenant("acme")
    await hook.rig.record([usage(tenant, hours_ago(1), 5, 5)])
    await hook.rig.all_exported()
    ours = [identifier(tenant, m, hours_ago(1)) for m in ("input_tokens", "output_tokens")]
    hook.rig.stripe.state.v2_events["evt_nmf"] = {
        "id": "evt_nmf", "object": "v2.core.event", "type": "v1.billing.meter.no_meter_found",
        "created": "2026-01-01T02:00:00.000Z", "livemode": False,
        "data": {"developer_message_summary": "2 meter events name no meter",
                 "validation_start": "2026-01-01T00:00:00Z",
                 "validation_end": "2026-01-01T01:00:00Z",
                 "reason": {"error_count": 2, "error_types": [{
                     "code": "no_meter", "error_count": 2,
                     "sample_errors": [{"error_message": "no meter", "request": {"identifier": i}}
                                       for i in ours]}]}}}
    body = json.dumps({"id": "evt_nmf", "object": "v2.core.event",
                       "type": "v1.billing.meter.no_meter_found",
                       "created": "2026-01-01T02:00:00.000Z", "livemode": False}).encode()
    assert (await hook.post(body, secret="whsec_wrong"))[0] == 400
    assert (await hook.post(body))[1]["outcome"] == "recorded"
    assert (await hook.post(body))[1]["outcome"] == "duplicate"
    [report] = await hook.billing_events("billing.meter_error_reported")
    assert (report["meter_id"], report["error_counts"]) == ("none", {"no_meter": 2})
    assert sorted(report["sample_identifiers"]) == sorted(ours)
    assert await hook.rig.pool.fetchval(
        "SELECT count(*) FROM meter_exports WHERE stripe_error = 'no_meter'") == 2


async def test_unknown_customers_and_types_are_acknowledged_not_recorded(hook: Hook) -> None:
    status, answer = await hook.post(snapshot_event("evt_x", "invoice.paid",
                                                    invoice("cus_nobody")))
    assert (status, answer["outcome"]) == (200, "unknown_customer")
    status, answer = await hook.post(snapshot_event("evt_y", "charge.succeeded",
                                                    {"id": "ch_1", "object": "charge"}))
    assert (status, answer["outcome"]) == (200, "ignored")
    assert await hook.rig.pool.fetchval("SELECT count(*) FROM billing_events") == 0
    status, answer = await hook.post(b"not json")
    assert status == 400
    status, _ = await hook.post(json.dumps({"object": "event"}).encode())
    assert status == 400


async def test_webhooks_answer_503_without_a_secret(rig: BillingRig) -> None:
    from tests.integration.test_billing_stripe import Secret

    await rig.start(stripe_webhook_secret=Secret(""))
    async with aiohttp.ClientSession() as session:
        body = snapshot_event(f"evt_{uuid.uuid4().hex}", "invoice.paid", invoice("cus_1"))
        h = Hook(rig, session, rig.urls[-1] + "/webhooks/stripe")
        status, answer = await h.post(body)
    assert status == 503
    assert "STRIPE_WEBHOOK_SECRET" in answer["error"]["message"]
