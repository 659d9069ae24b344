"""Stripe webhook events → platform events, by policy; Stripe errors → what to do (pure)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import stripe

from schemas.events import InvoicePaid, MeterErrorReported, PaymentFailed, SubscriptionChanged
from services.billing.stripe_events import (
    BadEvent,
    Kind,
    effects,
    is_current_subscription,
    parse,
)
from services.domain.stripe_billing import Failure, classify, may_have_reached

T = uuid.UUID("0193a1b2-0000-7000-8000-0000000000aa")


def event(type_: str, obj: dict[str, Any], event_id: str = "evt_1") -> dict[str, Any]:
    return {"id": event_id, "object": "event", "type": type_, "data": {"object": obj}}


INVOICE = {"id": "in_1", "object": "invoice", "customer": "cus_1", "amount_paid": 1250,
           "amount_due": 1250, "currency": "usd",
           "parent": {"type": "subscription_details", "subscription_details": {
               "subscription": "sub_1", "metadata": {"tenant_id": str(T)}}}}


def test_invoice_paid() -> None:
    notice = parse(event("invoice.paid", INVOICE))
    assert notice.kind is Kind.INVOICE_PAID
    assert (notice.customer_id, notice.invoice_id, notice.amount, notice.currency,
            notice.subscription_id, notice.tenant_hint) == ("cus_1", "in_1", 1250, "usd",
                                                            "sub_1", T)
    eff = effects(notice, T)
    assert eff.suspend_reason is None
    [paid] = eff.events
    assert isinstance(paid, InvoicePaid)
    assert (paid.tenant_id, paid.amount_paid, paid.stripe_event_id) == (T, 1250, "evt_1")


@pytest.mark.parametrize(("type_", "action"), [("invoice.payment_failed", False),
                                               ("invoice.payment_action_required", True)])
def test_payment_failed_flags_and_suspends_only_by_policy(type_: str, action: bool) -> None:
    notice = parse(event(type_, {**INVOICE, "amount_paid": 0, "customer": {"id": "cus_1"}}))
    assert notice.customer_id == "cus_1"  # an expanded customer is read too
    flagged = effects(notice, T)
    [failed] = flagged.events
    assert isinstance(failed, PaymentFailed)
    assert (failed.amount_due, failed.action_required) == (1250, action)
    assert flagged.suspend_reason is None
    suspended = effects(notice, T, payment_failed="suspend")
    assert suspended.suspend_reason and "in_1" in suspended.suspend_reason


def test_subscription_deleted_suspends_by_default() -> None:
    sub = {"id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "canceled",
           "metadata": {"tenant_id": str(T)}}
    notice = parse(event("customer.subscription.deleted", sub))
    eff = effects(notice, T)
    [changed] = eff.events
    assert isinstance(changed, SubscriptionChanged)
    assert (changed.subscription_id, changed.status) == ("sub_1", "canceled")
    assert eff.suspend_reason and "sub_1" in eff.suspend_reason
    assert effects(notice, T, subscription_deleted="flag").suspend_reason is None
    updated = effects(parse(event("customer.subscription.updated",
                                  {**sub, "status": "past_due"})), T)
    assert updated.suspend_reason is None
    assert isinstance(updated.events[0], SubscriptionChanged)
    assert updated.events[0].status == "past_due"


def test_platform_events_carry_stripes_time() -> None:
    body = {**event("invoice.payment_failed", INVOICE), "created": 1767225600}
    [failed] = effects(parse(body), T).events
    assert failed.occurred_at == datetime(2026, 1, 1, tzinfo=UTC)
    [changed] = effects(parse({**event("customer.subscription.updated", {
        "id": "sub_1", "customer": "cus_1", "status": "active"}), "created": 1767225600}),
        T).events
    assert changed.occurred_at == datetime(2026, 1, 1, tzinfo=UTC)
    [undated] = effects(parse(event("invoice.paid", INVOICE)), T).events
    assert abs((undated.occurred_at - datetime.now(UTC)).total_seconds()) < 60


def test_only_the_current_subscription_ending_suspends() -> None:
    old = {"id": "sub_old", "object": "subscription", "customer": "cus_1",
           "status": "canceled"}
    notice = parse(event("customer.subscription.deleted", old))
    eff = effects(notice, T, current_subscription="sub_new", current_status="active")
    [changed] = eff.events  # still recorded, for the feed
    assert isinstance(changed, SubscriptionChanged)
    assert eff.suspend_reason is None
    assert effects(notice, T, current_subscription="sub_old",
                   current_status="active").suspend_reason
    assert effects(notice, T).suspend_reason  # no subscription on the account: it speaks


@pytest.mark.parametrize(("current", "status", "incoming", "incoming_status", "expected"), [
    (None, None, "sub_1", "active", True),
    ("sub_1", "active", "sub_1", "canceled", True),
    ("sub_1", "active", "sub_0", "canceled", False),     # an old one's late deletion
    ("sub_1", "active", "sub_2", "active", False),       # another live one: not ours
    ("sub_1", "canceled", "sub_2", "active", True),      # a live one after an ended one
    ("sub_1", "canceled", "sub_0", "canceled", False),   # never an ended one for another
    ("sub_1", "incomplete_expired", "sub_2", "trialing", True),
])
def test_which_subscription_speaks_for_the_tenant(current: str | None, status: str | None,
                                                  incoming: str, incoming_status: str,
                                                  expected: bool) -> None:
    assert is_current_subscription(current, status, incoming, incoming_status) is expected


def test_events_of_unknown_tenants_or_types_record_nothing() -> None:
    assert effects(parse(event("invoice.paid", INVOICE)), None).events == []
    ignored = parse(event("charge.succeeded", {"id": "ch_1"}))
    assert ignored.kind is Kind.IGNORED
    assert effects(ignored, T).events == []
    with pytest.raises(BadEvent):
        parse({"type": "invoice.paid"})


def test_meter_error_report_with_its_fetched_details() -> None:
    thin = {"id": "evt_m", "object": "v2.core.event",
            "type": "v1.billing.meter.error_report_triggered",
            "related_object": {"id": "mtr_1", "type": "billing.meter",
                               "url": "/v1/billing/meters/mtr_1"}}
    fetched = {**thin, "data": {
        "developer_message_summary": "2 invalid events",
        "validation_start": "2026-01-01T00:00:00.000Z", "validation_end": 1767229200,
        "reason": {"error_count": 2, "error_types": [
            {"code": "meter_event_customer_not_found", "error_count": 2, "sample_errors": [
                {"error_message": "no such customer",
                 "request": {"identifier": f"{T}:input_tokens:2026-01-01T00"}}]}]}}}
    notice = parse(thin, fetched)
    [report] = effects(notice, None).events  # no tenant needed
    assert isinstance(report, MeterErrorReported)
    assert report.meter_id == "mtr_1"
    assert report.error_counts == {"meter_event_customer_not_found": 2}
    assert report.sample_identifiers == [f"{T}:input_tokens:2026-01-01T00"]
    assert report.validation_start == datetime(2026, 1, 1, tzinfo=UTC)
    assert report.validation_end == datetime.fromtimestamp(1767229200, UTC)
    # Without the details (Stripe unreachable) the report is still recorded.
    [bare] = effects(parse(thin), None).events
    assert isinstance(bare, MeterErrorReported)
    assert (bare.meter_id, bare.error_counts) == ("mtr_1", {})


def test_no_meter_found_is_a_meter_error_report() -> None:
    """What Stripe sends when meter events name no meter (a wrong STRIPE_METER_*_EVENT): a
    thin event without a related object; its fetched data has the usual error report."""
    thin = {"id": "evt_n", "object": "v2.core.event", "type": "v1.billing.meter.no_meter_found",
            "created": "2026-01-01T02:00:00.000Z", "livemode": False}
    fetched = {**thin, "data": {
        "developer_message_summary": "There is no meter for event crosslogic_input",
        "validation_start": "2026-01-01T00:00:00.000Z",
        "validation_end": "2026-01-01T01:00:00.000Z",
        "reason": {"error_count": 3, "error_types": [
            {"code": "no_meter", "error_count": 3, "sample_errors": [
                {"error_message": "no meter", "request": {"identifier": "a:input_tokens:x"}},
                {"error_message": "no meter", "request": {"identifier": "b:input_tokens:x"}}]}]}}}
    notice = parse(thin, fetched)
    assert notice.kind is Kind.NO_METER
    [report] = effects(notice, None).events
    assert isinstance(report, MeterErrorReported)
    assert (report.meter_id, report.error_counts) == ("none", {"no_meter": 3})
    assert report.sample_identifiers == ["a:input_tokens:x", "b:input_tokens:x"]
    assert report.summary.startswith("There is no meter")
    assert report.occurred_at == datetime(2026, 1, 1, 2, tzinfo=UTC)
    [bare] = effects(parse(thin), None).events  # not fetched: still recorded
    assert isinstance(bare, MeterErrorReported)
    assert (bare.meter_id, bare.stripe_event_id) == ("none", "evt_n")


def _error(cls: type[stripe.StripeError], status: int | None, code: str | None = None,
           message: str = "boom") -> stripe.StripeError:
    body = {"error": {"message": message, **({"code": code} if code else {})}}
    if cls is stripe.InvalidRequestError:
        return stripe.InvalidRequestError(message, None, code, json.dumps(body), status, body)
    return cls(message, json.dumps(body), status, body)  # type: ignore[call-arg]


@pytest.mark.parametrize(("error", "expected"), [
    (_error(stripe.RateLimitError, 429), Failure.RETRY),
    (_error(stripe.APIError, 500), Failure.RETRY),
    (_error(stripe.APIError, 503), Failure.RETRY),
    (_error(stripe.APIError, 409), Failure.RETRY),  # one call at a time per customer/meter
    (stripe.APIConnectionError("timed out"), Failure.RETRY),
    (_error(stripe.AuthenticationError, 401), Failure.RETRY),  # a setting to fix: keep it
    (_error(stripe.InvalidRequestError, 400, "duplicate_meter_event"), Failure.DUPLICATE),
    (_error(stripe.InvalidRequestError, 400, None,
            "An event already exists with identifier x:y:z"), Failure.DUPLICATE),
    (_error(stripe.InvalidRequestError, 400, "parameter_invalid"), Failure.PERMANENT),
    (_error(stripe.InvalidRequestError, 404, "resource_missing"), Failure.PERMANENT),
])
def test_stripe_errors_are_classified(error: stripe.StripeError, expected: Failure) -> None:
    assert classify(error) is expected


@pytest.mark.parametrize(("error", "reached"), [
    (stripe.APIConnectionError("timed out"), True),       # maybe after Stripe accepted
    (_error(stripe.APIError, 500), True),
    (_error(stripe.APIError, 503), True),
    (_error(stripe.RateLimitError, 429), False),          # refused before doing anything
    (_error(stripe.APIError, 409), False),
    (_error(stripe.AuthenticationError, 401), False),
    (_error(stripe.InvalidRequestError, 400, "parameter_invalid"), False),
])
def test_which_failures_may_have_reached_stripe(error: stripe.StripeError,
                                                 reached: bool) -> None:
    assert may_have_reached(error) is reached
