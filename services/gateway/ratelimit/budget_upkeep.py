"""The budget reconciler's Redis work (budget_reconciler.py), through the limiter's client:
raising budget counters to billing's records, and giving back what budgeted leases that
expired unsettled held."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from services.gateway.ratelimit import lua
from services.gateway.ratelimit.limits import Check, held_by
from services.gateway.ratelimit.metrics import RateLimitMetrics

EvalSha = Callable[[lua.Script, Sequence[str], Sequence[str | int]], Awaitable[Any]]


class BudgetUpkeep:
    def __init__(self, evalsha: EvalSha, slot: Callable[[str], int],
                 metrics: RateLimitMetrics, timeout: float) -> None:
        self._evalsha = evalsha
        self._slot = slot
        self.metrics = metrics
        self._timeout = timeout
        """Off the hot path: a script over many budgets may take longer than a request's."""

    async def reconcile(self, checks: Sequence[Check], spent: Sequence[int]) -> list[int]:
        """Raise budget counters of their current period to what billing recorded (never
        lower them: they also hold reservations in flight; a counter not holding the period
        is left to its next request's seed). Returns the nano-dollars added to each: the
        drift found (counted in `budget_drift_nano_dollars_total{source="reconcile"}`).
        RedisError (or OSError, TimeoutError) when Redis cannot answer: nothing to decide."""
        groups: dict[int, list[int]] = {}
        for i, check in enumerate(checks):
            groups.setdefault(self._slot(check.key), []).append(i)
        added = [0] * len(checks)
        for indices in groups.values():
            args: list[str | int] = []
            for i in indices:
                args += [checks[i].window_ms, spent[i]]
            async with asyncio.timeout(self._timeout):
                reply = await self._evalsha(lua.RECONCILE, [checks[i].key for i in indices],
                                            args)
            for i, more in zip(indices, reply, strict=True):
                added[i] = int(more)
        if sum(added):
            self.metrics.budget_drift.labels("reconcile").inc(sum(added))
        return added

    async def sweep(self, lease_key: str, members: Sequence[str]) -> int:
        """Give back what the budgeted leases `members` of `lease_key` held, those that are
        still there and expired (their gateway died before settling: SWEEP re-checks, so a
        lease settled or renewed since stays). Returns the nano-dollars given back, counted
        in `budget_expired_refunds_nano_dollars_total`. Raises when Redis cannot answer."""
        counters = sorted({key for m in members for key in held_by(m)[1]})
        if not counters:
            return 0
        async with asyncio.timeout(self._timeout):
            back = int(await self._evalsha(lua.SWEEP, [lease_key, *counters], list(members)))
        if back:
            self.metrics.budget_refunds.inc(back)
        return back
