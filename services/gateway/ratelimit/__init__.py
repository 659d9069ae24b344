"""The gateway's rate limits: every layer checked and counted in one Redis round trip.

Public API::

    LimitSubject(key_id: str, environment_id: str, tenant_id: str)
    Limits(key_requests_per_minute=None, environment_requests_per_minute=10_000,
           tenant_requests_per_minute=50_000, global_requests_per_minute=None,
           key_tokens_per_minute=None, key_tokens_per_day=None,
           environment_tokens_per_minute=None, environment_tokens_per_day=None,
           key_concurrency=None)                 # None = no limit at that layer
    Decision(allowed, layer: Layer | None, retry_after: float, headers: dict[str, str],
             reservation: Reservation | None, degraded: bool); .status -> 200 | 429 | 503
    Layer   # key_requests, environment_requests, …, key_concurrency, unavailable

    @runtime_checkable
class RateLimiter(Protocol):
        async def acquire(self, subject: LimitSubject, limits: Limits,
                          estimated_tokens: int, estimated_cost: int = 0,
                          least_cost: int = 0) -> Decision
        async def settle(self, reservation: Reservation, actual_tokens: int,
                         actual_cost: int = 0) -> None
        async def release(self, reservation: Reservation) -> None
        async def renew(self, reservation: Reservation) -> bool

    RedisRateLimiter(redis: redis.asyncio.Redis, *, policy: "local" | "allow" | "deny" = "local",
                     lease_ttl: float = 120.0, registry: CollectorRegistry | None = None,
                     cooldown: float = 1.0, timeout: float = 0.25,
                     local: LocalRateLimiter | None = None, clock=time.monotonic)
    LocalRateLimiter(*, lease_ttl: float = 120.0, clock=time.time)
    connect_redis(url: str, *, timeout: float = 0.25, max_connections: int | None = None)

    RedisRateLimiter.acquire_usage(subject, per_minute) -> Decision
                          # GET /v1/usage's own per-key limit, apart from inference's
    auth_failures: FailureLimit(failures=20, window=60.0), FailureLedger, judge, network_of
                          # failed authentications per client network (the authenticator's)

Per request: `d = await limiter.acquire(subject, limits, prompt_estimate + max_tokens)`; when
`d.allowed`, call upstream (long streams `renew(d.reservation)` every lease_ttl/3 or so), then
`settle(d.reservation, actual_total_tokens)` — or `release` if nothing was consumed. Otherwise
answer `d.status` (429, or 503 under the `deny` policy) with `d.headers` (`Retry-After` and
`x-ratelimit-scope` included). Allowed responses carry `d.headers` too. See
docs/rate-limits.md.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from services.gateway.ratelimit.limits import (
    BudgetCap,
    Decision,
    Layer,
    Limits,
    LimitSubject,
    Reservation,
)
from services.gateway.ratelimit.local_limiter import LocalRateLimiter
from services.gateway.ratelimit.metrics import Policy, RateLimitMetrics
from services.gateway.ratelimit.redis_limiter import RedisRateLimiter, connect_redis


@runtime_checkable
class RateLimiter(Protocol):
    async def acquire(self, subject: LimitSubject, limits: Limits, estimated_tokens: int,
                      estimated_cost: int = 0, least_cost: int = 0) -> Decision: ...

    async def settle(self, reservation: Reservation, actual_tokens: int,
                     actual_cost: int = 0) -> None: ...

    async def release(self, reservation: Reservation) -> None: ...

    async def renew(self, reservation: Reservation) -> bool: ...


__all__ = [
    "BudgetCap",
    "Decision",
    "Layer",
    "LimitSubject",
    "Limits",
    "LocalRateLimiter",
    "Policy",
    "RateLimitMetrics",
    "RateLimiter",
    "RedisRateLimiter",
    "Reservation",
    "connect_redis",
]
