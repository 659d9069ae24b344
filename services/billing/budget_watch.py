"""Budget thresholds: `budget.threshold_reached` at 50% and 80% of a budget's period, and
`budget.exhausted` at 100%, each once per period, from billing's own records (the truth; the
gateways' Redis counters only hold the line). The notifier delivers them to the tenant's
subscriptions (`budget.*`).

Once per period: a period's alerts are one stream, `budget_alert:<scope id>:<period start>`,
appended at the version the watcher read, so two billing replicas (or a restarted one) never
send one twice; the next period is a new stream, so the reset opens the thresholds again.

Each look reads in a fixed number of queries however many budgets there are (`spend`): the
budgets, their spend (tenants and environments together, keys apart), their streams' versions.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import asyncpg
import structlog

from schemas.events import BudgetExhausted, BudgetThresholdReached, Event
from services.core.budgets import Period, period_bounds
from services.core.eventlog import ConcurrencyError, EventLog
from services.core.usage_queries import UsageQuery, whole_hours

log = structlog.get_logger("billing.budgets")

THRESHOLDS: Final = (50, 80, 100)


def due_thresholds(amount: Decimal, spent: Decimal, already: int) -> list[int]:
    """The thresholds (percent) reached and not yet announced, in order: `already` were.
    A budget of 0 is exhausted at once. Pure."""
    reached = [t for t in THRESHOLDS if spent * 100 >= amount * t]
    return reached[already:]


def alert_stream(scope_id: uuid.UUID, period_start: datetime) -> str:
    return f"{scope_id}:{period_start.astimezone(UTC):%Y%m%dT%H%M}"


@dataclass(frozen=True, slots=True)
class Watched:
    """A budget and the period of it holding `now`."""

    scope: str
    scope_id: uuid.UUID
    tenant_id: uuid.UUID
    amount: Decimal
    start: datetime
    end: datetime

    @property
    def stream(self) -> str:
        return f"budget_alert:{alert_stream(self.scope_id, self.start)}"


def watched(row: asyncpg.Record, now: datetime) -> Watched:
    start, end = period_bounds(Period(row["period"], row["every_days"], row["anchor"]), now)
    return Watched(row["scope"], row["scope_id"], row["tenant_id"], row["amount"], start, end)


# Spend of many budgets at once: the sources and edges of services/core/usage_queries.py (whole
# UTC hours from usage_hourly, the ragged edges from usage_records; keys from usage_records
# throughout, the hourly table has no key column), for a list of (window, tenant) pairs rather
# than the one tenant its queries filter by. $1 window index, $2 tenant, $3 start, $4 end,
# $5 first whole hour, $6 end of whole hours (both $3 when there is none); keys: $5 the keys.
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
                budgets: Sequence[Watched]) -> dict[uuid.UUID, Decimal]:
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


class BudgetWatch:
    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], *, interval: float) -> None:
        self.pool = pool
        self.log = EventLog(pool)
        self.interval = interval

    async def run(self) -> None:
        while True:
            try:
                await self.check_once(datetime.now(UTC))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("budget thresholds not checked", error=str(exc)[:200])
            await asyncio.sleep(self.interval)

    async def check_once(self, now: datetime) -> list[Event]:
        """Announce what every budget reached since the last look; returns the events. Reads
        in a fixed number of queries (budgets, their spend, their periods' versions); appends
        only where a threshold is due."""
        rows = await self.pool.fetch(
            "SELECT scope, scope_id, tenant_id, amount, period, every_days, anchor "
            "FROM budgets WHERE amount IS NOT NULL")
        budgets = [watched(row, now) for row in rows]
        if not budgets:
            return []
        spent = await spend(self.pool, budgets)
        versions: dict[str, int] = {r["stream"]: int(r["version"]) for r in await self.pool.fetch(
            "SELECT stream, version FROM streams WHERE stream = ANY($1::text[])",
            [b.stream for b in budgets])}
        announced: list[Event] = []
        for b in budgets:
            announced += await self._announce(b, spent[b.scope_id],
                                              versions.get(b.stream, 0))
        return announced

    async def _announce(self, b: Watched, spent: Decimal, version: int) -> Sequence[Event]:
        """The thresholds `spent` reached that the period's stream (at `version`) has not
        said yet, appended at that version: a watcher that read an older version loses."""
        due = due_thresholds(b.amount, spent, version)
        if not due:
            return ()
        stream_key = alert_stream(b.scope_id, b.start)
        common: dict[str, Any] = dict(
            scope=b.scope, scope_id=b.scope_id, tenant_id=b.tenant_id, alert_key=stream_key,
            amount=b.amount, spent=spent, period_start=b.start, period_end=b.end)
        events: list[Event] = [
            BudgetExhausted(**common) if t == 100
            else BudgetThresholdReached(threshold=t, **common)
            for t in due]
        try:
            await self.log.append(b.stream, events, version)
        except ConcurrencyError:
            return ()  # another watcher announced them
        log.info("budget thresholds reached", scope=b.scope, scope_id=str(b.scope_id),
                 tenant_id=str(b.tenant_id), thresholds=due, spent=str(spent),
                 amount=str(b.amount))
        return events
