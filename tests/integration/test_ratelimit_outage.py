"""Redis unreachable: each policy, no exception, counted, logged once, no hammering, recovery.

The outages are real: a port nobody listens on, a redis-server of the test's own stopped and
started again, and one frozen with SIGSTOP (a Redis that accepts but never answers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from services.gateway.ratelimit import (
    Layer,
    Limits,
    LimitSubject,
    LocalRateLimiter,
    Policy,
    RedisRateLimiter,
    connect_redis,
)
from services.gateway.ratelimit.limits import Origin
from services.infra.devstack import RedisServer, free_port

SUBJECT = LimitSubject(key_id="k1", environment_id="e1", tenant_id="t1")
LIMITS = Limits(key_requests_per_minute=2, key_tokens_per_minute=1000)


class Clock:
    """Monotonic seconds the test moves, to step through cool-downs without waiting."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def outage_logs(logs: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in logs if "redis" in e["event"]]


@pytest.fixture
def dead_redis() -> aioredis.Redis:
    return connect_redis(f"redis://127.0.0.1:{free_port()}/0")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("policy", ["local", "allow", "deny"])
async def test_each_policy_while_redis_is_unreachable(dead_redis: aioredis.Redis,
                                                      policy: Policy) -> None:
    registry = CollectorRegistry()
    limiter = RedisRateLimiter(dead_redis, policy=policy, registry=registry, clock=Clock())
    with capture_logs() as logs:
        decisions = [await limiter.acquire(SUBJECT, LIMITS, 100) for _ in range(4)]
        for d in decisions:
            if d.reservation is not None:
                assert await limiter.renew(d.reservation)
                await limiter.settle(d.reservation, 50)
    assert all(d.degraded for d in decisions)
    if policy == "local":
        assert [d.allowed for d in decisions] == [True, True, False, False]
        assert decisions[2].layer is Layer.KEY_REQUESTS and decisions[2].status == 429
        assert decisions[2].headers["x-ratelimit-scope"] == "key_requests"
        assert decisions[0].headers["x-ratelimit-remaining-requests"] == "1"
        assert decisions[0].reservation is not None
        assert decisions[0].reservation.origin is Origin.LOCAL
    elif policy == "allow":
        assert all(d.allowed and d.headers == {} for d in decisions)
    else:
        assert not any(d.allowed for d in decisions)
        assert {d.status for d in decisions} == {503}
        assert decisions[0].layer is Layer.UNAVAILABLE
        assert decisions[0].headers == {"x-ratelimit-scope": "unavailable", "Retry-After": "1"}
    assert sample(registry, "rate_limit_fallback_total", policy=policy) == 4
    # One attempt, then the cool-down: the other calls did not touch the dead Redis.
    assert sample(registry, "rate_limit_redis_errors_total") == 1
    assert outage_logs(logs) == ["rate limiter cannot reach redis; falling back to its policy"]
    await dead_redis.aclose()


async def test_the_cooldown_spares_a_dead_redis(dead_redis: aioredis.Redis) -> None:
    registry = CollectorRegistry()
    clock = Clock()
    limiter = RedisRateLimiter(dead_redis, registry=registry, cooldown=1.0, clock=clock)
    with capture_logs() as logs:
        for _ in range(5):
            await limiter.acquire(SUBJECT, LIMITS, 1)
        assert sample(registry, "rate_limit_redis_errors_total") == 1
        clock.t += 1.0
        for _ in range(5):
            await limiter.acquire(SUBJECT, LIMITS, 1)
        assert sample(registry, "rate_limit_redis_errors_total") == 2  # one probe a cool-down
    assert len(outage_logs(logs)) == 1  # one outage, one line
    assert limiter.degraded
    await dead_redis.aclose()


async def test_recovers_when_redis_comes_back(own_redis: RedisServer) -> None:
    registry = CollectorRegistry()
    clock = Clock()
    client = connect_redis(own_redis.url)
    local = LocalRateLimiter()
    limiter = RedisRateLimiter(client, registry=registry, clock=clock, local=local)
    with capture_logs() as logs:
        before = await limiter.acquire(SUBJECT, LIMITS, 100)
        assert before.allowed and not before.degraded and before.reservation is not None

        own_redis.stop()
        during = await limiter.acquire(SUBJECT, LIMITS, 100)
        assert during.allowed and during.degraded and during.reservation is not None
        assert during.reservation.origin is Origin.LOCAL
        await limiter.settle(before.reservation, 10)  # Redis's, while it is down: dropped
        assert limiter.degraded

        own_redis.start()  # same port; a fresh Redis: no scripts loaded, no counters
        assert (await limiter.acquire(SUBJECT, LIMITS, 100)).degraded  # still cooling down
        clock.t += 1.0
        after = await limiter.acquire(SUBJECT, LIMITS, 100)
        assert after.allowed and not after.degraded
        assert not limiter.degraded
        assert after.headers["x-ratelimit-remaining-requests"] == "1"  # Redis counts anew
        await limiter.settle(during.reservation, 30)  # the local one goes back to local
        probe = local.decide(SUBJECT, LIMITS, 10**9)  # refused: reads without counting
        # 30 settled + the 100 still reserved by the request decided in the cool-down
        assert probe.headers["x-ratelimit-remaining-tokens"] == "870"
        assert after.reservation is not None
        await limiter.settle(after.reservation, 30)
    assert outage_logs(logs) == ["rate limiter cannot reach redis; falling back to its policy",
                                 "rate limiter reaches redis again"]
    recovered = next(e for e in logs if e["event"] == "rate limiter reaches redis again")
    assert recovered["decided_without_redis"] == 2
    assert sample(registry, "rate_limit_fallback_total", policy="local") == 2
    assert int(await client.hget("tokens:key:k1:minute:{t1}", "n") or 0) == 30
    await client.aclose()


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_a_redis_that_never_answers_costs_one_timeout(own_redis: RedisServer) -> None:
    registry = CollectorRegistry()
    clock = Clock()
    # The client's own socket timeout is long: the limiter's deadline must bound the wait.
    client = connect_redis(own_redis.url, timeout=30)
    limiter = RedisRateLimiter(client, registry=registry, timeout=0.2, clock=clock)
    assert not (await limiter.acquire(SUBJECT, LIMITS, 1)).degraded
    pid = int((await client.info("server"))["process_id"])
    with capture_logs(), frozen(pid):
        started = time.monotonic()
        first = await limiter.acquire(SUBJECT, LIMITS, 1)
        second = await limiter.acquire(SUBJECT, LIMITS, 1)  # cooling down: no wait at all
        elapsed = time.monotonic() - started
    assert first.degraded and second.degraded and first.allowed
    assert 0.15 < elapsed < 1.5
    assert sample(registry, "rate_limit_redis_errors_total") == 1
    clock.t += 1.0
    assert not (await limiter.acquire(SUBJECT, LIMITS, 1)).degraded
    await client.aclose()
