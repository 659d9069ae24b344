"""The Redis limiter against a real Redis: every layer, tokens, leases, one round trip."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from services.gateway.ratelimit import (
    Layer,
    Limits,
    LimitSubject,
    LocalRateLimiter,
    RedisRateLimiter,
    connect_redis,
)
from services.gateway.ratelimit.limits import MINUTE_MS, Reservation, window_start
from services.infra.pipelined_redis import PipelinedRedis
from tests.helpers import eventually

SUBJECT = LimitSubject(key_id="k1", environment_id="e1", tenant_id="t1")
NONE = Limits(environment_requests_per_minute=None, tenant_requests_per_minute=None)


def only(**given: int) -> Limits:
    """Just these layers: the default environment and tenant limits off."""
    return dataclasses.replace(NONE, **given)


async def redis_now_ms(r: aioredis.Redis) -> int:
    seconds, micros = await r.time()
    return seconds * 1000 + micros // 1000


async def clear_of_window_end(r: aioredis.Redis, margin: float) -> None:
    """Counting tests must not straddle a minute boundary (Redis's clock, which is also the UTC
    day's): when less than `margin` seconds are left, wait for the next minute."""
    async def roomy() -> bool:
        now = await redis_now_ms(r)
        return window_start(now, MINUTE_MS) + MINUTE_MS - now > margin * 1000

    await eventually(roomy, timeout=margin + 5, what="a minute with room")


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(redis_url, timeout=5)
    await clear_of_window_end(client, 3)
    yield client
    await client.aclose()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def limiter(r: aioredis.Redis, registry: CollectorRegistry) -> RedisRateLimiter:
    # A generous timeout: these tests are about Redis answering, not about outages.
    return RedisRateLimiter(r, registry=registry, timeout=5)


async def snapshot(r: aioredis.Redis) -> dict[bytes, Any]:
    """Every key's content (hash fields or lease scores); TTLs move with time, so left out."""
    state: dict[bytes, Any] = {}
    for key in await r.keys("*"):
        kind = await r.type(key)
        if kind == b"hash":
            state[key] = await r.hgetall(key)
        else:
            state[key] = await r.zrange(key, 0, -1, withscores=True)
    return state


async def counter(r: aioredis.Redis, key: str) -> int:
    return int(await r.hget(key, "n") or 0)


def held(decision_reservation: Reservation | None) -> Reservation:
    assert decision_reservation is not None
    return decision_reservation


# --------------------------------------------------------------------------- layers

# (limits, estimated tokens per request, subject of the i-th request): the subject varies
# below the layer under test, to show the layer adds up everything beneath it.
Scenario = tuple[Limits, int, Callable[[int], LimitSubject]]
SCENARIOS: dict[Layer, Scenario] = {
    Layer.KEY_REQUESTS: (only(key_requests_per_minute=3), 0, lambda i: SUBJECT),
    Layer.ENVIRONMENT_REQUESTS: (only(environment_requests_per_minute=3), 0,
                                 lambda i: LimitSubject(f"k{i}", "e1", "t1")),
    Layer.TENANT_REQUESTS: (only(tenant_requests_per_minute=3), 0,
                            lambda i: LimitSubject(f"k{i}", f"e{i}", "t1")),
    Layer.GLOBAL_REQUESTS: (only(global_requests_per_minute=3), 0,
                            lambda i: LimitSubject(f"k{i}", f"e{i}", f"t{i}")),
    Layer.KEY_TOKENS_MINUTE: (only(key_tokens_per_minute=300), 100, lambda i: SUBJECT),
    Layer.KEY_TOKENS_DAY: (only(key_tokens_per_day=300), 100, lambda i: SUBJECT),
    Layer.ENVIRONMENT_TOKENS_MINUTE: (only(environment_tokens_per_minute=300), 100,
                                      lambda i: LimitSubject(f"k{i}", "e1", "t1")),
    Layer.ENVIRONMENT_TOKENS_DAY: (only(environment_tokens_per_day=300), 100,
                                   lambda i: LimitSubject(f"k{i}", "e1", "t1")),
    Layer.KEY_CONCURRENCY: (only(key_concurrency=3), 0, lambda i: SUBJECT),
}


@pytest.mark.parametrize("layer", list(SCENARIOS), ids=str)
async def test_each_layer_refuses_exactly_at_its_limit(limiter: RedisRateLimiter,
                                                       r: aioredis.Redis,
                                                       registry: CollectorRegistry,
                                                       layer: Layer) -> None:
    limits, tokens, subject_of = SCENARIOS[layer]
    decisions = [await limiter.acquire(subject_of(i), limits, tokens) for i in range(3)]
    assert all(d.allowed and not d.degraded and d.reservation for d in decisions)
    assert all("x-ratelimit-scope" not in d.headers and "Retry-After" not in d.headers
               for d in decisions)
    before = await snapshot(r)
    for i in (3, 4):
        refused = await limiter.acquire(subject_of(i), limits, tokens)
        assert not refused.allowed and refused.layer is layer and refused.status == 429
        assert refused.reservation is None
        assert refused.headers["x-ratelimit-scope"] == str(layer)
        assert int(refused.headers["Retry-After"]) >= 1
        if layer is Layer.KEY_CONCURRENCY:
            assert refused.retry_after == 1.0
        else:
            assert 0 < refused.retry_after <= (86_400 if "day" in layer else 60)
            suffix = "tokens" if "tokens" in layer else "requests"
            assert refused.headers[f"x-ratelimit-limit-{suffix}"] == \
                ("300" if suffix == "tokens" else "3")
            assert refused.headers[f"x-ratelimit-remaining-{suffix}"] == "0"
    assert await snapshot(r) == before  # a refusal changes no counter and takes no lease
    assert registry.get_sample_value("rate_limit_exceeded_total", {"reason": str(layer)}) == 2


async def test_a_refusal_at_one_layer_counts_at_none(limiter: RedisRateLimiter,
                                                     r: aioredis.Redis) -> None:
    limits = Limits(key_requests_per_minute=100, key_tokens_per_minute=250,
                    environment_tokens_per_day=10_000, key_concurrency=10)
    first = await limiter.acquire(SUBJECT, limits, 200)
    before = await snapshot(r)
    refused = await limiter.acquire(SUBJECT, limits, 100)  # 300 > 250 key tokens a minute
    assert refused.layer is Layer.KEY_TOKENS_MINUTE
    assert await snapshot(r) == before
    assert await r.zcard("ratelimit:key:k1:concurrency:{t1}") == 1  # no lease taken
    assert await counter(r, "ratelimit:key:k1:minute:{t1}") == 1
    assert await counter(r, "ratelimit:env:e1:minute:{t1}") == 1
    assert first.headers["x-ratelimit-remaining-requests"] == "99"
    assert first.headers["x-ratelimit-remaining-tokens"] == "50"


async def test_how_close_allowed_requests_run_to_their_limit(limiter: RedisRateLimiter,
                                                           registry: CollectorRegistry) -> None:
    limits = Limits(key_requests_per_minute=100, key_tokens_per_minute=250)
    await limiter.acquire(SUBJECT, limits, 200)  # 99 of 100 requests left, 50 of 250 tokens
    await limiter.acquire(SUBJECT, limits, 100)  # refused: not observed

    def sample(kind: str, suffix: str, le: str | None = None) -> float | None:
        labels = {"kind": kind} if le is None else {"kind": kind, "le": le}
        return registry.get_sample_value(f"rate_limit_remaining_{suffix}", labels)

    assert sample("requests", "count") == sample("tokens", "count") == 1
    assert sample("requests", "sum") == 0.99 and sample("tokens", "sum") == 0.2
    assert sample("tokens", "bucket", "0.1") == 0 and sample("tokens", "bucket", "0.25") == 1


async def test_counters_are_windowed_hashes_with_a_ttl(limiter: RedisRateLimiter,
                                                       r: aioredis.Redis) -> None:
    await limiter.acquire(SUBJECT, Limits(key_tokens_per_day=10_000), 5)
    now = await redis_now_ms(r)
    minute = await r.hgetall("ratelimit:env:e1:minute:{t1}")
    assert minute == {b"w": str(window_start(now, MINUTE_MS)).encode(), b"n": b"1"}
    assert 0 < await r.pttl("ratelimit:env:e1:minute:{t1}") <= 70_000
    day = await r.hgetall("tokens:key:k1:day:{t1}")
    assert day[b"n"] == b"5" and int(day[b"w"]) % 86_400_000 == 0
    assert 0 < await r.pttl("tokens:key:k1:day:{t1}") <= 86_410_000
    assert 119_000 < await r.pttl("ratelimit:key:k1:concurrency:{t1}") <= 120_000


async def test_a_stale_window_counts_from_zero(limiter: RedisRateLimiter,
                                               r: aioredis.Redis) -> None:
    now = await redis_now_ms(r)
    current = window_start(now, MINUTE_MS)
    await r.hset("ratelimit:key:k1:minute:{t1}", mapping={"w": current - MINUTE_MS, "n": 999})
    d = await limiter.acquire(SUBJECT, only(key_requests_per_minute=5), 0)
    assert d.allowed and d.headers["x-ratelimit-remaining-requests"] == "4"
    assert await r.hgetall("ratelimit:key:k1:minute:{t1}") == {b"w": str(current).encode(),
                                                           b"n": b"1"}


async def test_headers_name_the_most_constraining_layers(limiter: RedisRateLimiter) -> None:
    limits = Limits(key_requests_per_minute=20, environment_requests_per_minute=3,
                    key_tokens_per_minute=1000, key_tokens_per_day=900)
    d = await limiter.acquire(SUBJECT, limits, 400)
    assert d.headers["x-ratelimit-limit-requests"] == "3"  # the environment's, not the key's
    assert d.headers["x-ratelimit-remaining-requests"] == "2"
    assert d.headers["x-ratelimit-limit-tokens"] == "900"  # the day has less left
    assert d.headers["x-ratelimit-remaining-tokens"] == "500"
    d = await limiter.acquire(SUBJECT, limits, 400)
    assert d.allowed and d.headers["x-ratelimit-remaining-tokens"] == "100"
    d = await limiter.acquire(SUBJECT, limits, 400)
    assert not d.allowed and d.layer is Layer.KEY_TOKENS_DAY  # both windows refuse: the day
    assert d.headers["x-ratelimit-scope"] == "key_tokens_day"  # frees last
    assert d.headers["x-ratelimit-remaining-requests"] == "1"
    assert d.headers["x-ratelimit-remaining-tokens"] == "100"
    assert "h" in d.headers["x-ratelimit-reset-tokens"] or d.retry_after < 3600


# --------------------------------------------------------------------------- tokens

TOKENS = only(key_tokens_per_minute=1000, environment_tokens_per_day=5000)


async def test_concurrent_requests_cannot_overspend(limiter: RedisRateLimiter,
                                                    r: aioredis.Redis) -> None:
    decisions = await asyncio.gather(*(limiter.acquire(SUBJECT, TOKENS, 100)
                                       for _ in range(50)))
    assert sum(d.allowed for d in decisions) == 10
    assert {d.layer for d in decisions if not d.allowed} == {Layer.KEY_TOKENS_MINUTE}
    assert await counter(r, "tokens:key:k1:minute:{t1}") == 1000
    assert await counter(r, "tokens:env:e1:day:{t1}") == 1000
    assert await r.zcard("ratelimit:key:k1:concurrency:{t1}") == 10


async def test_settle_gives_back_or_takes_more_once(limiter: RedisRateLimiter,
                                                    r: aioredis.Redis) -> None:
    a = held((await limiter.acquire(SUBJECT, TOKENS, 300)).reservation)
    b = held((await limiter.acquire(SUBJECT, TOKENS, 100)).reservation)
    assert await counter(r, "tokens:key:k1:minute:{t1}") == 400
    await limiter.settle(a, 120)  # fewer: 180 back
    assert await counter(r, "tokens:key:k1:minute:{t1}") == 220
    assert await counter(r, "tokens:env:e1:day:{t1}") == 220
    await limiter.settle(b, 500)  # more: 400 more
    assert await counter(r, "tokens:key:k1:minute:{t1}") == 620
    await limiter.settle(a, 0)
    await limiter.settle(b, 10_000)  # settled already: nothing
    assert await counter(r, "tokens:key:k1:minute:{t1}") == 620
    assert await counter(r, "tokens:env:e1:day:{t1}") == 620
    assert await r.zcard("ratelimit:key:k1:concurrency:{t1}") == 0  # settling released the leases
    d = await limiter.acquire(SUBJECT, TOKENS, 380)
    assert d.allowed and d.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_settles_of_one_loop_turn_go_as_one_script_and_each_counts_once(
        r: aioredis.Redis, redis_url: str, registry: CollectorRegistry) -> None:
    pipelined = PipelinedRedis(redis_url, timeout=5)
    limiter = RedisRateLimiter(pipelined, registry=registry, timeout=5)
    await limiter.load_scripts()
    other = LimitSubject("k2", "e1", "t1")
    mine = [held((await limiter.acquire(SUBJECT, TOKENS, 100)).reservation) for _ in range(3)]
    theirs = held((await limiter.acquire(other, TOKENS, 50)).reservation)
    assert await counter(r, "tokens:env:e1:day:{t1}") == 350
    # As if the minute ended for one of them: that counter must not be touched.
    await r.hset("tokens:key:k2:minute:{t1}", mapping={"w": theirs.token_windows[0].start_ms
                                                  + MINUTE_MS, "n": 7})
    before = int((await r.info("commandstats"))["cmdstat_evalsha"]["calls"])
    for reservation, actual in zip(mine, (10, 100, 250), strict=True):
        limiter.settle_nowait(reservation, actual)
    limiter.settle_nowait(theirs, 0)
    limiter.settle_nowait(mine[0], 10_000)  # a second settle of the same request: nothing

    async def released() -> bool:
        return (await r.zcard("ratelimit:key:k1:concurrency:{t1}")
                + await r.zcard("ratelimit:key:k2:concurrency:{t1}")) == 0

    await eventually(released, what="the leases released")
    assert await counter(r, "tokens:key:k1:minute:{t1}") == 10 + 100 + 250
    assert await counter(r, "tokens:key:k2:minute:{t1}") == 7
    assert await counter(r, "tokens:env:e1:day:{t1}") == 360  # 350 - 90 + 0 + 150 - 50
    calls = int((await r.info("commandstats"))["cmdstat_evalsha"]["calls"]) - before
    assert calls == 1
    await pipelined.aclose()


async def test_batched_settles_survive_redis_forgetting_its_scripts(
        r: aioredis.Redis, redis_url: str, registry: CollectorRegistry) -> None:
    pipelined = PipelinedRedis(redis_url, timeout=5)
    limiter = RedisRateLimiter(pipelined, registry=registry, timeout=5)
    reservations = [held((await limiter.acquire(SUBJECT, TOKENS, 100)).reservation)
                    for _ in range(2)]
    await r.script_flush()  # a Redis restart, as far as scripts go
    for reservation in reservations:
        limiter.settle_nowait(reservation, 30)

    async def settled() -> bool:
        return await r.zcard("ratelimit:key:k1:concurrency:{t1}") == 0

    await eventually(settled, what="settled the slow way")
    assert await counter(r, "tokens:key:k1:minute:{t1}") == 60
    await pipelined.aclose()


async def test_settle_after_the_window_rolled_is_dropped(limiter: RedisRateLimiter,
                                                         r: aioredis.Redis) -> None:
    reservation = held((await limiter.acquire(SUBJECT, TOKENS, 300)).reservation)
    minute = reservation.token_windows[0]
    assert minute.key == "tokens:key:k1:minute:{t1}"
    # As if the minute ended and a new one already counted 7 tokens.
    await r.hset(minute.key, mapping={"w": minute.start_ms + MINUTE_MS, "n": 7})
    await limiter.settle(reservation, 0)
    assert await counter(r, minute.key) == 7
    assert await counter(r, "tokens:env:e1:day:{t1}") == 0  # the day window is still the same
    assert await r.zcard("ratelimit:key:k1:concurrency:{t1}") == 0


async def test_settle_of_an_expired_lease_is_dropped(limiter: RedisRateLimiter,
                                                     r: aioredis.Redis) -> None:
    reservation = held((await limiter.acquire(SUBJECT, TOKENS, 300)).reservation)
    await r.zadd("ratelimit:key:k1:concurrency:{t1}",
                 {reservation.lease_id: await redis_now_ms(r) - 1})
    await limiter.settle(reservation, 0)
    assert await counter(r, "tokens:key:k1:minute:{t1}") == 300
    assert await r.zcard("ratelimit:key:k1:concurrency:{t1}") == 0


async def test_release_returns_the_tokens_and_the_slot(limiter: RedisRateLimiter,
                                                       r: aioredis.Redis) -> None:
    limits = dataclasses.replace(TOKENS, key_concurrency=1, key_requests_per_minute=10)
    reservation = held((await limiter.acquire(SUBJECT, limits, 300)).reservation)
    await limiter.release(reservation)
    assert await counter(r, "tokens:key:k1:minute:{t1}") == 0
    assert await counter(r, "ratelimit:key:k1:minute:{t1}") == 1  # the request stays counted
    assert (await limiter.acquire(SUBJECT, limits, 300)).allowed


# --------------------------------------------------------------------------- leases

LEASES = only(key_concurrency=2)


async def test_leases_limit_and_release(limiter: RedisRateLimiter) -> None:
    a = held((await limiter.acquire(SUBJECT, LEASES, 0)).reservation)
    held((await limiter.acquire(SUBJECT, LEASES, 0)).reservation)
    refused = await limiter.acquire(SUBJECT, LEASES, 0)
    assert refused.layer is Layer.KEY_CONCURRENCY and refused.headers["Retry-After"] == "1"
    other = await limiter.acquire(LimitSubject("k2", "e1", "t1"), LEASES, 0)
    assert other.allowed  # per key
    await limiter.release(a)
    assert (await limiter.acquire(SUBJECT, LEASES, 0)).allowed


async def test_an_expired_lease_is_reclaimed_without_release(r: aioredis.Redis) -> None:
    # A gateway that died mid-request never releases; its lease lapses after the TTL.
    crashed = RedisRateLimiter(r, lease_ttl=0.2, timeout=5)
    assert (await crashed.acquire(SUBJECT, only(key_concurrency=1), 0)).allowed
    survivor = RedisRateLimiter(r, timeout=5)
    assert not (await survivor.acquire(SUBJECT, only(key_concurrency=1), 0)).allowed

    async def slot_freed() -> bool:
        return (await survivor.acquire(SUBJECT, only(key_concurrency=1), 0)).allowed

    await eventually(slot_freed, timeout=5, what="the lapsed lease reclaimed")
    assert await r.zcard("ratelimit:key:k1:concurrency:{t1}") == 1  # the dead one purged


async def test_renew_keeps_a_lease_alive(limiter: RedisRateLimiter, r: aioredis.Redis) -> None:
    limits = only(key_concurrency=1)
    reservation = held((await limiter.acquire(SUBJECT, limits, 0)).reservation)
    key = "ratelimit:key:k1:concurrency:{t1}"
    about_to_lapse = await redis_now_ms(r) + 200
    await r.zadd(key, {reservation.lease_id: about_to_lapse})
    assert await limiter.renew(reservation)
    score = await r.zscore(key, reservation.lease_id)
    assert score is not None and score > about_to_lapse + 100_000

    async def lapse_time_passed() -> bool:
        return await redis_now_ms(r) > about_to_lapse

    await eventually(lapse_time_passed, timeout=5, what="the old expiry passed")
    assert not (await limiter.acquire(SUBJECT, limits, 0)).allowed  # still held
    await r.zadd(key, {reservation.lease_id: await redis_now_ms(r) - 1})
    assert not await limiter.renew(reservation)  # a lapsed lease is not revived
    await limiter.settle(reservation, 0)
    assert not await limiter.renew(reservation)


# --------------------------------------------------------------------------- Redis use


async def test_script_reloads_after_noscript(limiter: RedisRateLimiter,
                                             r: aioredis.Redis) -> None:
    reservation = held((await limiter.acquire(SUBJECT, TOKENS, 10)).reservation)
    await r.script_flush()
    await limiter.settle(reservation, 5)
    await r.script_flush()
    d = await limiter.acquire(SUBJECT, TOKENS, 10)
    assert d.allowed and not d.degraded
    assert await counter(r, "tokens:key:k1:minute:{t1}") == 15


async def client_commands(redis_url: str, r: aioredis.Redis,
                          action: Callable[[], Awaitable[object]]) -> list[str]:
    """The commands clients sent Redis while `action` ran, as MONITOR reports them (commands a
    script runs are reported as coming from `lua`, and left out). The monitor has a client of
    its own, so `r`'s warm connection is the one the action uses."""
    watcher = connect_redis(redis_url, timeout=5)
    async with watcher.monitor() as monitor:
        await action()
        await r.echo("end-of-action")
        sent: list[str] = []
        while True:
            seen = await asyncio.wait_for(monitor.next_command(), 5)
            if seen["client_type"] == "lua":
                continue
            name = seen["command"].split(" ", 1)[0].upper()
            if name == "ECHO" and "end-of-action" in seen["command"]:
                break
            sent.append(name)
    await watcher.aclose()
    return sent


async def test_acquire_and_settle_are_one_evalsha_each(limiter: RedisRateLimiter,
                                                       r: aioredis.Redis,
                                                       redis_url: str) -> None:
    every_layer = Limits(key_requests_per_minute=100, global_requests_per_minute=1000,
                         key_tokens_per_minute=10**6, key_tokens_per_day=10**7,
                         environment_tokens_per_minute=10**6,
                         environment_tokens_per_day=10**7, key_concurrency=50)
    warm = held((await limiter.acquire(SUBJECT, every_layer, 10)).reservation)
    await limiter.settle(warm, 10)  # scripts loaded, connection open
    reservations: list[Reservation] = []

    async def acquire_five() -> None:
        for _ in range(5):
            decision = await limiter.acquire(SUBJECT, every_layer, 10)
            reservations.append(held(decision.reservation))

    async def settle_them() -> None:
        for reservation in reservations:
            await limiter.settle(reservation, 7)

    borrows = limiter.global_lease.metrics.borrows
    before = borrows._value.get()
    sent = await client_commands(redis_url, r, acquire_five)
    # The platform-wide layer is spent from slices borrowed ahead (one more EVALSHA each):
    # a quiet client's slice is a few requests.
    borrowed = int(borrows._value.get() - before)
    assert sent == ["EVALSHA"] * (5 + borrowed) and borrowed <= 2
    assert await client_commands(redis_url, r, settle_them) == ["EVALSHA"] * 5
    assert await counter(r, "tokens:env:e1:day:{t1}") == 10 + 5 * 7


async def test_same_decisions_as_the_local_limiter(limiter: RedisRateLimiter) -> None:
    # The per-process fallback must enforce the same limits with the same answers.
    local = LocalRateLimiter()
    limits = Limits(key_requests_per_minute=6, key_tokens_per_minute=500, key_concurrency=3)
    seen: dict[str, list[tuple[bool, str | None, str | None, str | None]]] = {}
    for name, lim in (("redis", limiter), ("local", local)):
        held_here: list[Reservation] = []
        trail = seen.setdefault(name, [])
        for tokens in (100, 200, 100, 300, 50, 50, 10, 10):
            d = await lim.acquire(SUBJECT, limits, tokens)
            trail.append((d.allowed, d.layer, d.headers.get("x-ratelimit-remaining-requests"),
                          d.headers.get("x-ratelimit-remaining-tokens")))
            if d.reservation is not None:
                held_here.append(d.reservation)
            if len(held_here) == 3:
                await lim.settle(held_here.pop(0), 20)
    assert seen["redis"] == seen["local"]
    assert any(not allowed for allowed, *_ in seen["redis"])
