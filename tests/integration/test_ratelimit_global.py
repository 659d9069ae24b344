"""The platform-wide request limit by leased slices, against a real Redis: exact across gateway
processes, the hot key touched per slice, idle slack handed back
(services/gateway/ratelimit/share.py, global_lease.py)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

from services.gateway.ratelimit import Layer, LimitSubject, RedisRateLimiter, connect_redis
from services.gateway.ratelimit.share import IDLE_SECONDS
from tests.integration.gateway_fixtures import Platform, chat_scope
from tests.integration.gateway_fixtures import platform as platform
from tests.integration.test_ratelimit_redis import clear_of_window_end, counter, only

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_KEY = "ratelimit:global:minute"

# One gateway process: says "ready", waits for the starting gun, then each of `concurrency`
# workers asks until it is refused (so no process stops while holding part of the limit),
# every request from another tenant: only the platform-wide layer binds. At the end the
# process hands back whatever it still holds, as a gateway does when it stops.
WORKER = """
import asyncio, json, sys
import redis.asyncio as aioredis
from services.gateway.ratelimit import LimitSubject, Limits, RedisRateLimiter, connect_redis

async def main(url, concurrency, limit):
    client = connect_redis(url, timeout=10, max_connections=concurrency)
    limiter = RedisRateLimiter(client, timeout=10)
    limits = Limits(global_requests_per_minute=limit, environment_requests_per_minute=None,
                    tenant_requests_per_minute=None)
    gate = aioredis.from_url(url, socket_timeout=None)
    print("ready", flush=True)
    await gate.blpop(["go"], timeout=30)
    results, seq = [], iter(range(10**9))

    async def worker():
        while True:
            i = next(seq)
            d = await limiter.acquire(LimitSubject(f"k{i}", f"e{i}", f"t{i}"), limits, 0)
            results.append((d.allowed, str(d.layer), d.degraded))
            if not d.allowed:
                return

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    back = await limiter.global_lease.give_back(everything=True)
    print(json.dumps({"results": results, "back": back,
                      "borrows": limiter.global_lease.metrics.borrows._value.get()}), flush=True)
    await gate.aclose()
    await client.aclose()

asyncio.run(main(sys.argv[1], *map(int, sys.argv[2:])))
"""


async def test_gateway_processes_admit_exactly_the_platform_wide_limit(redis_url: str) -> None:
    limit, processes = 400, 3
    r = connect_redis(redis_url, timeout=5)
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, redis_url, "16", str(limit),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE) for _ in range(processes)]
    try:
        for p in procs:
            assert p.stdout is not None
            assert await asyncio.wait_for(p.stdout.readline(), 30) == b"ready\n"
        await clear_of_window_end(r, 15)
        await r.rpush("go", *["go"] * processes)
        outputs = [json.loads((await asyncio.wait_for(p.communicate(), 60))[0])
                   for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
        await r.aclose()
    results = [tuple(x) for out in outputs for x in out["results"]]
    allowed = [x for x in results if x[0]]
    refused = [x for x in results if not x[0]]
    # Never past the limit, and nothing stranded: every process asked until it was refused.
    assert len(allowed) == limit
    assert {layer for _, layer, _ in refused} == {str(Layer.GLOBAL_REQUESTS)}
    assert not any(degraded for _, _, degraded in results)
    assert sum(out["back"] for out in outputs) == 0  # refused: nothing was left to hold
    # Each process took part, by slices: far fewer borrows than requests.
    assert all(any(x[0] for x in out["results"]) for out in outputs)
    assert sum(out["borrows"] for out in outputs) < limit / 2


async def test_the_hot_key_is_written_per_slice_not_per_request(redis_url: str) -> None:
    r = connect_redis(redis_url, timeout=5)
    await clear_of_window_end(r, 10)
    registry = CollectorRegistry()
    limiter = RedisRateLimiter(r, registry=registry, timeout=5)
    limits = only(global_requests_per_minute=10**6, key_requests_per_minute=10**6)
    requests, concurrency = 800, 16
    seq = iter(range(requests))

    async def worker() -> None:
        for i in seq:
            assert (await limiter.acquire(LimitSubject(f"k{i % 7}", "e", "t"), limits, 0)
                    ).allowed

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        borrows = registry.get_sample_value("rate_limit_global_borrows_total")
        borrowed = registry.get_sample_value("rate_limit_global_borrowed_requests_total")
        assert borrows is not None and borrowed is not None
        # Requests waiting together are borrowed for together, so at least `concurrency` a
        # slice once the gateway is busy.
        assert borrows <= requests / 8, borrows
        assert requests <= borrowed <= await counter(r, GLOBAL_KEY)
        held = limiter.global_lease.share.left
        assert borrowed == requests + held
        assert await limiter.global_lease.give_back(everything=True) == held
        assert await counter(r, GLOBAL_KEY) == requests
    finally:
        await r.aclose()


async def test_a_gateway_that_goes_quiet_hands_its_slack_to_the_others(redis_url: str) -> None:
    r = connect_redis(redis_url, timeout=5)
    await clear_of_window_end(r, 10)
    now = [0.0]
    busy = RedisRateLimiter(r, timeout=5, clock=lambda: now[0])
    other = RedisRateLimiter(r, timeout=5)
    limit = 1000
    limits = only(global_requests_per_minute=limit)
    try:
        async def burst(n: int, start: int) -> None:
            async def one(i: int) -> None:
                assert (await busy.acquire(LimitSubject(f"k{i}", "e", "t"), limits, 0)).allowed
            for i in range(start, start + n, 20):
                await asyncio.gather(*(one(j) for j in range(i, min(i + 20, start + n))))
                now[0] += 0.002  # 10,000 requests a second, as its clock says

        await burst(300, 0)
        slack = busy.global_lease.share.left
        assert slack > 0  # a busy gateway borrows ahead
        assert await counter(r, GLOBAL_KEY) == 300 + slack
        assert await busy.global_lease.give_back() == 0  # not idle yet
        now[0] += IDLE_SECONDS
        assert await busy.global_lease.give_back() == slack
        assert await counter(r, GLOBAL_KEY) == 300
        # The other gateway now gets every request the limit has left, and not one more.
        admitted = 0
        while (await other.acquire(LimitSubject(f"x{admitted}", "e", "t"), limits, 0)).allowed:
            admitted += 1
        assert admitted == limit - 300
        refused = await other.acquire(LimitSubject("late", "e", "t"), limits, 0)
        assert refused.layer is Layer.GLOBAL_REQUESTS
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert 0 < refused.retry_after <= 60
    finally:
        await r.aclose()


async def test_refused_at_another_layer_a_request_gives_its_share_back(
        redis_url: str) -> None:
    r = connect_redis(redis_url, timeout=5)
    await clear_of_window_end(r, 10)
    limiter = RedisRateLimiter(r, timeout=5)
    limits = only(global_requests_per_minute=100, key_requests_per_minute=2)
    subject = LimitSubject("k", "e", "t")
    try:
        decisions = [await limiter.acquire(subject, limits, 0) for _ in range(5)]
        assert [d.allowed for d in decisions] == [True, True, False, False, False]
        assert {d.layer for d in decisions[2:]} == {Layer.KEY_REQUESTS}
        assert decisions[0].headers["x-ratelimit-remaining-requests"] == "1"  # the key's
        share = limiter.global_lease.share
        # Two admitted: what was granted is those two and what this gateway still holds.
        assert await counter(r, GLOBAL_KEY) == 2 + share.left
    finally:
        await r.aclose()


async def test_a_gateway_returns_its_slack_when_it_stops_and_the_limit_holds_across_it(
        platform: Platform, redis_url: str) -> None:
    p = platform
    r = connect_redis(redis_url, timeout=5)

    async def stop_gateway() -> None:
        assert p.gateway_runner is not None
        await p.gateway_runner.cleanup()
        p.gateway_runner = None

    try:
        await clear_of_window_end(r, 30)
        await p.start_gateway(global_requests_per_minute=1000)
        await p.add_node()
        await p.routable(1)
        async with aiohttp.ClientSession() as s:
            assert [await chat_scope(p, s) for _ in range(5)] == [(200, None)] * 5
        held = p.gw.limiter.global_lease.share.left  # borrowed ahead, a few at a time
        assert await counter(r, GLOBAL_KEY) == 5 + held
        await stop_gateway()
        assert await counter(r, GLOBAL_KEY) == 5  # handed back as it stopped

        # Another gateway, a tighter limit, the same window: 5 are spent already.
        await p.start_gateway(global_requests_per_minute=12)
        async with aiohttp.ClientSession() as s:
            answers = [await chat_scope(p, s) for _ in range(9)]
        assert answers == [(200, None)] * 7 + [(429, "global_requests")] * 2, answers
        await stop_gateway()
        assert await counter(r, GLOBAL_KEY) == 12
    finally:
        await r.aclose()
