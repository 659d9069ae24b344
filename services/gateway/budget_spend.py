"""What billing recorded against a budget's scope in its period: the truth a budget counter
is seeded from (its first request of a period, or after Redis lost it) and reconciled with.
Off the hot path: a query per budget and period per gateway, and after a Redis loss."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from services.core.budgets import nano
from services.core.usage_queries import UsageQuery, usage_totals
from services.gateway.ratelimit import Layer, LimitSubject
from services.gateway.ratelimit.limits import Check
from services.gateway.ratelimit.redis_limiter import BudgetSpent


def _query(subject: LimitSubject, check: Check) -> UsageQuery:
    start = datetime.fromtimestamp(check.starts_ms / 1000, UTC)
    end = datetime.fromtimestamp(check.window_ms / 1000, UTC)
    key = uuid.UUID(subject.key_id) if check.layer is Layer.KEY_BUDGET else None
    env = uuid.UUID(subject.environment_id) if check.layer is Layer.ENVIRONMENT_BUDGET else None
    # Whole hours from usage_hourly, the edges from usage_records (services/core/usage_queries).
    return UsageQuery(start=start, end=end, granularity="day", group_by=(),
                      tenant_id=uuid.UUID(subject.tenant_id), environment_id=env,
                      api_key_id=key)


def budget_spender(db: asyncpg.Pool[asyncpg.Record]) -> BudgetSpent:
    async def spent(subject: LimitSubject, checks: Sequence[Check]) -> list[int]:
        out = []
        for check in checks:
            rows = await usage_totals(db, _query(subject, check))
            out.append(sum((nano(Decimal(r.cost)) for r in rows), 0))
        return out

    return spent
