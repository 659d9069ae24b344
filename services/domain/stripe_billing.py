"""Stripe, through the official `stripe` library: customers, metered subscriptions, meter events.

Shared by the admin API (linking a tenant to a Stripe customer) and the billing service (meter
events, webhooks), so it lives in core. One `StripeBilling` per process, opened and closed in
the service's cleanup context; the secret key never leaves the `StripeClient` (this object's
repr does not show it, and neither do our logs).

The library's own retries are off (`max_network_retries=0`): callers decide, because a meter
event must be resent with the same identifier, and some failures (a duplicate identifier) are
successes. `classify` says which errors are worth retrying.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import stripe
import structlog

from schemas.events import StripeCustomerLinked
from services.domain.billing_ledger import (
    ENDED_SUBSCRIPTION,
    PLAN_LOCK_KEY,
    BillingAccount,
    get_account,
    last_token_hour,
    record_billing_events,
)
from services.domain.catalog import NotFound
from services.domain.cost_meter import switch_hour
from services.infra.settings import Secret

log = structlog.get_logger("stripe")

# Stripe answers a meter event whose identifier it already holds (inside its deduplication
# window, at least 24 h) with 400 `duplicate_meter_event`; some responses carry only the text.
DUPLICATE_CODE = "duplicate_meter_event"
_DUPLICATE_TEXT = ("already exists with identifier", "duplicate identifier")


@dataclass(frozen=True)
class StripeConfig:
    secret_key: Secret
    api_base: str = ""
    """Another Stripe-compatible server (tests); empty: api.stripe.com."""
    timeout: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.secret_key.reveal().strip())


class Failure(enum.Enum):
    RETRY = "retry"
    """429, 409 (one call at a time per customer and meter), 5xx, network, timeout, or a key
    Stripe refused (401/403: fix the setting; nothing is lost meanwhile)."""
    DUPLICATE = "duplicate"
    """Stripe already has this meter event: what we wanted is done."""
    PERMANENT = "permanent"
    """Stripe refused the request itself; sending it again changes nothing."""


def classify(exc: stripe.StripeError) -> Failure:
    """What a Stripe error means for the caller. Pure."""
    if isinstance(exc, stripe.APIConnectionError):
        return Failure.RETRY
    status = exc.http_status or 0
    code = exc.code or ""
    message = (exc.user_message or str(exc) or "").lower()
    if code == DUPLICATE_CODE or (status == 400 and any(t in message for t in _DUPLICATE_TEXT)):
        return Failure.DUPLICATE
    if status in (401, 403, 409, 429) or status >= 500 or status == 0:
        return Failure.RETRY
    return Failure.PERMANENT


def may_have_reached(exc: stripe.StripeError) -> bool:
    """Whether Stripe may have carried out a request that failed so. A timeout or a cut
    connection can come after Stripe accepted, and a 5xx does not say it did nothing; a 429,
    a 409 or a refused key are answers given before anything was done. Pure."""
    if isinstance(exc, stripe.APIConnectionError):
        return True
    status = exc.http_status or 0
    return status == 0 or status >= 500


def describe(exc: stripe.StripeError) -> str:
    """A short, secret-free description for logs and events."""
    status = exc.http_status
    code = exc.code
    text = exc.user_message or type(exc).__name__
    parts = [str(status) if status else type(exc).__name__]
    if code:
        parts.append(code)
    parts.append(text.splitlines()[0][:300] if text else "")
    return " ".join(p for p in parts if p)


class StripeUnavailable(Exception):
    """Stripe could not be reached or refused for now; try again later."""


class StripeRejected(Exception):
    """Stripe refused the request; the message says why."""


class MeterSend(enum.Enum):
    SENT = "sent"
    DUPLICATE = "duplicate"


class StripeBilling:
    def __init__(self, config: StripeConfig) -> None:
        if not config.enabled:
            raise ValueError("STRIPE_SECRET_KEY is not set")
        self.config = config
        base = config.api_base.rstrip("/") or None
        # aiohttp, as everywhere else here; the session opens on the first call.
        self._http = stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=config.timeout))
        self.client = stripe.StripeClient(
            config.secret_key.reveal(), http_client=self._http, max_network_retries=0,
            base_addresses={"api": base, "meter_events": base} if base else None)

    def __repr__(self) -> str:
        return f"StripeBilling(api_base={self.config.api_base or 'api.stripe.com'!r})"

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------------ meter events

    async def send_meter_event(self, *, event_name: str, customer_id: str, value: int,
                               identifier: str, timestamp: int) -> MeterSend:
        """POST /v1/billing/meter_events. Raises stripe.StripeError for anything but success
        or a duplicate identifier (which is success: Stripe already counted it). No
        Idempotency-Key of ours: the identifier deduplicates, and a fixed key would make
        Stripe replay a stored 500 for a whole day."""
        try:
            await self.client.v1.billing.meter_events.create_async({
                "event_name": event_name,
                "identifier": identifier,
                "timestamp": timestamp,
                "payload": {"stripe_customer_id": customer_id, "value": str(value)},
            })
        except stripe.StripeError as exc:
            if classify(exc) is Failure.DUPLICATE:
                return MeterSend.DUPLICATE
            raise
        return MeterSend.SENT

    # ------------------------------------------------------------------ customers

    async def find_customer(self, tenant_id: uuid.UUID) -> str | None:
        """A customer created for this tenant earlier (a link that crashed before recording
        it, or one older than Stripe's 24 h idempotency window)."""
        try:
            found = await self.client.v1.customers.search_async(
                {"query": f"metadata['tenant_id']:'{tenant_id}'", "limit": 1})
        except stripe.InvalidRequestError:
            return None  # search is not offered everywhere; the idempotency key still holds
        for customer in found.data:
            return str(customer.id)
        return None

    async def create_customer(self, tenant_id: uuid.UUID, name: str, email: str) -> str:
        params: dict[str, Any] = {"name": name, "metadata": {"tenant_id": str(tenant_id)}}
        if email:
            params["email"] = email
        customer = await self.client.v1.customers.create_async(
            params,  # type: ignore[arg-type]
            {"idempotency_key": f"crosslogic-customer-{tenant_id}"})
        return str(customer.id)

    async def find_subscription(self, customer_id: str, tenant_id: uuid.UUID) -> str | None:
        subs = await self.client.v1.subscriptions.list_async(
            {"customer": customer_id, "status": "all", "limit": 100})
        for sub in subs.data:
            owner = sub.metadata["tenant_id"] if sub.metadata and "tenant_id" in sub.metadata \
                else None
            if owner == str(tenant_id) and sub.status not in ENDED_SUBSCRIPTION:
                return str(sub.id)
        return None

    async def create_subscription(self, customer_id: str, tenant_id: uuid.UUID,
                                  prices: Sequence[str], *, replacing: str | None = None) -> str:
        """A subscription to the metered prices (no quantity: meters say how much).
        `replacing`: the ended subscription this one succeeds. It is part of the idempotency
        key, so each generation has its own: under the first one's key Stripe would replay
        the ended subscription for 24 h instead of making a new one."""
        key = f"crosslogic-subscription-{tenant_id}"
        if replacing:
            key += f"-after-{replacing}"
        sub = await self.client.v1.subscriptions.create_async(
            {"customer": customer_id, "items": [{"price": p} for p in prices],
             "metadata": {"tenant_id": str(tenant_id)}},
            {"idempotency_key": key})
        return str(sub.id)

    # ------------------------------------------------------------------ events

    async def fetch_v2_event(self, event_id: str) -> dict[str, Any]:
        """A thin event's full body (GET /v2/core/events/{id})."""
        event = await self.client.v2.core.events.retrieve_async(event_id)
        body: dict[str, Any] = event.to_dict()
        return body


# --------------------------------------------------------------------------- linking a tenant


@dataclass(frozen=True)
class LinkResult:
    account: BillingAccount
    created: bool
    """False when the tenant was linked already: nothing was changed."""


def tenant_lock_key(tenant_id: uuid.UUID) -> int:
    # A signed 64-bit advisory lock key per tenant; collisions only serialize two links.
    return int.from_bytes(tenant_id.bytes[:8], "big", signed=True) ^ 0x6C696E6B  # "link"


async def link_tenant(pool: asyncpg.Pool[asyncpg.Record], stripe_billing: StripeBilling,
                      tenant_id: uuid.UUID, *, prices: Sequence[str] = (),
                      cost_price: str | None = None, now: datetime | None = None,
                      actor: str = "system", correlation_id: str | None = None) -> LinkResult:
    """Give the tenant a Stripe customer (and, when `prices` are set, a subscription to those
    metered prices), once: a second call returns what the first made. `cost_price`: the
    subscription is to the cost price instead (`prices` are then not used), and the link
    records from which hour it bills (services/domain/cost_meter.py `switch_hour`: every hour,
    unless the tenant had hours on the token meters before). Safe against crashes
    (Stripe idempotency keys plus a search by the tenant id in the customer's metadata) and
    concurrent calls (a per-tenant session advisory lock: no transaction is held open while
    Stripe answers, so the log's readers are never held back).

    NotFound for an unknown tenant; StripeUnavailable / StripeRejected when Stripe fails."""
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", tenant_lock_key(tenant_id))
        try:
            tenant = await conn.fetchrow("SELECT name, email FROM tenants WHERE id = $1",
                                         tenant_id)
            if tenant is None:
                raise NotFound(f"tenant {tenant_id} not found")
            account = await get_account(conn, tenant_id)
            customer_id = account.customer_id if account else None
            subscription_id = account.subscription_id if account else None
            # A subscription Stripe ended (deleted, or never paid for) bills nothing: the
            # tenant needs a new one, under a key of its own (see create_subscription).
            ended = subscription_id if account is not None and subscription_id and \
                account.subscription_status in ENDED_SUBSCRIPTION else None
            if ended:
                subscription_id = None
            if cost_price:
                prices = [cost_price]
            if customer_id and (subscription_id or not prices):
                assert account is not None
                return LinkResult(account, created=False)
            try:
                if not customer_id:
                    customer_id = (await stripe_billing.find_customer(tenant_id)
                                   or await stripe_billing.create_customer(
                                       tenant_id, tenant["name"], tenant["email"]))
                if prices and not subscription_id:
                    subscription_id = (
                        await stripe_billing.find_subscription(customer_id, tenant_id)
                        or await stripe_billing.create_subscription(customer_id, tenant_id,
                                                                    prices, replacing=ended))
            except stripe.StripeError as exc:
                log.warning("stripe refused a link", tenant_id=str(tenant_id),
                            error=describe(exc))
                if classify(exc) is Failure.RETRY:
                    raise StripeUnavailable(f"Stripe is unavailable: {describe(exc)}") from None
                raise StripeRejected(f"Stripe refused: {describe(exc)}") from None
            async with conn.transaction():
                cost_from = None
                if cost_price and subscription_id:
                    # Under the pusher's planning lock, as a switch (stripe_pricing.py).
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", PLAN_LOCK_KEY)
                    cost_from = switch_hour(now or datetime.now(UTC),
                                            await last_token_hour(conn, tenant_id))
                await record_billing_events(
                    conn, [StripeCustomerLinked(tenant_id=tenant_id, customer_id=customer_id,
                                                subscription_id=subscription_id,
                                                cost_from=cost_from)],
                    actor=actor, correlation_id=correlation_id)
            linked = await get_account(conn, tenant_id)
            assert linked is not None
            log.info("tenant linked to stripe", tenant_id=str(tenant_id),
                     customer_id=customer_id, subscription_id=subscription_id)
            return LinkResult(linked, created=True)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", tenant_lock_key(tenant_id))
