"""A tenant's billing: its Stripe customer and subscription, and what was pushed to Stripe.

Linking needs `STRIPE_SECRET_KEY` in the admin service's settings; without it the route
answers 503 and the rest of the API works as before. The Stripe client is opened with the app
(this module adds its own cleanup context) and never shows the key.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import msgspec
import structlog
from aiohttp import web

from services.admin.context import ADMIN_SETTINGS
from services.admin.routing import Route, add
from services.admin.web_io import ACTOR, db, json_response, no_query, path_id, require
from services.core.billing_ledger import (
    BillingAccount,
    BillingEventRecord,
    MeterExport,
    export_totals,
    get_account,
    recent_billing_events,
    recent_exports,
)
from services.core.catalog import queries as q
from services.core.errors import ApiError
from services.core.http import REQUEST_ID
from services.core.stripe_billing import (
    StripeBilling,
    StripeConfig,
    StripeRejected,
    StripeUnavailable,
    link_tenant,
)

log = structlog.get_logger("admin.billing")

ADMIN_STRIPE = web.AppKey("admin_stripe", StripeBilling)


class BillingLink(msgspec.Struct, kw_only=True, frozen=True):
    tenant_id: uuid.UUID
    customer_id: str
    subscription_id: str | None
    created: bool
    """False when the tenant was linked already (nothing changed)."""
    linked_at: datetime | None


class ExportTotalsBody(msgspec.Struct, kw_only=True, frozen=True):
    """Tokens in meter events, by what became of them."""

    exported: int
    planned: int
    failed: int
    skipped: int


class TenantBilling(msgspec.Struct, kw_only=True, frozen=True):
    tenant_id: uuid.UUID
    account: BillingAccount | None
    """None until the tenant is linked (or Stripe wrote about it)."""
    totals: ExportTotalsBody
    exports: list[MeterExport]
    """The latest meter exports, newest hour first."""
    events: list[BillingEventRecord]
    """The latest billing events, newest first."""


async def link_customer(request: web.Request) -> web.Response:
    no_query(request)
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
    try:
        result = await link_tenant(db(request), stripe_billing, tenant_id, prices=prices,
                                   actor=ACTOR, correlation_id=request[REQUEST_ID])
    except StripeUnavailable as exc:
        raise ApiError.unavailable(str(exc), code="stripe_unavailable") from None
    except StripeRejected as exc:
        raise ApiError.bad_gateway(str(exc), code="stripe_refused") from None
    account = result.account
    assert account.customer_id is not None
    return json_response(BillingLink(tenant_id=tenant_id, customer_id=account.customer_id,
                                     subscription_id=account.subscription_id,
                                     created=result.created, linked_at=account.linked_at))


async def get_billing(request: web.Request) -> web.Response:
    no_query(request)
    tenant_id = path_id(request, "tenant_id", "tenant")
    pool = db(request)
    require(await q.get_tenant(pool, tenant_id), "tenant", tenant_id)
    totals = await export_totals(pool, tenant_id)
    return json_response(TenantBilling(
        tenant_id=tenant_id, account=await get_account(pool, tenant_id),
        totals=ExportTotalsBody(exported=totals.exported, planned=totals.planned,
                                failed=totals.failed, skipped=totals.skipped),
        exports=await recent_exports(pool, tenant_id),
        events=await recent_billing_events(pool, tenant_id)))


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
          response=BillingLink,
          description="Idempotent: a tenant already linked gets its customer back, "
                      "`created: false`. The customer carries `metadata.tenant_id`; the "
                      "subscription (when prices are configured) covers the input- and "
                      "output-token meters. 503 when Stripe is not configured here or "
                      "unreachable, 502 when Stripe refuses."),
    Route("GET", "/tenants/{tenant_id}/billing", get_billing,
          "A tenant's Stripe link, payment standing and latest meter exports", TAG,
          response=TenantBilling),
)


def add_routes(app: web.Application) -> None:
    add(app, ROUTES)
    app.cleanup_ctx.append(_stripe_ctx)
