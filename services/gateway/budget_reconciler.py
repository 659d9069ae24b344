"""The budget reconciler (issue 21): Redis holds the budgets' fast counters, billing's
`usage_records` are the truth. Every BUDGET_RECONCILE_SECONDS one gateway (whichever takes
the turn in Redis first) compares each budget's counter of its current period with what
billing recorded for it, and raises a counter found below the records: Redis lost writes (a
failover to a replica that was behind, a restore from a snapshot), a request admitted in one
period and billed in the next, or REGION_MULTIPLIERS set differently on the gateways and on
billing. The drift found is `budget_drift_nano_dollars_total{source="reconcile"}`, which
alerts (infra/prometheus/alerts.yml). Before that, it gives back what reservations of
gateways that died mid-request still hold (`sweep_once`).

A counter is never lowered: it also holds the reservations of requests in flight, which
billing has not seen. One without a count of the period (nobody asked this period, or Redis
lost it) is left to its next request, which seeds it (redis_limiter `SEED`). Off the hot
path: three queries, one script run a hundred budgets, in one gateway per interval.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime
from typing import Final

import asyncpg
import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from services.domain.budget_spend import BUDGET_COLUMNS, BudgetPeriod, budget_period, spend
from services.domain.budgets import nano
from services.gateway.ratelimit import BudgetCap, Layer, LimitSubject, RedisRateLimiter
from services.gateway.ratelimit.limits import Check
from services.gateway.ratelimit.planning import money_checks, redis_key
from services.gateway.spend import LAYERS

log = structlog.get_logger("budgets.reconcile")

TURN_KEY: Final = "budget:reconcile:turn"
LEASES: Final = redis_key(Layer.KEY_CONCURRENCY, LimitSubject("*", "", "*"))
"""Every key's lease set, as a SCAN pattern."""
BATCH: Final = 100
"""Budgets per script run: a run holds Redis for its length."""


def budget_check(b: BudgetPeriod) -> Check:
    """A budget and its period (services/domain/budget_spend.py) as the limiter's check."""
    subject = LimitSubject(key_id=str(b.scope_id) if b.scope == "key" else "",
                           environment_id=str(b.scope_id) if b.scope == "environment" else "",
                           tenant_id=str(b.tenant_id))
    [check] = money_checks(subject, [BudgetCap(
        LAYERS[b.scope], nano(b.amount), int(b.end.timestamp() * 1000),
        int(b.start.timestamp() * 1000))])
    return check


class BudgetReconciler:
    def __init__(self, db: asyncpg.Pool[asyncpg.Record], redis: aioredis.Redis | RedisCluster,
                 limiter: RedisRateLimiter, *, interval: float) -> None:
        self.db = db
        self.redis = redis
        self.limiter = limiter
        self.interval = interval
        self._token = secrets.token_hex(8)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                if await self.take_turn():
                    await self.sweep_once()
                    await self.reconcile_once(datetime.now(UTC))
            except (OSError, TimeoutError, RedisError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:
                log.warning("budgets not reconciled", error=str(exc)[:200])

    async def take_turn(self) -> bool:
        """This gateway's turn, if no other took it this interval (the turn lapses a little
        before the next, so a gateway that stopped does not hold it)."""
        ttl_ms = max(1, int(self.interval * 900))
        return bool(await self.redis.set(TURN_KEY, self._token, nx=True, px=ttl_ms))

    async def sweep_once(self) -> int:
        """Give back what budgeted leases that expired unsettled held (a gateway died
        mid-request): a key that sends requests does it itself when it is admitted, but a
        key that does not may hold its environment's and tenant's budgets. Returns the
        nano-dollars given back."""
        back = 0
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        async for raw in self.redis.scan_iter(match=LEASES, count=500):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            expired = [m.decode() if isinstance(m, bytes) else str(m) for m in
                       await self.redis.zrangebyscore(key, "-inf", now_ms)]
            held = [m for m in expired if "|" in m]
            if held:
                back += await self.limiter.sweep(key, held)
        if back:
            log.warning("budget reservations of leases that expired unsettled given back",
                        nano_dollars=back)
        return back

    async def reconcile_once(self, now: datetime) -> int:
        """Reconcile every budget's counter of the period holding `now`; the drift found.
        Reads every budget's spend in two queries however many there are
        (services/domain/budget_spend.py)."""
        rows = await self.db.fetch(
            f"SELECT {BUDGET_COLUMNS} FROM budgets WHERE amount IS NOT NULL ORDER BY scope_id")
        if not rows:
            return 0
        budgets = [budget_period(row, now) for row in rows]
        spent = await spend(self.db, budgets)
        drift = 0
        for first in range(0, len(budgets), BATCH):
            batch = budgets[first:first + BATCH]
            checks = [budget_check(b) for b in batch]
            added = await self.limiter.reconcile(checks,
                                                 [nano(spent[b.scope_id]) for b in batch])
            for b, check, more in zip(batch, checks, added, strict=True):
                if more:
                    log.warning("budget counter below billing's records; raised to them",
                                scope=b.scope, scope_id=str(b.scope_id),
                                tenant_id=str(b.tenant_id), drift_nano_dollars=more,
                                period_end_ms=check.window_ms)
            drift += sum(added)
        return drift
