"""POST /webhooks/stripe: Stripe's events into the platform, once each.

The signature is checked on the raw body with the `stripe` library (`Webhook.construct_event`
for snapshot events; `WebhookSignature.verify_header`, the same check, for thin event
notifications, which construct_event refuses), with `STRIPE_WEBHOOK_TOLERANCE` (300 s): a bad,
missing or old signature is a 400 and nothing happens.

Exactly one effect per Stripe event id, even when Stripe delivers it twice (at once or later):
the effect on the catalog (suspending the tenant) is idempotent and comes first; the platform
events and the row in `stripe_webhook_events` are written in one transaction, last. A crash in
between makes Stripe retry (no 2xx), and the retry finds the suspension done.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import msgspec
import stripe
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from services.billing.settings import BillingSettings
from services.billing.stripe_events import (
    THIN_TYPES,
    BadEvent,
    Kind,
    Notice,
    effects,
    parse,
)
from services.domain.billing_ledger import (
    get_account,
    record_billing_events,
    tenant_for_customer,
)
from services.domain.catalog import Catalog, CatalogError
from services.domain.stripe_billing import StripeBilling, describe
from services.infra.eventlog import EventLog

log = structlog.get_logger("billing.webhooks")

ACTOR = "stripe-webhook"
SIGNATURE_HEADER = "Stripe-Signature"


class _Peek(msgspec.Struct):
    object: str = ""
    type: str = ""


_peek = msgspec.json.Decoder(_Peek)
_body = msgspec.json.Decoder(dict[str, Any])


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.received = Counter("stripe_webhooks_total", "Stripe webhook deliveries",
                                ["kind", "outcome"], registry=registry)


class WebhookHandler:
    def __init__(self, settings: BillingSettings, pool: asyncpg.Pool[asyncpg.Record],
                 eventlog: EventLog, stripe_billing: StripeBilling | None, *,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.eventlog = eventlog
        self.stripe = stripe_billing
        self.metrics = WebhookMetrics(registry)

    def verify(self, raw: bytes, signature: str | None) -> dict[str, Any]:
        """The event, if its signature holds. stripe.SignatureVerificationError if not;
        BadEvent when the body is not a Stripe event."""
        secret = self.settings.stripe_webhook_secret.reveal()
        tolerance = self.settings.stripe_webhook_tolerance
        try:
            peek = _peek.decode(raw)
        except msgspec.DecodeError:
            # Still verify first: an unsigned caller learns nothing about our parsing.
            stripe.WebhookSignature.verify_header(raw, signature, secret, tolerance)
            raise BadEvent("the body is not JSON") from None
        if peek.object == "v2.core.event":
            stripe.WebhookSignature.verify_header(raw, signature, secret, tolerance)
            return _body.decode(raw)
        event = stripe.Webhook.construct_event(raw, signature, secret, tolerance)
        body: dict[str, Any] = event.to_dict()
        return body

    async def handle(self, body: dict[str, Any]) -> str:
        """Apply a verified event; returns the outcome (duplicate, recorded, ignored,
        unknown_customer)."""
        event_id = str(body.get("id") or "")
        if event_id and await self.pool.fetchval(
                "SELECT 1 FROM stripe_webhook_events WHERE event_id = $1", event_id):
            self.metrics.received.labels(_kind(body), "duplicate").inc()
            return "duplicate"
        fetched = await self._fetch(body) if body.get("type") in THIN_TYPES else None
        notice = parse(body, fetched)
        tenant_id = await self._tenant(notice)
        account = await get_account(self.pool, tenant_id) if tenant_id is not None else None
        eff = effects(notice, tenant_id, payment_failed=self.settings.payment_failed_policy,
                      subscription_deleted=self.settings.subscription_deleted_policy,
                      current_subscription=account.subscription_id if account else None,
                      current_status=account.subscription_status if account else None)
        if eff.suspend_reason and tenant_id is not None:
            await self._suspend(tenant_id, eff.suspend_reason, notice.stripe_event_id)
        if notice.kind is Kind.IGNORED:
            outcome = "ignored"
        elif not eff.events:
            outcome = "unknown_customer"
            log.warning("stripe event for a customer no tenant is linked to",
                        stripe_event_id=notice.stripe_event_id, type=notice.type,
                        customer_id=notice.customer_id)
        else:
            outcome = "recorded"
        async with self.pool.acquire() as conn, conn.transaction():
            fresh = await conn.fetchval(
                """INSERT INTO stripe_webhook_events (event_id, type, tenant_id, outcome)
                   VALUES ($1, $2, $3, $4) ON CONFLICT (event_id) DO NOTHING
                   RETURNING true""", notice.stripe_event_id, notice.type, tenant_id, outcome)
            if not fresh:
                outcome = "duplicate"  # the same event, delivered twice at once
            elif eff.events:
                await record_billing_events(conn, eff.events, actor=ACTOR,
                                            causation_id=notice.stripe_event_id)
        self.metrics.received.labels(notice.kind.value, outcome).inc()
        if outcome == "recorded":
            log.info("stripe event recorded", stripe_event_id=notice.stripe_event_id,
                     type=notice.type, tenant_id=str(tenant_id) if tenant_id else None)
        return outcome

    async def _fetch(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """A thin event carries no details: fetch them when Stripe is configured. Without
        them the report is still recorded (meter and event id), so it is never lost."""
        if self.stripe is None:
            return None
        try:
            return await self.stripe.fetch_v2_event(str(body["id"]))
        except stripe.StripeError as exc:
            log.warning("could not fetch a thin event's details", error=describe(exc),
                        stripe_event_id=str(body.get("id")))
            return None

    async def _tenant(self, notice: Notice) -> uuid.UUID | None:
        if notice.customer_id:
            found = await tenant_for_customer(self.pool, notice.customer_id)
            if found is not None:
                return found
        if notice.tenant_hint is not None and await self.pool.fetchval(
                "SELECT 1 FROM tenants WHERE id = $1", notice.tenant_hint):
            return notice.tenant_hint
        return None

    async def _suspend(self, tenant_id: uuid.UUID, reason: str, stripe_event_id: str) -> None:
        catalog = Catalog(self.eventlog, actor=ACTOR, correlation_id=stripe_event_id)
        for _ in range(3):  # a concurrent change of the tenant: read again, decide again
            status = await self.pool.fetchval("SELECT status FROM tenants WHERE id = $1",
                                              tenant_id)
            if status is None or status == "suspended":
                return
            try:
                await catalog.suspend_tenant(tenant_id, reason)
            except CatalogError as exc:
                log.warning("tenant suspension raced; retrying", error=str(exc))
                continue
            log.warning("tenant suspended by billing policy", tenant_id=str(tenant_id),
                        reason=reason)
            return


def _kind(body: dict[str, Any]) -> str:
    type_ = body.get("type")
    return type_ if type_ in {k.value for k in Kind} else Kind.IGNORED.value


WEBHOOKS = web.AppKey("stripe_webhooks", WebhookHandler)


def _error(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"
                                        if status < 500 else "service_unavailable",
                                        "param": None, "code": code}}, status=status)


async def stripe_webhook(request: web.Request) -> web.Response:
    handler = request.app.get(WEBHOOKS)
    if handler is None or not handler.settings.stripe_webhook_secret:
        return _error(503, "Stripe webhooks are not configured here (STRIPE_WEBHOOK_SECRET).",
                      "webhooks_not_configured")
    raw = await request.read()
    try:
        body = handler.verify(raw, request.headers.get(SIGNATURE_HEADER))
    except stripe.SignatureVerificationError as exc:
        log.warning("stripe webhook refused: bad signature", error=str(exc).splitlines()[0])
        handler.metrics.received.labels("unverified", "bad_signature").inc()
        return _error(400, "Invalid Stripe-Signature.", "invalid_signature")
    except (BadEvent, ValueError) as exc:
        return _error(400, f"Not a Stripe event: {exc}", "invalid_event")
    try:
        outcome = await handler.handle(body)
    except BadEvent as exc:
        return _error(400, f"Not a Stripe event: {exc}", "invalid_event")
    return web.json_response({"received": True, "outcome": outcome})
