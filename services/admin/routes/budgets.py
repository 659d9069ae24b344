"""Spend budgets: at most an amount of money per period for a tenant, an environment or an
API key (issue 21; services/domain/budgets.py). Each change is a catalog event
(`budget.set`, `budget.cleared`); the gateways enforce them.

A body is a union tagged by `period`: `day` and `month` take only `amount`; `days` (a custom
reset: every `every_days` days from `anchor`) needs both, so the OpenAPI document states
exactly what the server takes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated

import asyncpg
import msgspec
from aiohttp import web
from msgspec import Meta

from services.admin.routing import Handler, Route, add
from services.admin.web_io import catalog, db, json_response, path_id, read_body, require
from services.domain.budgets import AMOUNT_PATTERN, MAX_EVERY_DAYS, Period, Scope, period_bounds
from services.domain.catalog import NotFound
from services.domain.catalog import queries as q
from services.domain.catalog.bodies import WHOLE_NUMBER, Body
from services.infra.request_checks import FieldError

Amount = Annotated[str, Meta(
    pattern=AMOUNT_PATTERN,
    description="US dollars, a decimal string: 0 to 999999.999999999, at most 9 places")]
EveryDays = Annotated[int, Meta(
    ge=1, le=MAX_EVERY_DAYS,
    description=f"the period's length in days, 1 to {MAX_EVERY_DAYS}; {WHOLE_NUMBER}")]
Anchor = Annotated[datetime, Meta(
    tz=True,
    description="when a period starts (RFC 3339, with its offset: `2026-12-01T00:00:00Z`); "
                "the others start every `every_days` days before and after it, so it may "
                "be in the past or the future. Kept in UTC (one that UTC cannot hold, "
                "within a day of year 1 or 9999, is moved by one period: the same resets)")]
_FIXED = "`day` and `month` reset at fixed times (00:00 UTC; the 1st, 00:00 UTC)"


class _BudgetBody(Body, frozen=True, kw_only=True, tag_field="period"):
    amount: Amount

    @property
    def period(self) -> str:
        return str(self.__struct_config__.tag)

    def to_period(self) -> Period:
        raise NotImplementedError


class DailyBudgetBody(_BudgetBody, frozen=True, kw_only=True, tag="day"):
    """Resets at 00:00 UTC."""

    def to_period(self) -> Period:
        return Period("day")


class MonthlyBudgetBody(_BudgetBody, frozen=True, kw_only=True, tag="month"):
    """Resets on the 1st of the month, 00:00 UTC."""

    def to_period(self) -> Period:
        return Period("month")


class EveryDaysBudgetBody(_BudgetBody, frozen=True, kw_only=True, tag="days"):
    """A custom reset: every `every_days` days from `anchor`."""

    every_days: EveryDays
    anchor: Anchor

    def to_period(self) -> Period:
        return Period("days", self.every_days, _in_utc(self.anchor, self.every_days))


BudgetBody = DailyBudgetBody | MonthlyBudgetBody | EveryDaysBudgetBody
"""By `period`: `day`, `month`, or `days` with `every_days` and `anchor`."""


def _in_utc(anchor: datetime, every_days: int) -> datetime:
    """`anchor` in UTC; one that UTC cannot hold (a day or less from the ends of years 1 to
    9999) moved by one period, which starts the same periods."""
    step = timedelta(days=every_days)
    for moved in (0, 1, -1):
        try:
            return (anchor + moved * step).astimezone(UTC)
        except OverflowError:
            continue
    raise AssertionError("unreachable: a period is at most a year")


async def _read_budget_body(request: web.Request) -> DailyBudgetBody | MonthlyBudgetBody \
        | EveryDaysBudgetBody:
    try:
        body: DailyBudgetBody | MonthlyBudgetBody | EveryDaysBudgetBody = await read_body(
            request, BudgetBody)  # type: ignore[arg-type]
    except FieldError as exc:
        if exc.param in ("every_days", "anchor"):
            if exc.message.startswith("Unknown field"):
                raise FieldError(f"'{exc.param}' is only for a period of `days` (every "
                                 f"`every_days` days from `anchor`): {_FIXED}.",
                                 exc.param) from None
            if exc.message.startswith("Missing required field"):
                raise FieldError(f"A period of `days` needs '{exc.param}': it resets every "
                                 f"`every_days` days from `anchor`.", exc.param) from None
        raise
    return body


class BudgetRecord(msgspec.Struct, kw_only=True, frozen=True):
    scope: Scope
    scope_id: uuid.UUID
    tenant_id: uuid.UUID
    amount: str
    """Dollars per period, 9 places."""
    period: str
    """`day`, `month` or `days`."""
    every_days: int | None
    """For `days`: the period's length in days; null otherwise."""
    anchor: datetime | None
    """For `days`: when a period starts (UTC), the others every `every_days` days before and
    after it; null otherwise."""
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
    days = period.kind == "days"
    return BudgetRecord(scope=r["scope"], scope_id=r["scope_id"], tenant_id=r["tenant_id"],
                        amount=f"{amount:f}", period=r["period"],
                        every_days=period.every_days if days else None,
                        anchor=period.anchor if days else None, period_start=start,
                        period_end=end, updated_at=r["updated_at"])


def _scoped(scope: Scope, param: str) -> tuple[Handler, Handler, Handler]:
    what = "key" if scope == "key" else scope

    async def put(request: web.Request) -> web.Response:
        scope_id = path_id(request, param, what)
        body = await _read_budget_body(request)
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
                              "refused with 429 `insufficient_quota`. The period is `day` "
                              "(resets at 00:00 UTC), `month` (the 1st, 00:00 UTC) or "
                              "`days`: every `every_days` days (1 to 366) from `anchor`, a "
                              "date-time with its offset; `every_days` and `anchor` are "
                              "required with `days` and refused with the others (400 "
                              "naming the field)."),
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
