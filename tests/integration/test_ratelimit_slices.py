"""RATELIMIT_SLICES against a real Redis: the request and token counters spent from slices a
gateway borrows (services/gateway/ratelimit/counter_leases.py, share.py) — the same decisions
as counting each request, far fewer scripts, tokens settled into the slices, idle slack and
debts handed back."""

from __future__ import annotations

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from services.gateway.ratelimit import Layer, LimitSubject, RedisRateLimiter
from services.gateway.ratelimit.planning import redis_key
from services.gateway.ratelimit.share import IDLE_SECONDS
from tests.helpers import eventually
from tests.integration.gateway_fixtures import Platform, chat_scope
from tests.integration.gateway_fixtures import platform as platform
from tests.integration.test_ratelimit_redis import (
    SUBJECT,
    clear_of_window_end,
    counter,
    held,
    only,
)
from tests.integration.test_ratelimit_redis import r as r


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def sliced(r: aioredis.Redis, clock: Clock) -> RedisRateLimiter:
    # Counting tests: clear of a minute's end on Redis's clock, a busy machine included.
    await clear_of_window_end(r, 15)
    return RedisRateLimiter(r, registry=CollectorRegistry(), timeout=5, slices=True,
                            clock=clock)


def key(layer: Layer, subject: LimitSubject = SUBJECT) -> str:
    return redis_key(layer, subject)


def borrows(limiter: RedisRateLimiter) -> float:
    return limiter.counter_leases.metrics.borrows._value.get()


async def test_requests_are_refused_exactly_at_the_limit(
        r: aioredis.Redis, sliced: RedisRateLimiter) -> None:
    limits = only(key_requests_per_minute=200, environment_requests_per_minute=1000,
                  tenant_requests_per_minute=5000)
    decisions = [await sliced.acquire(SUBJECT, limits, 0) for _ in range(203)]
    assert [d.allowed for d in decisions] == [True] * 200 + [False] * 3
    assert {d.layer for d in decisions[200:]} == {Layer.KEY_REQUESTS}
    assert decisions[199].headers["x-ratelimit-remaining-requests"] == "0"
    assert decisions[0].headers["x-ratelimit-limit-requests"] == "200"
    assert 0 < decisions[200].retry_after <= 60
    # What was granted and not spent goes back; then Redis counts exactly what was admitted.
    await sliced.counter_leases.give_back(everything=True)
    assert await counter(r, key(Layer.KEY_REQUESTS)) == 200
    assert await counter(r, key(Layer.ENVIRONMENT_REQUESTS)) == 200
    assert await counter(r, key(Layer.TENANT_REQUESTS)) == 200


async def test_far_from_the_limits_most_requests_make_no_redis_call(
        r: aioredis.Redis, sliced: RedisRateLimiter, clock: Clock) -> None:
    limits = only(key_requests_per_minute=10**6, environment_requests_per_minute=10**6,
                  key_tokens_per_minute=10**9, key_tokens_per_day=10**10)
    async def requests(n: int) -> None:
        for _ in range(n):
            d = await sliced.acquire(SUBJECT, limits, 100)
            await sliced.settle(held(d.reservation), 80)
            clock.now += 0.001  # 1,000 requests a second

    await requests(1000)  # the observed rate takes a second or two to be known
    before = borrows(sliced)
    await requests(1000)
    # Slices sized by the rate (about 100 requests' worth), the counters topped up together:
    # a borrow every few dozen requests, not one per request.
    assert borrows(sliced) - before <= 1000 / 40, borrows(sliced) - before
    await sliced.counter_leases.give_back(everything=True)
    assert await counter(r, key(Layer.KEY_REQUESTS)) == 2000
    assert await counter(r, key(Layer.KEY_TOKENS_DAY)) == 2000 * 80


async def test_tokens_settle_into_the_slices_and_decide_as_redis_would(
        r: aioredis.Redis, sliced: RedisRateLimiter) -> None:
    limits = only(key_tokens_per_minute=1000, environment_tokens_per_day=10_000)
    admitted = 0
    while True:
        d = await sliced.acquire(SUBJECT, limits, 100)
        if not d.allowed:
            break
        admitted += 1
        await sliced.settle(held(d.reservation), 40)
    # Room for the estimate (100) while used <= 900, each using 40: as counting each would.
    assert admitted == 23
    assert d.layer is Layer.KEY_TOKENS_MINUTE
    await sliced.counter_leases.give_back(everything=True)
    assert await counter(r, key(Layer.KEY_TOKENS_MINUTE)) == 23 * 40
    assert await counter(r, key(Layer.ENVIRONMENT_TOKENS_DAY)) == 23 * 40
    assert not await r.exists(key(Layer.KEY_CONCURRENCY))  # no lease: nothing in Redis to settle


async def test_a_request_using_more_than_it_reserved_is_owed_and_recorded(
        r: aioredis.Redis, sliced: RedisRateLimiter, clock: Clock) -> None:
    limits = only(key_tokens_per_minute=100_000)
    for _ in range(3):
        d = await sliced.acquire(SUBJECT, limits, 100)
        reservation = held(d.reservation)
        await sliced.settle(reservation, 250)
        await sliced.settle(reservation, 250)  # settling twice counts once
    clock.now += IDLE_SECONDS
    await sliced.counter_leases.give_back()  # idle: slack back, the debt recorded
    assert await counter(r, key(Layer.KEY_TOKENS_MINUTE)) == 750


async def test_refused_at_another_layer_a_request_puts_its_slices_back(
        r: aioredis.Redis, sliced: RedisRateLimiter) -> None:
    limits = only(key_requests_per_minute=100, key_tokens_per_minute=10_000,
                  key_concurrency=5, global_requests_per_minute=1)
    first = await sliced.acquire(SUBJECT, limits, 10)
    assert first.allowed
    refused = await sliced.acquire(SUBJECT, limits, 10)
    assert refused.layer is Layer.GLOBAL_REQUESTS
    assert sliced.counter_leases.slots[key(Layer.KEY_CONCURRENCY)].in_use == 1
    await sliced.settle(held(first.reservation), 4)
    await sliced.counter_leases.give_back(everything=True)
    assert await counter(r, key(Layer.KEY_REQUESTS)) == 1
    assert await counter(r, key(Layer.KEY_TOKENS_MINUTE)) == 4
    assert await r.zcard(key(Layer.KEY_CONCURRENCY)) == 0


async def test_concurrency_is_held_in_slots_the_gateway_borrows(
        r: aioredis.Redis, sliced: RedisRateLimiter, clock: Clock) -> None:
    limits = only(key_concurrency=3)
    running = [held((await sliced.acquire(SUBJECT, limits, 0)).reservation)
               for _ in range(3)]
    refused = await sliced.acquire(SUBJECT, limits, 0)
    assert refused.layer is Layer.KEY_CONCURRENCY and refused.retry_after == 1.0
    assert all(r_.lease_key is None for r_ in running)  # no lease per request
    assert await r.zcard(key(Layer.KEY_CONCURRENCY)) == 3  # the gateway's slots
    await sliced.settle(running.pop(), 0)
    before = borrows(sliced)
    again = await sliced.acquire(SUBJECT, limits, 0)
    assert again.allowed and borrows(sliced) == before  # the freed slot, held here
    running.append(held(again.reservation))
    for reservation in running:
        await sliced.release(reservation)
    clock.now += IDLE_SECONDS
    await sliced.counter_leases.give_back()
    assert await r.zcard(key(Layer.KEY_CONCURRENCY)) == 0


async def test_slots_are_renewed_while_held_and_lapse_when_their_gateway_dies(
        r: aioredis.Redis) -> None:
    await clear_of_window_end(r, 15)
    clock = Clock()
    a = RedisRateLimiter(r, registry=CollectorRegistry(), timeout=5, slices=True, clock=clock,
                         lease_ttl=1.0)
    b = RedisRateLimiter(r, registry=CollectorRegistry(), timeout=5, slices=True,
                         lease_ttl=1.0)
    limits = only(key_concurrency=2)
    assert all([(await a.acquire(SUBJECT, limits, 0)).allowed for _ in range(2)])
    assert (await b.acquire(SUBJECT, limits, 0)).layer is Layer.KEY_CONCURRENCY
    before = await r.zrange(key(Layer.KEY_CONCURRENCY), 0, -1, withscores=True)
    clock.now += 0.5  # past two thirds of the TTL's margin: a renews what it holds
    await a.counter_leases.renew()
    after = await r.zrange(key(Layer.KEY_CONCURRENCY), 0, -1, withscores=True)
    assert [m for m, _ in after] == [m for m, _ in before]
    assert all(new >= old for (_, old), (_, new) in zip(before, after, strict=True))
    # a dies holding both: within the TTL, on Redis's clock, b gets them.

    async def freed() -> bool:
        return bool((await b.acquire(SUBJECT, limits, 0)).allowed)

    await eventually(freed, timeout=10, what="a dead gateway's slots lapsed")


async def test_two_gateways_share_a_limit_through_slices(
        r: aioredis.Redis, clock: Clock) -> None:
    await clear_of_window_end(r, 15)
    a = RedisRateLimiter(r, registry=CollectorRegistry(), timeout=5, slices=True, clock=clock)
    b = RedisRateLimiter(r, registry=CollectorRegistry(), timeout=5, slices=True, clock=clock)
    limits = only(key_requests_per_minute=100)
    assert sum([(await a.acquire(SUBJECT, limits, 0)).allowed for _ in range(60)]) == 60
    # b gets what a has not been granted; a's slack is a's until it idles.
    admitted_b = 0
    while (await b.acquire(SUBJECT, limits, 0)).allowed:
        admitted_b += 1
    slack = a.counter_leases.shares[key(Layer.KEY_REQUESTS)].left
    assert admitted_b == 40 - slack
    clock.now += IDLE_SECONDS
    await a.counter_leases.give_back()
    while (await b.acquire(SUBJECT, limits, 0)).allowed:
        admitted_b += 1
    assert 60 + admitted_b == 100
    await b.counter_leases.give_back(everything=True)
    assert await counter(r, key(Layer.KEY_REQUESTS)) == 100


async def test_a_gateway_with_slices_limits_exactly_and_hands_back_when_it_stops(
        platform: Platform, r: aioredis.Redis) -> None:
    p = platform
    await clear_of_window_end(r, 30)
    await p.start_gateway(ratelimit_slices=True, environment_requests_per_minute=6)
    await p.add_node()
    await p.routable(1)

    async with aiohttp.ClientSession() as s:
        answers = [await chat_scope(p, s) for _ in range(8)]
    assert answers == [(200, None)] * 6 + [(429, "environment_requests")] * 2, answers
    subject = LimitSubject(str(p.key.key_id), str(p.environment_id), str(p.tenant_id))
    tenant_counter = key(Layer.TENANT_REQUESTS, subject)
    assert await counter(r, tenant_counter) >= 6  # the tenant's slice: borrowed ahead
    assert p.gateway_runner is not None
    await p.gateway_runner.cleanup()
    p.gateway_runner = None
    # Stopped: what it held is back, and Redis counts exactly the requests admitted.
    assert await counter(r, key(Layer.ENVIRONMENT_REQUESTS, subject)) == 6
    assert await counter(r, tenant_counter) == 6
