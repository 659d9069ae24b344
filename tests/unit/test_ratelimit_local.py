"""The per-process fallback limiter, on a clock the tests move (no waiting)."""

from __future__ import annotations

import datetime as dt

from services.gateway.ratelimit import (
    Layer,
    Limits,
    LimitSubject,
    LocalRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    connect_redis,
)
from services.gateway.ratelimit.limits import Reservation

SUBJECT = LimitSubject(key_id="k1", environment_id="e1", tenant_id="t1")
START = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC).timestamp()


class Clock:
    def __init__(self, t: float = START) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def only(**given: int) -> Limits:
    return Limits(**{"environment_requests_per_minute": None,  # type: ignore[arg-type]
                     "tenant_requests_per_minute": None, **given})


def reserved(limiter: LocalRateLimiter, limits: Limits, tokens: int) -> Reservation:
    d = limiter.decide(SUBJECT, limits, tokens)
    assert d.allowed and d.reservation is not None, d
    return d.reservation


def remaining_tokens(limiter: LocalRateLimiter, limits: Limits) -> int:
    """What is left, read from a refused probe's headers (a refusal changes nothing)."""
    d = limiter.decide(SUBJECT, limits, 10**12)
    assert not d.allowed
    return int(d.headers["x-ratelimit-remaining-tokens"])


async def test_minute_window_rolls_over() -> None:
    clock = Clock()
    limiter = LocalRateLimiter(clock=clock)
    limits = only(key_requests_per_minute=2)
    assert [limiter.decide(SUBJECT, limits, 0).allowed for _ in range(3)] == [True, True, False]
    refused = limiter.decide(SUBJECT, limits, 0)
    assert refused.layer is Layer.KEY_REQUESTS and refused.retry_after == 55
    assert refused.degraded and refused.reservation is None
    clock.t += 55
    assert limiter.decide(SUBJECT, limits, 0).allowed


async def test_day_tokens_roll_at_utc_midnight() -> None:
    clock = Clock()
    limiter = LocalRateLimiter(clock=clock)
    limits = only(key_tokens_per_day=100)
    await limiter.settle(reserved(limiter, limits, 100), 100)
    d = limiter.decide(SUBJECT, limits, 1)
    assert d.layer is Layer.KEY_TOKENS_DAY
    assert d.headers["x-ratelimit-reset-tokens"] == "20h55m55s"
    clock.t += 20 * 3600 + 55 * 60 + 55
    assert limiter.decide(SUBJECT, limits, 100).allowed


async def test_settlement_adjusts_once_and_only_in_its_window() -> None:
    clock = Clock()
    limiter = LocalRateLimiter(clock=clock)
    limits = only(key_tokens_per_minute=1000)
    r = reserved(limiter, limits, 300)
    assert remaining_tokens(limiter, limits) == 700
    await limiter.settle(r, 100)
    assert remaining_tokens(limiter, limits) == 900
    await limiter.settle(r, 5000)  # twice: nothing
    assert remaining_tokens(limiter, limits) == 900
    r = reserved(limiter, limits, 100)
    await limiter.settle(r, 400)
    assert remaining_tokens(limiter, limits) == 500  # 100 + 400
    r = reserved(limiter, limits, 100)
    clock.t += 60
    await limiter.settle(r, 0)  # its window ended: dropped, the new window untouched
    assert remaining_tokens(limiter, limits) == 1000


async def test_leases_limit_release_expire_and_renew() -> None:
    clock = Clock()
    limiter = LocalRateLimiter(clock=clock, lease_ttl=10)
    limits = only(key_concurrency=2)
    a = reserved(limiter, limits, 0)
    b = reserved(limiter, limits, 0)
    refused = limiter.decide(SUBJECT, limits, 0)
    assert refused.layer is Layer.KEY_CONCURRENCY and refused.headers["Retry-After"] == "1"
    await limiter.release(a)
    c = reserved(limiter, limits, 0)
    clock.t += 6
    assert await limiter.renew(c)
    clock.t += 6  # b expired (nobody released it), c was renewed
    assert not await limiter.renew(b)
    reserved(limiter, limits, 0)
    assert not limiter.decide(SUBJECT, limits, 0).allowed
    await limiter.settle(b, 0)  # an expired lease settles to nothing and frees nothing more
    assert not limiter.decide(SUBJECT, limits, 0).allowed


async def test_refusal_takes_nothing() -> None:
    limiter = LocalRateLimiter(clock=Clock())
    limits = only(key_requests_per_minute=10, key_tokens_per_minute=100, key_concurrency=1)
    reserved(limiter, limits, 60)
    for _ in range(5):
        d = limiter.decide(SUBJECT, limits, 60)
        assert d.layer is Layer.KEY_TOKENS_MINUTE
        assert d.headers["x-ratelimit-remaining-requests"] == "9"
        assert d.headers["x-ratelimit-remaining-tokens"] == "40"


async def test_memory_is_swept() -> None:
    clock = Clock()
    limiter = LocalRateLimiter(clock=clock, lease_ttl=1)
    limits = only(key_requests_per_minute=5, key_concurrency=5)
    for i in range(100):
        limiter.decide(LimitSubject(f"k{i}", "e", "t"), limits, 0)
    assert limiter.keys_held() == 200
    clock.t += 3600
    for _ in range(1024):
        limiter.decide(SUBJECT, limits, 0)
    assert limiter.keys_held() <= 2


def test_both_limiters_are_rate_limiters() -> None:
    assert isinstance(LocalRateLimiter(), RateLimiter)
    client = connect_redis("redis://127.0.0.1:1/0")  # never connects: nothing is sent
    assert isinstance(RedisRateLimiter(client), RateLimiter)
