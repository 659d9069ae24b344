"""Spend budgets: at most an amount of money per period for a tenant, an environment or an
API key (issue 21; services/core/budgets.py). Each change is a catalog event
(`budget.set`, `budget.cleared`); the gateways enforce them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Literal

import asyncpg
import msgspec
from aiohttp import web
from msgspec import Meta

from services.admin.routing import Handler, Route, add
from services.admin.web_io import catalog, db, json_response, path_id, read_body, require
from services.core.budgets import AMOUNT_PATTERN, Period, Scope, period_bounds
from services.core.catalog import NotFound
from services.core.catalog import queries as q
from services.core.catalog.bodies import Body

Amount = Annotated[str, Meta(
    pattern=AMOUNT_PATTERN,
    description="US dollars, a decimal string: 0 to 999999.999999999, at most 9 places")]


class BudgetBody(Body, frozen=True, kw_only=True):
    amount: Amount
    period: Annotated[Literal["day", "month"], Meta(
        description="`day`: resets at 00:00 UTC; `month`: on the 1st, 00:00 UTC")]
    # Custom resets (every N days from an anchor: services/core/budgets.py) are not offered
    # here yet.

    def to_period(self) -> Period:
        return Period(self.period)


class BudgetRecord(msgspec.Struct, kw_only=True, frozen=True):
    scope: Scope
    scope_id: uuid.UUID
    tenant_id: uuid.UUID
    amount: str
    """Dollars per period, 9 places."""
    period: str
    period_start: datetime
    period_end: datetime
    """The current period: the budget resets at its end."""
    updated_at: datetime


class BudgetList(msgspec.Struct, kw_only=True, frozen=True):
    data: list[BudgetRecord]


_COLUMNS = "scope, scope_id, tenant_id, amount, period, every_days, anchor, updated_at"


def _record(r: asyncpg.Record, now: datetime) -> BudgetRecord:
    period = Period(r["period"], r["every_days"], r["anchor"])
    start, end = period_bounds(period, now)
    amount: Decimal = r["amount"]
    return BudgetRecord(scope=r["scope"], scope_id=r["scope_id"], tenant_id=r["tenant_id"],
                        amount=f"{amount:f}", period=r["period"], period_start=start,
                        period_end=end, updated_at=r["updated_at"])


def _scoped(scope: Scope, param: str) -> tuple[Handler, Handler, Handler]:
    what = "key" if scope == "key" else scope

    async def put(request: web.Request) -> web.Response:
        scope_id = path_id(request, param, what)
        body = await read_body(request, BudgetBody)
        await catalog(request).set_budget(scope, scope_id, Decimal(body.amount),
                                          body.to_period())
        return await get(request)

    async def get(request: web.Request) -> web.Response:
        scope_id = path_id(request, param, what)
        await catalog(request).budget_owner(scope, scope_id)  # 404 names a missing scope
        row = await db(request).fetchrow(
            f"SELECT {_COLUMNS} FROM budgets WHERE scope_id = $1 AND scope = $2 "
            "AND amount IS NOT NULL", scope_id, scope)
        if row is None:
            raise NotFound(f"budget of {what} {scope_id} not found")
        return json_response(_record(row, datetime.now(UTC)))

    async def delete(request: web.Request) -> web.Response:
        scope_id = path_id(request, param, what)
        if not await catalog(request).clear_budget(scope, scope_id):
            raise NotFound(f"budget of {what} {scope_id} not found")
        return web.Response(status=204)

    # The operation ids (OpenAPI, the request checks) are the handlers' names.
    for handler, verb in ((put, "set"), (get, "get"), (delete, "clear")):
        handler.__name__ = handler.__qualname__ = f"{verb}_{scope}_budget"
    return put, get, delete


async def list_budgets(request: web.Request) -> web.Response:
    tenant_id = path_id(request, "tenant_id", "tenant")
    require(await q.get_tenant(db(request), tenant_id), "tenant", tenant_id)
    rows = await db(request).fetch(
        f"SELECT {_COLUMNS} FROM budgets WHERE tenant_id = $1 AND amount IS NOT NULL "
        "ORDER BY scope, scope_id", tenant_id)
    now = datetime.now(UTC)
    return json_response(BudgetList(data=[_record(r, now) for r in rows]))


TAG = "budgets"
_PATHS: tuple[tuple[Scope, str, str], ...] = (
    ("tenant", "/tenants/{tenant_id}/budget", "tenant_id"),
    ("environment", "/environments/{environment_id}/budget", "environment_id"),
    ("key", "/keys/{key_id}/budget", "key_id"))


def _routes() -> tuple[Route, ...]:
    routes: list[Route] = []
    for scope, path, param in _PATHS:
        put, get, delete = _scoped(scope, param)
        routes += [
            Route("PUT", path, put, f"Set a {scope}'s spend budget (replaces one set before)",
                  TAG, body=BudgetBody, response=BudgetRecord,
                  description="At most `amount` dollars per period, priced as billing prices "
                              "(catalog price times region multiplier), enforced by every "
                              "gateway before admission: a request that does not fit is "
                              "refused with 429 `insufficient_quota`."),
            Route("GET", path, get, f"A {scope}'s spend budget and its current period", TAG,
                  response=BudgetRecord),
            Route("DELETE", path, delete, f"Clear a {scope}'s spend budget", TAG, status=204)]
    routes.append(Route("GET", "/tenants/{tenant_id}/budgets", list_budgets,
                        "Every budget of a tenant, its environments and its keys", TAG,
                        response=BudgetList))
    return tuple(routes)


ROUTES = _routes()


def add_routes(app: web.Application) -> None:
    add(app, ROUTES)
