"""The per-process limiter: the same checks, windows, leases and verdicts as the Redis script,
held in this process's memory.

It is the fallback while Redis is unreachable (policy `local`). It cannot be exact across
processes: each gateway process counts only its own requests, so N processes admit up to N
times a limit between them, and they start from zero when an outage begins.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from services.gateway.ratelimit.limits import (
    WINDOW_GRACE_MS,
    Check,
    Decision,
    Kind,
    Limits,
    LimitSubject,
    Origin,
    Reservation,
    reservation_for,
    window_id,
    window_start,
)
from services.gateway.ratelimit.planning import needs_lease, plan
from services.gateway.ratelimit.verdicts import money_grant, verdict

_SWEEP_EVERY = 1024


@dataclass(slots=True)
class _Counter:
    start_ms: int
    window_ms: int
    count: int


@dataclass(slots=True)
class _Leases:
    expiry_ms: dict[str, int] = field(default_factory=dict)


class LocalRateLimiter:
    """In-memory twin of the Redis limiter; `clock` returns Unix seconds (injectable so tests
    move time instead of waiting). Not thread-safe: one per event loop."""

    def __init__(self, *, lease_ttl: float = 120.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._lease_ttl_ms = max(1, round(lease_ttl * 1000))
        self._clock = clock
        self._counters: dict[str, _Counter] = {}
        self._leases: dict[str, _Leases] = {}
        self._since_sweep = 0

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _used(self, check: Check, now_ms: int) -> int:
        counter = self._counters.get(check.key)
        if counter is None or counter.start_ms != window_id(check, now_ms):
            return 0
        return counter.count

    def _active(self, key: str, now_ms: int) -> int:
        leases = self._leases.get(key)
        if leases is None:
            return 0
        return sum(1 for expiry in leases.expiry_ms.values() if expiry > now_ms)

    def decide(self, subject: LimitSubject, limits: Limits, estimated_tokens: int,
               estimated_cost: int = 0, least_cost: int = 0) -> Decision:
        """`acquire` without the coroutine: the local limiter never waits."""
        return self.decide_checks(plan(subject, limits, estimated_tokens, estimated_cost,
                                       least_cost))

    def decide_checks(self, checks: tuple[Check, ...]) -> Decision:
        """Judge and, when allowed, count any planned checks (`plan`, `usage_plan`)."""
        now = self._now_ms()
        self._maybe_sweep(now)
        used = [self._active(c.key, now) if c.kind is Kind.CONCURRENCY
                else self._used(c, now) for c in checks]
        result = verdict(checks, used, now)
        reservation: Reservation | None = None
        if result.allowed:
            grant = money_grant(checks, used)
            lease_id = uuid.uuid4().hex if needs_lease(checks) else ""
            for check, u in zip(checks, used, strict=True):
                if check.kind is Kind.CONCURRENCY:
                    leases = self._leases.setdefault(check.key, _Leases())
                    leases.expiry_ms = {k: v for k, v in leases.expiry_ms.items() if v > now}
                    leases.expiry_ms[lease_id] = now + self._lease_ttl_ms
                elif check.kind is Kind.MONEY:  # named by its end: it lives until then
                    self._counters[check.key] = _Counter(check.window_ms, 0, u + grant)
                else:
                    self._counters[check.key] = _Counter(window_start(now, check.window_ms),
                                                         check.window_ms, u + check.amount)
            reservation = reservation_for(checks, now, lease_id, Origin.LOCAL, grant)
        return Decision(allowed=result.allowed, layer=result.layer,
                        retry_after=result.retry_after, headers=result.headers,
                        reservation=reservation, degraded=True)

    def settle_now(self, reservation: Reservation, actual_tokens: int,
                   actual_cost: int = 0) -> None:
        if reservation.origin is not Origin.LOCAL or reservation.lease_key is None:
            return
        now = self._now_ms()
        leases = self._leases.get(reservation.lease_key)
        expiry = leases.expiry_ms.pop(reservation.lease_id, None) if leases else None
        if expiry is None or expiry <= now:
            return
        for windows, delta in ((reservation.token_windows,
                                max(0, actual_tokens) - reservation.tokens),
                               (reservation.money_windows,
                                max(0, actual_cost) - reservation.money)):
            if delta == 0:
                continue
            for window in windows:
                counter = self._counters.get(window.key)
                if counter is not None and counter.start_ms == window.start_ms:
                    counter.count = max(0, counter.count + delta)

    def renew_now(self, reservation: Reservation) -> bool:
        if reservation.origin is not Origin.LOCAL or reservation.lease_key is None:
            return reservation.lease_key is None
        now = self._now_ms()
        leases = self._leases.get(reservation.lease_key)
        expiry = leases.expiry_ms.get(reservation.lease_id) if leases else None
        if leases is None or expiry is None or expiry <= now:
            return False
        leases.expiry_ms[reservation.lease_id] = now + self._lease_ttl_ms
        return True

    async def acquire(self, subject: LimitSubject, limits: Limits, estimated_tokens: int,
                      estimated_cost: int = 0, least_cost: int = 0) -> Decision:
        return self.decide(subject, limits, estimated_tokens, estimated_cost, least_cost)

    async def settle(self, reservation: Reservation, actual_tokens: int,
                     actual_cost: int = 0) -> None:
        self.settle_now(reservation, actual_tokens, actual_cost)

    async def renew(self, reservation: Reservation) -> bool:
        return self.renew_now(reservation)

    async def release(self, reservation: Reservation) -> None:
        self.settle_now(reservation, 0)

    def _maybe_sweep(self, now_ms: int) -> None:
        # Redis forgets idle keys by TTL; here memory would grow with every key ever seen.
        self._since_sweep += 1
        if self._since_sweep < _SWEEP_EVERY:
            return
        self._since_sweep = 0
        self._counters = {k: c for k, c in self._counters.items()
                          if c.start_ms + c.window_ms + WINDOW_GRACE_MS > now_ms}
        for key in list(self._leases):
            live = {k: v for k, v in self._leases[key].expiry_ms.items() if v > now_ms}
            if live:
                self._leases[key].expiry_ms = live
            else:
                del self._leases[key]

    def keys_held(self) -> int:
        """Counters and lease sets in memory."""
        return len(self._counters) + len(self._leases)
