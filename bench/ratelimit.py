"""Rate limiter benchmark: acquire + settle throughput and latency against an embedded Redis.

Starts its own redis-server (or uses REDIS_URL with --external). Prints figures; it is not a
test. `python bench/ratelimit.py [--requests 20000] [--external]`.

Each operation is what the gateway does per request: one `acquire` (one EVALSHA checking every
configured layer) and one `settle` (one EVALSHA, skipped by the limiter when nothing needs
settling). A PING loop gives the floor: one bare round trip on the same client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.gateway.ratelimit import (
    Limits,
    LimitSubject,
    RedisRateLimiter,
    connect_redis,
)
from services.infra.devstack import DevStack

EVERY_LAYER = Limits(key_requests_per_minute=10**9, global_requests_per_minute=10**12,
                     key_tokens_per_minute=10**12, key_tokens_per_day=10**13,
                     environment_tokens_per_minute=10**12, environment_tokens_per_day=10**13,
                     key_concurrency=10**6)
REQUESTS_ONLY = Limits(key_requests_per_minute=10**9)
SUBJECTS = [LimitSubject(f"key-{i}", f"env-{i % 50}", f"tenant-{i % 10}") for i in range(1000)]


def percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


async def run(op: Callable[[int], Awaitable[None]], total: int, concurrency: int
              ) -> tuple[float, float, float]:
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return total / elapsed, percentile(latencies, 0.5), percentile(latencies, 0.99)


async def bench(url: str, total: int) -> None:
    client = connect_redis(url, timeout=5, max_connections=64)
    limiter = RedisRateLimiter(client, timeout=5)

    async def ping(_: int) -> None:
        await client.ping()

    def acquire_settle(limits: Limits) -> Callable[[int], Awaitable[None]]:
        async def op(i: int) -> None:
            d = await limiter.acquire(SUBJECTS[i % len(SUBJECTS)], limits, 200)
            if not d.allowed or d.degraded or d.reservation is None:
                raise RuntimeError(f"unexpected decision: {d}")
            await limiter.settle(d.reservation, 150)
        return op

    cases: list[tuple[str, Callable[[int], Awaitable[None]]]] = [
        ("PING (one bare round trip)", ping),
        # No token layer and no concurrency limit: nothing to settle, settle costs nothing.
        ("acquire+settle, 3 request layers", acquire_settle(REQUESTS_ONLY)),
        ("acquire+settle, all 9 layers", acquire_settle(EVERY_LAYER)),
    ]
    await run(acquire_settle(EVERY_LAYER), 500, 8)  # warm: scripts loaded, pool open
    print(f"{'case':<36} {'conc':>4} {'ops/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for name, op in cases:
        for concurrency in (1, 32):
            n = total if concurrency > 1 else total // 4
            ops, p50, p99 = await run(op, n, concurrency)
            print(f"{name:<36} {concurrency:>4} {ops:>10,.0f} {p50 * 1000:>8.3f} "
                  f"{p99 * 1000:>8.3f}")
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--external", action="store_true", help="use $REDIS_URL")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop  # the services run on it when it is installed

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    loop_name = type(asyncio.new_event_loop()).__module__.split(".")[0]
    print(f"event loop: {loop_name}, cpus: {os.cpu_count()}")
    if args.external:
        asyncio.run(bench(os.environ["REDIS_URL"], args.requests))
        return
    with tempfile.TemporaryDirectory() as tmp, \
            DevStack(Path(tmp), postgres=False, nats=False) as stack:
        asyncio.run(bench(stack.urls.redis_url, args.requests))


if __name__ == "__main__":
    main()
