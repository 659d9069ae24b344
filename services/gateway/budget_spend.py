"""What billing recorded against a budget's scope in its period: the truth a budget counter
is seeded from (its first request of a period, or after Redis lost it), reconciled with, and
shown to the tenant (GET /v1/budgets). Off the hot path. The same grouped query as billing's
alerts (services/domain/budget_spend.py): two queries for a key's budgets, however many."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from services.domain.budget_spend import BudgetPeriod, spend
from services.domain.budgets import nano
from services.gateway.ratelimit import LimitSubject
from services.gateway.ratelimit.limits import Check
from services.gateway.ratelimit.redis_limiter import BudgetSpent
from services.gateway.spend import LAYERS

_SCOPES = {layer: scope for scope, layer in LAYERS.items()}


def budget_period(subject: LimitSubject, check: Check) -> BudgetPeriod:
    """A budget check (`planning.money_checks`) as the period billing's spend is read for."""
    scope = _SCOPES[check.layer]
    scope_id = {"key": subject.key_id, "environment": subject.environment_id,
                "tenant": subject.tenant_id}[scope]
    return BudgetPeriod(scope, uuid.UUID(scope_id), uuid.UUID(subject.tenant_id),
                        Decimal(check.limit or 0).scaleb(-9),
                        datetime.fromtimestamp(check.starts_ms / 1000, UTC),
                        datetime.fromtimestamp(check.window_ms / 1000, UTC))


def budget_spender(db: asyncpg.Pool[asyncpg.Record]) -> BudgetSpent:
    async def spent(subject: LimitSubject, checks: Sequence[Check]) -> list[int]:
        periods = [budget_period(subject, check) for check in checks]
        found = await spend(db, periods) if periods else {}
        return [nano(found[p.scope_id]) for p in periods]

    return spent
