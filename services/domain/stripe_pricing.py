"""The cost price in Stripe: one meter, one price of one cost unit; tenants moved onto it.

`crosslogic billing setup` (POST /admin/v1/billing/setup) calls `ensure_cost_price`: it finds
the meter (by `event_name`) and the price (by its lookup key) or creates them, and checks that
what it found is what billing sends (aggregation `sum`, the payload keys, the unit's amount and
the currency): a price of another unit would bill every tenant wrong, so it is refused, never
used. Then `switch_tenant` moves each linked tenant: the cost price is added to its
subscription and `billing.pricing_switched` names the first hour billed by cost; earlier
hours stay on the token prices (services/domain/cost_meter.py `meters_for`), so at the switch no
hour is billed twice and none is lost.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import asyncpg
import stripe
import structlog

from schemas.events import PricingSwitched
from services.domain.billing_ledger import (
    ENDED_SUBSCRIPTION,
    PLAN_LOCK_KEY,
    get_account,
    last_token_hour,
    record_billing_events,
)
from services.domain.cost_meter import COST_PRICE_LOOKUP_KEY, switch_hour, unit_amount_decimal
from services.domain.stripe_billing import (
    Failure,
    StripeBilling,
    StripeRejected,
    StripeUnavailable,
    classify,
    describe,
    tenant_lock_key,
)

log = structlog.get_logger("stripe.pricing")

VALUE_KEY = "value"
CUSTOMER_KEY = "stripe_customer_id"


@dataclass(frozen=True)
class CostPriceSpec:
    """What billing sends, and so what the meter and price in Stripe must be."""

    event_name: str
    unit: Decimal
    currency: str

    @property
    def unit_amount_decimal(self) -> str:
        return unit_amount_decimal(self.unit)


@dataclass(frozen=True)
class CostPrice:
    meter_id: str
    price_id: str
    product_id: str
    created: tuple[str, ...] = ()
    """What this call made in Stripe (meter, product, price); empty when all was there."""


class SetupConflict(Exception):
    """Stripe holds a meter or price under our names that does not match the settings."""


def _stripe_call_failed(exc: stripe.StripeError) -> Exception:
    if classify(exc) is Failure.RETRY:
        return StripeUnavailable(f"Stripe is unavailable: {describe(exc)}")
    return StripeRejected(f"Stripe refused: {describe(exc)}")


def _get(obj: Any, *path: str) -> Any:
    for name in path:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


def check_meter(meter: Any, spec: CostPriceSpec) -> None:
    """SetupConflict unless this meter adds up our events' values per customer. Pure."""
    wrong = []
    if _get(meter, "default_aggregation", "formula") != "sum":
        wrong.append("its aggregation is not sum")
    if _get(meter, "value_settings", "event_payload_key") not in (None, VALUE_KEY):
        wrong.append(f"its value key is not {VALUE_KEY!r}")
    if _get(meter, "customer_mapping", "event_payload_key") not in (None, CUSTOMER_KEY):
        wrong.append(f"its customer key is not {CUSTOMER_KEY!r}")
    if wrong:
        raise SetupConflict(f"Stripe meter {_get(meter, 'id')} (event name "
                            f"{spec.event_name!r}) does not match what billing sends: "
                            f"{'; '.join(wrong)}. Deactivate it, or set "
                            "STRIPE_METER_COST_EVENT to another name (in billing too).")


def check_price(price: Any, spec: CostPriceSpec, meter_id: str) -> None:
    """SetupConflict unless this price bills one cost unit of our meter. Pure."""
    wrong = []
    if str(_get(price, "currency")).lower() != spec.currency.lower():
        wrong.append(f"its currency is {_get(price, 'currency')}, not {spec.currency}")
    amount = _get(price, "unit_amount_decimal")
    if amount is None or Decimal(str(amount)) != Decimal(spec.unit_amount_decimal):
        wrong.append(f"its unit amount is {amount} cents, not {spec.unit_amount_decimal} "
                     f"(one unit of {spec.unit} {spec.currency})")
    if _get(price, "recurring", "usage_type") != "metered" or \
            _get(price, "recurring", "meter") != meter_id:
        wrong.append(f"it is not metered on meter {meter_id}")
    if wrong:
        raise SetupConflict(
            f"Stripe price {_get(price, 'id')} (lookup key {COST_PRICE_LOOKUP_KEY!r}) does "
            f"not match the settings: {'; '.join(wrong)}. Tenants subscribed to it would be "
            "billed wrong: fix BILLING_COST_UNIT / BILLING_CURRENCY, or archive that price "
            "(and move its subscriptions) before running setup again.")


async def _find_meter(sb: StripeBilling, event_name: str) -> Any:
    meters = await sb.client.v1.billing.meters.list_async({"status": "active", "limit": 100})
    async for meter in meters.auto_paging_iter():
        if meter.event_name == event_name:
            return meter
    return None


async def find_cost_price(sb: StripeBilling, spec: CostPriceSpec) -> str | None:
    """The cost price setup made (by lookup key), checked; None before setup ran."""
    try:
        prices = await sb.client.v1.prices.list_async(
            {"lookup_keys": [COST_PRICE_LOOKUP_KEY], "active": True, "limit": 1})
        if not prices.data:
            return None
        price = prices.data[0]
        meter = await _find_meter(sb, spec.event_name)
    except stripe.StripeError as exc:
        raise _stripe_call_failed(exc) from None
    if meter is None:
        raise SetupConflict(f"No active Stripe meter has the event name {spec.event_name!r} "
                            "for the cost price: run `crosslogic billing setup`.")
    check_price(price, spec, str(meter.id))
    return str(price.id)


async def ensure_cost_price(sb: StripeBilling, spec: CostPriceSpec) -> CostPrice:
    """Find or make the cost meter, product and price; SetupConflict when what Stripe has
    differs from the settings. Creations carry idempotency keys, so a setup that crashed
    half-way and runs again makes nothing twice."""
    created: list[str] = []
    try:
        meter = await _find_meter(sb, spec.event_name)
        if meter is None:
            meter = await sb.client.v1.billing.meters.create_async(
                {"display_name": "CrossLogic usage cost", "event_name": spec.event_name,
                 "default_aggregation": {"formula": "sum"},
                 "customer_mapping": {"event_payload_key": CUSTOMER_KEY, "type": "by_id"},
                 "value_settings": {"event_payload_key": VALUE_KEY}},
                {"idempotency_key": f"crosslogic-cost-meter-{spec.event_name}"})
            created.append("meter")
        check_meter(meter, spec)
        meter_id = str(meter.id)
        prices = await sb.client.v1.prices.list_async(
            {"lookup_keys": [COST_PRICE_LOOKUP_KEY], "active": True, "limit": 1})
        if prices.data:
            price = prices.data[0]
            check_price(price, spec, meter_id)
            return CostPrice(meter_id, str(price.id), str(price.product), tuple(created))
        product = await sb.client.v1.products.create_async(
            {"name": "CrossLogic inference", "metadata": {"crosslogic": "cost"}},
            {"idempotency_key": f"crosslogic-cost-product-{meter_id}"})
        created.append("product")
        price = await sb.client.v1.prices.create_async(
            {"currency": spec.currency.lower(), "product": str(product.id),
             # A plain decimal string: the library would send a Decimal as str(), and a
             # nano-dollar is 1E-7 cents that way.
             "unit_amount_decimal": spec.unit_amount_decimal,  # type: ignore[typeddict-item]
             "billing_scheme": "per_unit",
             "recurring": {"interval": "month", "usage_type": "metered", "meter": meter_id},
             "lookup_key": COST_PRICE_LOOKUP_KEY,
             "nickname": f"Usage cost, per {spec.unit:f} {spec.currency.upper()}",
             "metadata": {"crosslogic_cost_unit": f"{spec.unit:f}"}},
            {"idempotency_key": f"crosslogic-cost-price-{meter_id}-{spec.currency.lower()}-"
                                f"{spec.unit_amount_decimal}"})
        created.append("price")
    except stripe.StripeError as exc:
        raise _stripe_call_failed(exc) from None
    log.info("stripe cost price ready", meter_id=meter_id, price_id=str(price.id),
             created=created)
    return CostPrice(meter_id, str(price.id), str(product.id), tuple(created))


SwitchOutcome = Literal["switched", "already", "not_linked", "no_subscription"]


@dataclass(frozen=True)
class Switch:
    tenant_id: uuid.UUID
    outcome: SwitchOutcome
    cost_from: datetime | None = None
    subscription_item_id: str | None = None
    notes: list[str] = field(default_factory=list)


async def _item_with_price(sb: StripeBilling, subscription_id: str, price_id: str) -> str | None:
    sub = await sb.client.v1.subscriptions.retrieve_async(subscription_id)
    for item in _get(sub, "items", "data") or []:
        if _get(item, "price", "id") == price_id:
            return str(item.id)
    return None


async def switch_tenant(pool: asyncpg.Pool[asyncpg.Record], sb: StripeBilling,
                        tenant_id: uuid.UUID, price_id: str, *, now: datetime,
                        at: datetime | None = None, actor: str = "system",
                        correlation_id: str | None = None) -> Switch:
    """Put a linked tenant on the cost price: add the price to its subscription (once: an
    item already there is reused), then record from which hour it bills. That hour is
    chosen, and recorded, under the pusher's planning lock: a plan either committed before
    (its token hours are seen and stay token hours) or runs after (and sees the switch), so
    no hour is planned on both. `at`: see `switch_hour`."""
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", tenant_lock_key(tenant_id))
        try:
            account = await get_account(conn, tenant_id)
            if account is None or not account.customer_id:
                return Switch(tenant_id, "not_linked")
            if account.cost_from is not None:
                return Switch(tenant_id, "already", account.cost_from)
            sub = account.subscription_id
            if not sub or account.subscription_status in ENDED_SUBSCRIPTION:
                return Switch(tenant_id, "no_subscription")
            try:
                item = await _item_with_price(sb, sub, price_id)
                if item is None:
                    created = await sb.client.v1.subscription_items.create_async(
                        {"subscription": sub, "price": price_id, "proration_behavior": "none",
                         "metadata": {"tenant_id": str(tenant_id)}},
                        {"idempotency_key": f"crosslogic-cost-item-{sub}-{price_id}"})
                    item = str(created.id)
            except stripe.StripeError as exc:
                raise _stripe_call_failed(exc) from None
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", PLAN_LOCK_KEY)
                cost_from = switch_hour(now, await last_token_hour(conn, tenant_id), at)
                await record_billing_events(conn, [PricingSwitched(
                    tenant_id=tenant_id, cost_from=cost_from, price_id=price_id,
                    subscription_id=sub, subscription_item_id=item)],
                    actor=actor, correlation_id=correlation_id)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", tenant_lock_key(tenant_id))
    log.info("tenant moved to the cost price", tenant_id=str(tenant_id),
             cost_from=cost_from.isoformat(), subscription_item_id=item)
    return Switch(tenant_id, "switched", cost_from, item)
