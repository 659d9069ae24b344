"""Budget thresholds: `budget.threshold_reached` at 50% and 80% of a budget's period, and
`budget.exhausted` at 100%, each once per period, from billing's own records (the truth; the
gateways' Redis counters only hold the line). The notifier delivers them to the tenant's
subscriptions (`budget.*`).

Once per period: a period's alerts are one stream, `budget_alert:<scope id>:<period start>`,
appended at the version the watcher read, so two billing replicas (or a restarted one) never
send one twice; the next period is a new stream, so the reset opens the thresholds again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final

import asyncpg
import structlog

from schemas.events import BudgetExhausted, BudgetThresholdReached, Event
from services.core.budgets import Period, period_bounds
from services.core.eventlog import ConcurrencyError, EventLog
from services.core.usage_queries import UsageQuery, usage_totals

log = structlog.get_logger("billing.budgets")

THRESHOLDS: Final = (50, 80, 100)


def due_thresholds(amount: Decimal, spent: Decimal, already: int) -> list[int]:
    """The thresholds (percent) reached and not yet announced, in order: `already` were.
    A budget of 0 is exhausted at once. Pure."""
    reached = [t for t in THRESHOLDS if spent * 100 >= amount * t]
    return reached[already:]


def alert_stream(scope_id: uuid.UUID, period_start: datetime) -> str:
    return f"{scope_id}:{period_start.astimezone(UTC):%Y%m%dT%H%M}"


def _query(row: asyncpg.Record, start: datetime, end: datetime) -> UsageQuery:
    scope, scope_id = row["scope"], row["scope_id"]
    return UsageQuery(start=start, end=end, granularity="day", group_by=(),
                      tenant_id=row["tenant_id"],
                      environment_id=scope_id if scope == "environment" else None,
                      api_key_id=scope_id if scope == "key" else None)


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
        """Announce what every budget reached since the last look; returns the events."""
        rows = await self.pool.fetch(
            "SELECT scope, scope_id, tenant_id, amount, period, every_days, anchor "
            "FROM budgets WHERE amount IS NOT NULL")
        announced: list[Event] = []
        for row in rows:
            announced += await self._check(row, now)
        return announced

    async def _check(self, row: asyncpg.Record, now: datetime) -> Sequence[Event]:
        period = Period(row["period"], row["every_days"], row["anchor"])
        start, end = period_bounds(period, now)
        totals = await usage_totals(self.pool, _query(row, start, end))
        spent = sum((Decimal(t.cost) for t in totals), Decimal(0))
        stream_key = alert_stream(row["scope_id"], start)
        stream = f"budget_alert:{stream_key}"
        version = int(await self.pool.fetchval(
            "SELECT coalesce(max(version), 0) FROM streams WHERE stream = $1", stream))
        due = due_thresholds(row["amount"], spent, version)
        if not due:
            return ()
        common = dict(scope=row["scope"], scope_id=row["scope_id"], tenant_id=row["tenant_id"],
                      alert_key=stream_key, amount=row["amount"], spent=spent,
                      period_start=start, period_end=end)
        events: list[Event] = [
            BudgetExhausted(**common) if t == 100
            else BudgetThresholdReached(threshold=t, **common)
            for t in due]
        try:
            await self.log.append(stream, events, version)
        except ConcurrencyError:
            return ()  # another watcher announced them
        log.info("budget thresholds reached", scope=row["scope"],
                 scope_id=str(row["scope_id"]), tenant_id=str(row["tenant_id"]),
                 thresholds=due, spent=str(spent), amount=str(row["amount"]))
        return events
