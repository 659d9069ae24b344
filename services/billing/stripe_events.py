"""Stripe webhook events → platform events. Pure: no I/O.

`parse` reads the parts of a Stripe event that matter (snapshot events of API v1, and the thin
`v1.billing.meter.error_report_triggered` and `v1.billing.meter.no_meter_found` of event
destinations, with their fetched body when there is one); `effects` decides what the platform
records and whether the tenant is suspended, by policy:

- invoice.paid → billing.invoice_paid (that invoice no longer flags the tenant)
- invoice.payment_failed → billing.payment_failed (the tenant is flagged); with
  PAYMENT_FAILED_POLICY=suspend (default: flag) the tenant is also suspended
- invoice.payment_action_required → billing.payment_failed, action_required (same policy)
- customer.subscription.updated → billing.subscription_changed
- customer.subscription.deleted → billing.subscription_changed; with
  SUBSCRIPTION_DELETED_POLICY=suspend (the default; or flag) the tenant is suspended — only
  when it is the tenant's current subscription (`is_current_subscription`): the end of an old
  one, replaced since, is recorded and changes nothing
- v1.billing.meter.error_report_triggered → billing.meter_error_reported
- v1.billing.meter.no_meter_found (meter events whose event_name matches no meter: all of
  them, when a STRIPE_METER_*_EVENT setting is wrong) → billing.meter_error_reported, meter
  `none`
- anything else: acknowledged, ignored
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from schemas.events import (
    Event,
    InvoicePaid,
    MeterErrorReported,
    PaymentFailed,
    SubscriptionChanged,
)
from services.domain.billing_ledger import ENDED_SUBSCRIPTION

PaymentFailedPolicy = Literal["flag", "suspend"]
SubscriptionDeletedPolicy = Literal["suspend", "flag"]

METER_ERROR_TYPE = "v1.billing.meter.error_report_triggered"
NO_METER_TYPE = "v1.billing.meter.no_meter_found"
THIN_TYPES = frozenset({METER_ERROR_TYPE, NO_METER_TYPE})
"""Thin events whose details are fetched (GET /v2/core/events/{id})."""
NO_METER_ID = "none"
"""The meter of a no_meter_found report: Stripe found none."""


class Kind(enum.Enum):
    INVOICE_PAID = "invoice.paid"
    PAYMENT_FAILED = "invoice.payment_failed"
    ACTION_REQUIRED = "invoice.payment_action_required"
    SUBSCRIPTION_UPDATED = "customer.subscription.updated"
    SUBSCRIPTION_DELETED = "customer.subscription.deleted"
    METER_ERROR = METER_ERROR_TYPE
    NO_METER = NO_METER_TYPE
    IGNORED = "ignored"


class BadEvent(ValueError):
    """The body is not a Stripe event we can read."""


@dataclass(frozen=True)
class Notice:
    kind: Kind
    stripe_event_id: str
    type: str
    customer_id: str | None = None
    tenant_hint: uuid.UUID | None = None
    """`metadata.tenant_id` of the object, when it carries one (we set it on everything we
    create); used when the customer is not linked here."""
    invoice_id: str = ""
    amount: int = 0
    currency: str = ""
    subscription_id: str = ""
    status: str = ""
    meter_id: str = ""
    summary: str = ""
    error_counts: dict[str, int] = field(default_factory=dict)
    sample_identifiers: list[str] = field(default_factory=list)
    validation_start: datetime | None = None
    validation_end: datetime | None = None
    created: datetime | None = None
    """When Stripe created the event: the platform events' `occurred_at`, which orders a
    tenant's invoice events however late Stripe delivers one."""


def _id_of(value: Any) -> str | None:
    """A Stripe reference: an id string, or an expanded object with an id."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def _tenant_hint(*metadatas: Any) -> uuid.UUID | None:
    for meta in metadatas:
        if isinstance(meta, Mapping) and isinstance(meta.get("tenant_id"), str):
            try:
                return uuid.UUID(meta["tenant_id"])
            except ValueError:
                continue
    return None


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _time(value: Any) -> datetime | None:
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def parse(body: Mapping[str, Any], fetched: Mapping[str, Any] | None = None) -> Notice:
    """Read a Stripe event. `fetched`: the full body of a thin event, when it was fetched."""
    event_id = body.get("id")
    type_ = body.get("type")
    if not isinstance(event_id, str) or not event_id or not isinstance(type_, str):
        raise BadEvent("not a Stripe event: `id` and `type` are required")
    if type_ in THIN_TYPES:
        return _meter_error(event_id, type_, body, fetched or {})
    created = _time(body.get("created"))
    obj = _get(body, "data", "object")
    if not isinstance(obj, Mapping):
        return Notice(Kind.IGNORED, event_id, type_)
    if type_ in (Kind.INVOICE_PAID.value, Kind.PAYMENT_FAILED.value,
                 Kind.ACTION_REQUIRED.value):
        # API 2025-03-31.basil moved the invoice's subscription under parent.
        details = _get(obj, "parent", "subscription_details")
        subscription = _id_of(obj.get("subscription")) or _id_of(_get(details, "subscription"))
        paid = type_ == Kind.INVOICE_PAID.value
        return Notice(Kind(type_), event_id, type_, customer_id=_id_of(obj.get("customer")),
                      tenant_hint=_tenant_hint(obj.get("metadata"), _get(details, "metadata")),
                      invoice_id=str(obj.get("id") or ""),
                      amount=_int(obj.get("amount_paid" if paid else "amount_due")),
                      currency=str(obj.get("currency") or ""),
                      subscription_id=subscription or "", created=created)
    if type_ in (Kind.SUBSCRIPTION_UPDATED.value, Kind.SUBSCRIPTION_DELETED.value):
        return Notice(Kind(type_), event_id, type_, customer_id=_id_of(obj.get("customer")),
                      tenant_hint=_tenant_hint(obj.get("metadata")),
                      subscription_id=str(obj.get("id") or ""),
                      status=str(obj.get("status") or ""), created=created)
    return Notice(Kind.IGNORED, event_id, type_)


def _meter_error(event_id: str, type_: str, body: Mapping[str, Any],
                 fetched: Mapping[str, Any]) -> Notice:
    meter_id = _id_of(body.get("related_object")) or _id_of(fetched.get("related_object"))
    if type_ == NO_METER_TYPE:
        meter_id = NO_METER_ID  # no related object: the events named no meter at all
    data = fetched.get("data") if isinstance(fetched.get("data"), Mapping) else body.get("data")
    counts: dict[str, int] = {}
    samples: list[str] = []
    error_types = _get(data, "reason", "error_types")
    for et in error_types if isinstance(error_types, list) else []:
        code = str(_get(et, "code") or "unknown")
        counts[code] = counts.get(code, 0) + _int(_get(et, "error_count"))
        for sample in _get(et, "sample_errors") or []:
            ident = _get(sample, "request", "identifier")
            if isinstance(ident, str) and ident:
                samples.append(ident)
    return Notice(Kind(type_), event_id, type_, meter_id=meter_id or "unknown",
                  summary=str(_get(data, "developer_message_summary") or ""),
                  error_counts=counts, sample_identifiers=samples,
                  validation_start=_time(_get(data, "validation_start")),
                  validation_end=_time(_get(data, "validation_end")),
                  created=_time(body.get("created")))


def is_current_subscription(current_id: str | None, current_status: str | None,
                            subscription_id: str, status: str) -> bool:
    """Whether news of `subscription_id` (now in `status`) is about the subscription the tenant
    is billed through: the one on its account; any, when the account has none; or a live one
    taking over from an ended one (made in Stripe's dashboard, say). Never an ended one in
    place of another: an old subscription's late `deleted` must not replace, nor suspend.
    billing_ledger applies the same rule to billing_accounts."""
    if not current_id or subscription_id == current_id:
        return True
    return current_status in ENDED_SUBSCRIPTION and status not in ENDED_SUBSCRIPTION


@dataclass(frozen=True)
class Effects:
    events: list[Event]
    suspend_reason: str | None = None
    """Suspend the tenant, with this reason (None: leave its status alone)."""


def effects(notice: Notice, tenant_id: uuid.UUID | None, *,
            payment_failed: PaymentFailedPolicy = "flag",
            subscription_deleted: SubscriptionDeletedPolicy = "suspend",
            current_subscription: str | None = None,
            current_status: str | None = None) -> Effects:
    """What the platform records for a Stripe event. Tenant events need the tenant (None:
    a customer we do not know; nothing is recorded). `current_subscription` and
    `current_status`: what the tenant's billing account holds."""
    eff = _effects(notice, tenant_id, payment_failed, subscription_deleted,
                   current_subscription, current_status)
    if notice.created is not None:
        # Stripe's time: it happened then, however late Stripe delivers it.
        for event in eff.events:
            event.occurred_at = notice.created
    return eff


def _effects(notice: Notice, tenant_id: uuid.UUID | None,
             payment_failed: PaymentFailedPolicy, subscription_deleted: SubscriptionDeletedPolicy,
             current_subscription: str | None, current_status: str | None) -> Effects:
    sid = notice.stripe_event_id
    if notice.kind in (Kind.METER_ERROR, Kind.NO_METER):
        return Effects([MeterErrorReported(
            meter_id=notice.meter_id, stripe_event_id=sid, summary=notice.summary,
            error_counts=dict(notice.error_counts),
            sample_identifiers=list(notice.sample_identifiers),
            validation_start=notice.validation_start, validation_end=notice.validation_end)])
    if notice.kind is Kind.IGNORED or tenant_id is None:
        return Effects([])
    if notice.kind is Kind.INVOICE_PAID:
        return Effects([InvoicePaid(tenant_id=tenant_id, invoice_id=notice.invoice_id,
                                    amount_paid=notice.amount, currency=notice.currency,
                                    stripe_event_id=sid)])
    if notice.kind in (Kind.PAYMENT_FAILED, Kind.ACTION_REQUIRED):
        action = notice.kind is Kind.ACTION_REQUIRED
        event = PaymentFailed(tenant_id=tenant_id, invoice_id=notice.invoice_id,
                              amount_due=notice.amount, currency=notice.currency,
                              stripe_event_id=sid, action_required=action)
        reason = (f"payment {'needs action' if action else 'failed'} on invoice "
                  f"{notice.invoice_id} (Stripe {sid})")
        return Effects([event], reason if payment_failed == "suspend" else None)
    status = notice.status or ("canceled" if notice.kind is Kind.SUBSCRIPTION_DELETED else "")
    changed = SubscriptionChanged(tenant_id=tenant_id, subscription_id=notice.subscription_id,
                                status=status, stripe_event_id=sid)
    current = is_current_subscription(current_subscription, current_status,
                                      notice.subscription_id, status)
    if notice.kind is Kind.SUBSCRIPTION_DELETED and subscription_deleted == "suspend" \
            and current:
        return Effects([changed], f"Stripe subscription {notice.subscription_id} deleted "
                                  f"(Stripe {sid})")
    return Effects([changed])
