"""What billing recorded against many spend budgets at once, each in its current period:
the spend billing's threshold alerts are judged by (services/billing/budget_watch.py) and the
gateways' budget counters are reconciled with (services/gateway/budget_reconciler.py).

A fixed number of queries however many budgets there are: tenants and environments together
(whole UTC hours from usage_hourly, the ragged edges from usage_records, as
services/domain/usage_queries.py reads them), keys apart (from usage_records: the hourly table
has no key column), each over every (period, tenant) pair at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from services.domain.budgets import Period, period_bounds
from services.domain.usage_queries import UsageQuery, whole_hours

BUDGET_COLUMNS = "scope, scope_id, tenant_id, amount, period, every_days, anchor"
"""What `budget_period` reads of a row of the `budgets` projection."""


@dataclass(frozen=True, slots=True)
class BudgetPeriod:
    """A budget and the period of it holding `now`."""

    scope: str
    scope_id: uuid.UUID
    tenant_id: uuid.UUID
    amount: Decimal
    start: datetime
    end: datetime


def budget_period(row: asyncpg.Record, now: datetime) -> BudgetPeriod:
    """A row of the `budgets` projection (`BUDGET_COLUMNS`) and its period holding `now`."""
    start, end = period_bounds(Period(row["period"], row["every_days"], row["anchor"]), now)
    return BudgetPeriod(row["scope"], row["scope_id"], row["tenant_id"], row["amount"], start,
                        end)


# For a list of (window, tenant) pairs rather than the one tenant usage_queries filters by:
# $1 window index, $2 tenant, $3 start, $4 end, $5 first whole hour, $6 end of whole hours
# (both $3 when there is none); keys: $5 the keys.
_WINDOWS = """
    WITH w AS (
        SELECT * FROM unnest($1::int[], $2::uuid[], $3::timestamptz[], $4::timestamptz[],
                             $5::timestamptz[], $6::timestamptz[])
            AS w(window_index, tenant_id, start_at, end_at, first_hour, last_hour)
    ), usage AS (
        SELECT w.window_index, h.tenant_id, h.environment_id, h.cost
        FROM w JOIN usage_hourly h ON h.tenant_id = w.tenant_id
            AND h.hour >= w.first_hour AND h.hour < w.last_hour
        UNION ALL
        SELECT w.window_index, r.tenant_id, r.environment_id, r.cost
        FROM w JOIN usage_records r ON r.tenant_id = w.tenant_id
            AND ((r.occurred_at >= w.start_at AND r.occurred_at < w.first_hour)
                 OR (r.occurred_at >= w.last_hour AND r.occurred_at < w.end_at))
    )
    SELECT window_index, tenant_id, environment_id, sum(cost) AS cost
    FROM usage GROUP BY 1, 2, 3"""

_KEYS = """
    WITH w AS (
        SELECT * FROM unnest($1::int[], $2::uuid[], $3::timestamptz[], $4::timestamptz[])
            AS w(window_index, tenant_id, start_at, end_at)
    )
    SELECT w.window_index, r.api_key_id, sum(r.cost) AS cost
    FROM w JOIN usage_records r ON r.tenant_id = w.tenant_id
        AND r.occurred_at >= w.start_at AND r.occurred_at < w.end_at
    WHERE r.api_key_id = ANY($5::uuid[])
    GROUP BY 1, 2"""


async def spend(db: asyncpg.Pool[asyncpg.Record],
                budgets: Sequence[BudgetPeriod]) -> dict[uuid.UUID, Decimal]:
    """What billing recorded against each budget (by scope id) in its period; at most two
    queries however many budgets: one for tenants and environments, one for keys, each over
    every (period, tenant) pair at once."""
    windows: dict[tuple[datetime, datetime], int] = {}
    hourly: set[tuple[int, uuid.UUID]] = set()
    by_key: set[tuple[int, uuid.UUID]] = set()
    for b in budgets:
        index = windows.setdefault((b.start, b.end), len(windows))
        (by_key if b.scope == "key" else hourly).add((index, b.tenant_id))
    bounds = list(windows)
    found: dict[tuple[int, uuid.UUID], Decimal] = {}
    if hourly:
        pairs = sorted(hourly)
        edges = [whole_hours(UsageQuery(start=bounds[i][0], end=bounds[i][1], group_by=()))
                 for i, _ in pairs]
        for r in await db.fetch(_WINDOWS, [i for i, _ in pairs], [t for _, t in pairs],
                                [bounds[i][0] for i, _ in pairs],
                                [bounds[i][1] for i, _ in pairs],
                                [e[0] for e in edges], [e[1] for e in edges]):
            i = r["window_index"]
            tenant = (i, r["tenant_id"])
            found[tenant] = found.get(tenant, Decimal(0)) + r["cost"]
            found[(i, r["environment_id"])] = r["cost"]
    if by_key:
        pairs = sorted(by_key)
        keys = sorted({b.scope_id for b in budgets if b.scope == "key"})
        for r in await db.fetch(_KEYS, [i for i, _ in pairs], [t for _, t in pairs],
                                [bounds[i][0] for i, _ in pairs],
                                [bounds[i][1] for i, _ in pairs], keys):
            found[(r["window_index"], r["api_key_id"])] = r["cost"]
    return {b.scope_id: found.get((windows[(b.start, b.end)], b.scope_id), Decimal(0))
            for b in budgets}
