"""Budget thresholds: `budget.threshold_reached` at 50% and 80% of a budget's period, and
`budget.exhausted` at 100%, each once per period, from billing's own records (the truth; the
gateways' Redis counters only hold the line). The notifier delivers them to the tenant's
subscriptions (`budget.*`).

Once per period: a period's alerts are one stream, `budget_alert:<scope id>:<period start>`,
appended at the version the watcher read, so two billing replicas (or a restarted one) never
send one twice; the next period is a new stream, so the reset opens the thresholds again.

Each look reads in a fixed number of queries however many budgets there are: the budgets,
their spend (services/domain/budget_spend.py), their streams' versions.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import asyncpg
import structlog

from schemas.events import BudgetExhausted, BudgetThresholdReached, Event
from services.domain.budget_spend import BUDGET_COLUMNS, BudgetPeriod, budget_period, spend
from services.infra.eventlog import ConcurrencyError, EventLog

log = structlog.get_logger("billing.budgets")

THRESHOLDS: Final = (50, 80, 100)


def due_thresholds(amount: Decimal, spent: Decimal, already: int) -> list[int]:
    """The thresholds (percent) reached and not yet announced, in order: `already` were.
    A budget of 0 is exhausted at once. Pure."""
    reached = [t for t in THRESHOLDS if spent * 100 >= amount * t]
    return reached[already:]


def alert_stream(scope_id: uuid.UUID, period_start: datetime) -> str:
    return f"{scope_id}:{period_start.astimezone(UTC):%Y%m%dT%H%M}"


def stream_of(b: BudgetPeriod) -> str:
    """The stream of a budget's alerts in its period."""
    return f"budget_alert:{alert_stream(b.scope_id, b.start)}"


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
            f"SELECT {BUDGET_COLUMNS} FROM budgets WHERE amount IS NOT NULL")
        budgets = [budget_period(row, now) for row in rows]
        if not budgets:
            return []
        spent = await spend(self.pool, budgets)
        versions: dict[str, int] = {r["stream"]: int(r["version"]) for r in await self.pool.fetch(
            "SELECT stream, version FROM streams WHERE stream = ANY($1::text[])",
            [stream_of(b) for b in budgets])}
        announced: list[Event] = []
        for b in budgets:
            announced += await self._announce(b, spent[b.scope_id],
                                              versions.get(stream_of(b), 0))
        return announced

    async def _announce(self, b: BudgetPeriod, spent: Decimal, version: int) -> Sequence[Event]:
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
            await self.log.append(stream_of(b), events, version)
        except ConcurrencyError:
            return ()  # another watcher announced them
        log.info("budget thresholds reached", scope=b.scope, scope_id=str(b.scope_id),
                 tenant_id=str(b.tenant_id), thresholds=due, spent=str(spent),
                 amount=str(b.amount))
        return events
