"""A tenant's billing: its Stripe customer and subscription, and what was pushed to Stripe.

Linking needs `STRIPE_SECRET_KEY` in the admin service's settings; without it the route
answers 503 and the rest of the API works as before. The Stripe client is opened with the app
(this module adds its own cleanup context) and never shows the key.

Held meter exports (`billing.export_held`: an attempt may have reached Stripe longer ago than
Stripe's identifier deduplication can be counted on, so the pusher no longer resends them) are
settled through here by an operator who has looked the identifier up in Stripe: resent, or
recorded as exported. Billing's pusher leader carries the command out (NATS request/reply,
services/billing/settle.py) and records the outcome as it records any of Stripe's answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Literal

import asyncpg
import msgspec
import nats.errors
import structlog
from aiohttp import web

from schemas.commands import SettleAction, SettleExport, SettleOutcome, SettleResult
from schemas.subjects import BILLING_SETTLE
from services.admin.bodies import BillingSetup, ExportSettle
from services.admin.context import ADMIN_SETTINGS
from services.admin.routing import QueryParam, Route, add
from services.admin.web_io import (
    ACTOR,
    db,
    json_response,
    path_id,
    read_body,
    require,
)
from services.domain.billing_ledger import (
    BillingAccount,
    BillingEventRecord,
    MeterExport,
    export_totals,
    get_account,
    recent_billing_events,
    recent_exports,
)
from services.domain.catalog import NotFound
from services.domain.catalog import queries as q
from services.domain.stripe_billing import (
    StripeBilling,
    StripeConfig,
    StripeRejected,
    StripeUnavailable,
    link_tenant,
)
from services.domain.stripe_pricing import (
    CostPriceSpec,
    SetupConflict,
    SwitchOutcome,
    ensure_cost_price,
    find_cost_price,
    switch_tenant,
)
from services.infra.db import Connection
from services.infra.errors import ApiError
from services.infra.http import BUS, REQUEST_ID
from services.infra.request_checks import Choice, FieldError, Integer, parse_limit

log = structlog.get_logger("admin.billing")

ADMIN_STRIPE = web.AppKey("admin_stripe", StripeBilling)


class BillingLink(msgspec.Struct, kw_only=True, frozen=True):
    tenant_id: uuid.UUID
    customer_id: str
    subscription_id: str | None
    created: bool
    """False when the tenant was linked already (nothing changed)."""
    linked_at: datetime | None
    cost_from: datetime | None = None
    """Subscribed to the cost price: the first hour it bills (null: the token prices)."""


class ExportTotalsBody(msgspec.Struct, kw_only=True, frozen=True):
    """Tokens (or cost units) in meter events, by what became of them."""

    exported: int
    planned: int
    failed: int
    skipped: int
    held: int
    """Not sent again by the pusher: an operator settles them (POST
    /tenants/{tenant_id}/billing/exports/settle)."""


class TenantBilling(msgspec.Struct, kw_only=True, frozen=True):
    tenant_id: uuid.UUID
    account: BillingAccount | None
    """None until the tenant is linked (or Stripe wrote about it)."""
    totals: ExportTotalsBody
    """Tokens, on the token meters (the hours before the tenant's switch to the cost price)."""
    cost_totals: ExportTotalsBody
    """Cost units, on the cost meter (from `account.cost_from` on)."""
    cost_unit: str
    """What one cost unit is worth, in the currency (BILLING_COST_UNIT)."""
    exports: list[MeterExport]
    """The latest meter exports, newest hour first."""
    events: list[BillingEventRecord]
    """The latest billing events, newest first."""


async def link_customer(request: web.Request) -> web.Response:
    tenant_id = path_id(request, "tenant_id", "tenant")
    require(await q.get_tenant(db(request), tenant_id), "tenant", tenant_id)
    stripe_billing = request.app.get(ADMIN_STRIPE)
    if stripe_billing is None:
        raise ApiError.unavailable(
            "Stripe is not configured on the admin service: set STRIPE_SECRET_KEY (and "
            "STRIPE_PRICE_INPUT_TOKENS / STRIPE_PRICE_OUTPUT_TOKENS for a subscription).",
            code="stripe_not_configured")
    s = request.app[ADMIN_SETTINGS]
    prices = [p.strip() for p in (s.stripe_price_input_tokens, s.stripe_price_output_tokens)
              if p.strip()]
    with _stripe_errors():
        # The cost price, once `billing setup` made it; the token prices before that.
        cost_price = await find_cost_price(stripe_billing, _cost_spec(request))
        result = await link_tenant(db(request), stripe_billing, tenant_id, prices=prices,
                                   cost_price=cost_price, actor=ACTOR,
                                   correlation_id=request[REQUEST_ID])
    account = result.account
    assert account.customer_id is not None
    return json_response(BillingLink(tenant_id=tenant_id, customer_id=account.customer_id,
                                     subscription_id=account.subscription_id,
                                     created=result.created, linked_at=account.linked_at,
                                     cost_from=account.cost_from))


@contextlib.contextmanager
def _stripe_errors() -> Iterator[None]:
    try:
        yield
    except StripeUnavailable as exc:
        raise ApiError.unavailable(str(exc), code="stripe_unavailable") from None
    except StripeRejected as exc:
        raise ApiError.bad_gateway(str(exc), code="stripe_refused") from None
    except SetupConflict as exc:
        raise ApiError.conflict(str(exc), code="stripe_setup_conflict") from None


def _cost_spec(request: web.Request) -> CostPriceSpec:
    s = request.app[ADMIN_SETTINGS]
    return CostPriceSpec(s.stripe_meter_cost_event, s.cost_unit, s.billing_currency)


class SwitchResult(msgspec.Struct, kw_only=True, frozen=True):
    tenant_id: uuid.UUID
    outcome: SwitchOutcome
    """`switched` now, `already` on the cost price, `not_linked` (no Stripe customer: its
    link will subscribe it to the cost price), `no_subscription` (none, or an ended one:
    `billing link` gives it one on the cost price)."""
    cost_from: datetime | None
    """The first hour billed by cost; earlier hours stay on the token prices."""
    subscription_item_id: str | None


class BillingSetupResult(msgspec.Struct, kw_only=True, frozen=True):
    meter_id: str
    price_id: str
    product_id: str
    created: list[str]
    """What this call made in Stripe (`meter`, `product`, `price`); empty: all was there."""
    event_name: str
    currency: str
    unit: str
    """What one unit of the meter is worth, in the currency."""
    unit_amount_decimal: str
    """The price of one unit, in the currency's minor unit (cents)."""
    tenants: list[SwitchResult]


async def setup_billing(request: web.Request) -> web.Response:
    body = await read_body(request, BillingSetup)
    now = datetime.now(UTC)
    stripe_billing = request.app.get(ADMIN_STRIPE)
    if stripe_billing is None:
        raise ApiError.unavailable("Stripe is not configured on the admin service: set "
                                   "STRIPE_SECRET_KEY.", code="stripe_not_configured")
    pool = db(request)
    if body.tenant_id is not None:
        require(await q.get_tenant(pool, body.tenant_id), "tenant", body.tenant_id)
    spec = _cost_spec(request)
    switched: list[SwitchResult] = []
    with _stripe_errors():
        price = await ensure_cost_price(stripe_billing, spec)
        if body.switch:
            tenants = [body.tenant_id] if body.tenant_id else [
                r["tenant_id"] for r in await pool.fetch(
                    "SELECT tenant_id FROM billing_accounts WHERE customer_id IS NOT NULL "
                    "AND cost_from IS NULL ORDER BY tenant_id")]
            for tenant_id in tenants:
                done = await switch_tenant(pool, stripe_billing, tenant_id, price.price_id,
                                           now=now, at=body.switch_at, actor=ACTOR,
                                           correlation_id=request[REQUEST_ID])
                switched.append(SwitchResult(
                    tenant_id=tenant_id, outcome=done.outcome, cost_from=done.cost_from,
                    subscription_item_id=done.subscription_item_id))
    log.info("billing setup", price_id=price.price_id, created=price.created,
             switched=sum(t.outcome == "switched" for t in switched),
             request_id=request[REQUEST_ID])
    return json_response(BillingSetupResult(
        meter_id=price.meter_id, price_id=price.price_id, product_id=price.product_id,
        created=list(price.created), event_name=spec.event_name, currency=spec.currency,
        unit=f"{spec.unit:f}", unit_amount_decimal=spec.unit_amount_decimal,
        tenants=switched))


async def get_billing(request: web.Request) -> web.Response:
    tenant_id = path_id(request, "tenant_id", "tenant")
    pool = db(request)
    require(await q.get_tenant(pool, tenant_id), "tenant", tenant_id)
    tokens = await export_totals(pool, tenant_id)
    cost = await export_totals(pool, tenant_id, ("cost",))
    return json_response(TenantBilling(
        tenant_id=tenant_id, account=await get_account(pool, tenant_id),
        totals=ExportTotalsBody(**dataclasses.asdict(tokens)),
        cost_totals=ExportTotalsBody(**dataclasses.asdict(cost)),
        cost_unit=f"{request.app[ADMIN_SETTINGS].cost_unit:f}",
        exports=await recent_exports(pool, tenant_id),
        events=await recent_billing_events(pool, tenant_id)))


class ExportRecord(MeterExport, frozen=True, kw_only=True):
    """A meter export and its tenant."""

    tenant_id: uuid.UUID


ExportStatus = Literal["held", "failed", "planned"]
_LISTED: tuple[ExportStatus, ...] = ("held", "failed", "planned")
_DEFAULT_LIST_LIMIT = 100
_MAX_LIST_LIMIT = 1000
_COLUMNS = ("tenant_id, identifier, meter, event_name, hour, sequence, value, customer_id, "
            "status, duplicate, error, stripe_error, planned_at, exported_at")


class ExportList(msgspec.Struct, kw_only=True, frozen=True):
    data: list[ExportRecord]
    """Oldest hour first."""
    truncated: bool
    """More exports are in this status than `limit` showed."""


class ExportSettlement(msgspec.Struct, kw_only=True, frozen=True):
    action: Literal["resend", "mark_exported"]
    stripe: Literal["sent", "duplicate"] | None
    """What Stripe answered the resend (`duplicate`: it still had the identifier, so nothing
    more was counted); null for `mark_exported`."""
    export: ExportRecord
    """The export after settling: status `exported`."""


async def _export(conn: asyncpg.Pool[asyncpg.Record] | Connection, tenant_id: uuid.UUID,
                  identifier: str) -> ExportRecord | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM meter_exports "
                              "WHERE identifier = $1 AND tenant_id = $2", identifier, tenant_id)
    return None if row is None else msgspec.convert(dict(row), ExportRecord)


async def list_exports(request: web.Request) -> web.Response:
    status = request.query.get("status", "held")  # checked by the route's QueryParams
    if status not in _LISTED:
        raise FieldError(f"'status' must be one of {', '.join(_LISTED)}, not "
                         f"{status[:40]!r}.", "status")
    limit = parse_limit(request.query["limit"], maximum=_MAX_LIST_LIMIT) \
        if "limit" in request.query else _DEFAULT_LIST_LIMIT
    rows = await db(request).fetch(
        f"""SELECT {_COLUMNS} FROM meter_exports WHERE status = $1
            ORDER BY hour, tenant_id, meter, sequence LIMIT $2""", status, limit + 1)
    return json_response(ExportList(
        data=[msgspec.convert(dict(r), ExportRecord) for r in rows[:limit]],
        truncated=len(rows) > limit))


async def settle_export(request: web.Request) -> web.Response:
    tenant_id = path_id(request, "tenant_id", "tenant")
    body = await read_body(request, ExportSettle)
    pool = db(request)
    require(await q.get_tenant(pool, tenant_id), "tenant", tenant_id)
    # Carried out by billing's pusher leader (services/billing/settle.py), the one sender of
    # meter events: a settling here would be a second copy of its Stripe logic.
    command = SettleExport(tenant_id=tenant_id, identifier=body.identifier,
                           action=SettleAction(body.action),
                           correlation_id=request[REQUEST_ID])
    wait = request.app[ADMIN_SETTINGS].settle_timeout
    try:
        msg = await request.app[BUS].nc.request(BILLING_SETTLE, msgspec.json.encode(command),
                                                timeout=wait)
    except nats.errors.NoRespondersError:
        raise ApiError.unavailable(
            "No billing leader is pushing to Stripe now (billing is down, or runs without "
            "STRIPE_SECRET_KEY): nothing was settled.", code="billing_unavailable") from None
    except nats.errors.TimeoutError:
        raise ApiError.timeout(
            f"Billing did not answer within {wait:g} s and may still settle the export: look "
            "at its status (GET /billing/exports) before settling it again.",
            code="settle_timeout") from None
    try:
        done = msgspec.json.decode(msg.data, type=SettleOutcome)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("undecodable settle reply", error=str(exc)[:200])
        raise ApiError.bad_gateway("Billing answered the settle command with a reply this "
                                   "API cannot read.", code="bad_billing_reply") from None
    _raise_unless_settled(done, body.identifier)
    settled = await _export(pool, tenant_id, body.identifier)
    assert settled is not None
    log.info("held meter export settled by an operator", identifier=body.identifier,
             action=body.action, stripe=done.stripe, value=settled.value,
             request_id=request[REQUEST_ID])
    return json_response(ExportSettlement(action=body.action, stripe=done.stripe,
                                          export=settled))


def _raise_unless_settled(done: SettleOutcome, identifier: str) -> None:
    match done.result:
        case SettleResult.SETTLED:
            return
        case SettleResult.NOT_FOUND:
            raise NotFound(done.detail)
        case SettleResult.NOT_HELD:
            raise ApiError.conflict(done.detail, param="identifier", code="export_not_held")
        case SettleResult.NOT_SENDABLE:
            raise ApiError.conflict(done.detail, code="export_not_sendable")
        case SettleResult.STRIPE_UNAVAILABLE:
            maybe = ": Stripe may have counted it, look again before resending" \
                if done.may_have_reached else ""
            raise ApiError.unavailable(f"Stripe did not take the meter event ({done.detail}); "
                                       f"it stays held{maybe}.", code="stripe_unavailable")
        case SettleResult.STRIPE_REFUSED:
            raise ApiError.bad_gateway(f"Stripe refused the meter event ({done.detail}); the "
                                       "export is now failed.", code="stripe_refused")
        case SettleResult.BAD_COMMAND:
            log.error("billing could not read a settle command", identifier=identifier,
                      detail=done.detail)
            raise ApiError.bad_gateway("Billing could not read the settle command (another "
                                       "version?): nothing was settled.",
                                       code="billing_refused_command")
        case SettleResult.FAILED:
            raise ApiError.unavailable(f"Billing could not settle it: {done.detail}.",
                                       code="billing_failed")


async def _stripe_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[ADMIN_SETTINGS]
    config = StripeConfig(s.stripe_secret_key, s.stripe_api_base, s.stripe_timeout)
    if not config.enabled:
        yield
        return
    client = StripeBilling(config)
    app[ADMIN_STRIPE] = client
    yield
    await client.close()


TAG = "billing"
ROUTES = (
    Route("POST", "/tenants/{tenant_id}/billing/customer", link_customer,
          "Link a tenant to a Stripe customer (and metered subscription), once", TAG,
          response=BillingLink, errors=(409, 502, 503),
          description="Idempotent: a tenant already linked gets its customer back, "
                      "`created: false`. The customer carries `metadata.tenant_id`; the "
                      "subscription is to the cost price once `billing setup` made it "
                      "(`cost_from`: the first hour it bills), else to the token prices when "
                      "configured. 409 `stripe_setup_conflict` when the cost price in Stripe "
                      "does not match the settings. 503 when Stripe is not configured here or "
                      "unreachable, 502 when Stripe refuses."),
    Route("POST", "/billing/setup", setup_billing,
          "Make or check the cost meter and price in Stripe; move tenants onto it", TAG,
          body=BillingSetup, response=BillingSetupResult, errors=(409, 502, 503),
          description="One command for an operator (`crosslogic billing setup`). Finds the "
                      "meter (by STRIPE_METER_COST_EVENT) and the price (lookup key "
                      "`crosslogic_cost`) or makes them: the price is one BILLING_COST_UNIT "
                      "of BILLING_CURRENCY. A meter or price that differs from the settings "
                      "is a 409 `stripe_setup_conflict` (nothing is switched). Then each "
                      "linked tenant on the token prices gets the cost price on its "
                      "subscription and `billing.pricing_switched`: its hours from "
                      "`cost_from` on are billed by cost, earlier ones (late usage included) "
                      "stay on the token prices, so no hour is billed twice or lost. Safe to "
                      "run again: what exists is reused, tenants already switched are left "
                      "alone. New links subscribe to the cost price once it exists."),
    Route("GET", "/tenants/{tenant_id}/billing", get_billing,
          "A tenant's Stripe link, payment standing and latest meter exports", TAG,
          response=TenantBilling),
    Route("GET", "/billing/exports", list_exports,
          "Meter exports of every tenant that need an operator's eye, by status", TAG,
          response=ExportList,
          query=(QueryParam("status", "held (the default), failed or planned",
                            Choice(_LISTED, "held")),
                 QueryParam("limit", "rows at most",
                            Integer(1, _MAX_LIST_LIMIT, _DEFAULT_LIST_LIMIT))),
          description="Held exports are not sent again by the pusher (an earlier attempt may "
                      "have reached Stripe too long ago to resend safely): look each "
                      "identifier up in Stripe, then settle it."),
    Route("POST", "/tenants/{tenant_id}/billing/exports/settle", settle_export,
          "Settle a held meter export after checking Stripe: resend it, or mark it exported",
          TAG, body=ExportSettle, response=ExportSettlement, errors=(409, 502, 503, 504),
          description="Carried out by billing's pusher leader (the one sender of meter "
                      "events), asked over NATS; 503 `billing_unavailable` when no billing "
                      "leader pushes to Stripe (nothing settled), 504 `settle_timeout` when it "
                      "did not answer within SETTLE_TIMEOUT (look at the export before "
                      "settling again). Only a held export (`billing.export_held`) is "
                      "settled; any other status is a 409 `export_not_held`, an identifier "
                      "that is not this tenant's a 404. `mark_exported` records "
                      "`billing.usage_exported` (`duplicate: true`: Stripe had it) without "
                      "calling Stripe. `resend` sends the meter event under its identifier, "
                      "stamped with the time of sending, and records "
                      "`billing.usage_exported`; if Stripe fails `billing.export_failed` is "
                      "recorded: a retryable failure (503 `stripe_unavailable`) leaves the "
                      "export held, a refusal (502 `stripe_refused`) marks it failed. The "
                      "events name the admin API as actor, the request id as correlation and "
                      "the hold as cause."),
)


def add_routes(app: web.Application) -> None:
    add(app, ROUTES)
    app.cleanup_ctx.append(_stripe_ctx)
