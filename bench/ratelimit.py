"""Rate limiter benchmark: acquire + settle throughput and latency against an embedded Redis.

Starts its own redis-server (or uses REDIS_URL with --external). Prints figures; it is not a
test. `python bench/ratelimit.py [--requests 20000] [--external]`.

Each operation is what the gateway does per request: one `acquire` (one EVALSHA checking every
configured layer) and one `settle` (one EVALSHA, skipped by the limiter when nothing needs
settling). A PING loop gives the floor: one bare round trip on the same client.

Besides the client's view (operations/s, latency), each case at concurrency 32 prints what it
cost Redis, from Redis's own counters: its CPU (`INFO cpu`, user + system, which includes
reading and writing the sockets) and the time inside the scripts (`INFO commandstats`, reset
before the case), in microseconds per request, the commands run per request (inside the
scripts too), and the requests/s one Redis core would carry at that cost. Redis's CPU is the
platform's ceiling: every gateway shares it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from services.gateway.ratelimit import (
    Limits,
    LimitSubject,
    RedisRateLimiter,
    connect_redis,
)
from services.gateway.ratelimit.limits import BudgetCap, Check, Layer
from services.infra.devstack import DevStack
from services.infra.pipelined_cluster import PipelinedCluster
from services.infra.pipelined_redis import PipelinedRedis
from services.infra.redis_cluster_stack import RedisClusterStack

DAY_MS = 86_400_000


def budgets() -> tuple[BudgetCap, ...]:
    """A spend budget at each of the three scopes, over today (UTC)."""
    start = int(time.time() * 1000) // DAY_MS * DAY_MS
    return tuple(BudgetCap(layer, 10**18, start + DAY_MS, start) for layer in (
        Layer.KEY_BUDGET, Layer.ENVIRONMENT_BUDGET, Layer.TENANT_BUDGET))


async def nothing_spent(_: LimitSubject, checks: Sequence[Check]) -> list[int]:
    """Billing's records for seeding a budget's counter: a bench starts from none."""
    return [0] * len(checks)


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


@dataclass
class RedisCost:
    cpu_us: float
    """Redis's CPU (user + system) per request."""
    script_us: float
    """Time inside the limiter's scripts per request (commandstats' EVALSHA, which includes
    the commands the scripts call; those are counted under their own names too)."""
    calls: dict[str, float]
    """Commands per request, by name, most first."""


def acquire_settle_op(limiter: RedisRateLimiter, limits: Limits, *, wait: bool
                      ) -> Callable[[int], Awaitable[None]]:
    """What the gateway does per request: acquire, then settle (`wait`: for Redis's answer;
    else as the gateway does once its response has gone, without waiting)."""
    async def op(i: int) -> None:
        subject = SUBJECTS[i % len(SUBJECTS)]
        d = await (limiter.acquire(subject, limits, 200, 2_000, 20) if limits.budgets
                   else limiter.acquire(subject, limits, 200))
        if not d.allowed or d.degraded or d.reservation is None:
            raise RuntimeError(f"unexpected decision: {d}")
        if wait:
            await limiter.settle(d.reservation, 150)
        else:
            limiter.settle_nowait(d.reservation, 150)
    return op


async def redis_counters(clients: Sequence[Any]) -> tuple[float, dict[str, tuple[int, int]]]:
    """CPU seconds and commandstats, summed over `clients` (a cluster's primaries)."""
    used, summed = 0.0, dict[str, tuple[int, int]]()
    for client in clients:
        cpu = await client.info("cpu")
        stats = await client.info("commandstats")
        used += float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        for name, v in stats.items():
            calls, usec = summed.get(name.removeprefix("cmdstat_"), (0, 0))
            summed[name.removeprefix("cmdstat_")] = (calls + int(v["calls"]),
                                                     usec + int(v["usec"]))
    return used, summed


async def measured(clients: Sequence[Any], work: Awaitable[tuple[float, float, float]],
                   requests: int) -> tuple[tuple[float, float, float], RedisCost]:
    for client in clients:
        await client.config_resetstat()
    cpu_before, _ = await redis_counters(clients)
    result = await work
    cpu_after, stats = await redis_counters(clients)
    stats.pop("config|resetstat", None)
    stats.pop("info", None)
    calls = {name: c / requests for name, (c, _) in
             sorted(stats.items(), key=lambda kv: -kv[1][0])}
    return result, RedisCost(
        cpu_us=(cpu_after - cpu_before) * 1e6 / requests,
        script_us=sum(stats.get(s, (0, 0))[1] for s in ("evalsha", "eval")) / requests,
        calls=calls)


async def bench(url: str, total: int) -> None:
    client = connect_redis(url, timeout=5, max_connections=64)
    limiter = RedisRateLimiter(client, timeout=5, budget_spent=nothing_spent)

    every_layer_and_budgets = replace(EVERY_LAYER, budgets=budgets())

    async def ping(_: int) -> None:
        await client.ping()

    def acquire_settle(limits: Limits) -> Callable[[int], Awaitable[None]]:
        return acquire_settle_op(limiter, limits, wait=True)

    cases: list[tuple[str, Callable[[int], Awaitable[None]]]] = [
        ("PING (one bare round trip)", ping),
        # No token layer and no concurrency limit: nothing to settle, settle costs nothing.
        ("acquire+settle, 3 request layers", acquire_settle(REQUESTS_ONLY)),
        ("acquire+settle, all 9 layers", acquire_settle(EVERY_LAYER)),
        ("acquire+settle, 9 layers + 3 budgets", acquire_settle(every_layer_and_budgets)),
    ]
    # Warm: scripts loaded, pool open, every subject's budget counters seeded.
    await run(acquire_settle(every_layer_and_budgets), 2 * len(SUBJECTS), 8)
    print(f"{'case':<38} {'conc':>4} {'ops/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    costs: list[tuple[str, RedisCost]] = []
    for name, op in cases:
        for concurrency in (1, 32):
            n = total if concurrency > 1 else total // 4
            if concurrency > 1:
                (ops, p50, p99), cost = await measured([client], run(op, n, concurrency), n)
                costs.append((name, cost))
            else:
                ops, p50, p99 = await run(op, n, concurrency)
            print(f"{name:<38} {concurrency:>4} {ops:>10,.0f} {p50 * 1000:>8.3f} "
                  f"{p99 * 1000:>8.3f}")
    print()
    print("What each request cost Redis (concurrency 32):")
    print_costs(costs)
    await client.aclose()


def print_costs(costs: Sequence[tuple[str, RedisCost]]) -> None:
    print(f"{'case':<38} {'CPU us':>7} {'script us':>9} {'req/s per core':>15}  commands")
    for name, cost in costs:
        commands = ", ".join(f"{c} {n:.2g}" for c, n in list(cost.calls.items())[:6])
        print(f"{name:<38} {cost.cpu_us:>7.1f} {cost.script_us:>9.1f} "
              f"{1e6 / cost.cpu_us:>15,.0f}  {commands}")


async def as_the_gateway(label: str, url: str, info_urls: Sequence[str], total: int, *,
                         slices: bool = False) -> None:
    """Every layer on, through the client the gateway runs (one pipelined connection per
    Redis primary; settles sent without waiting, batched per slot as SETTLE_MANY), on one
    Redis or on a cluster, whose CPU is summed over its primaries."""
    hot: PipelinedRedis | PipelinedCluster = (
        PipelinedCluster(url, timeout=5) if len(info_urls) > 1 else PipelinedRedis(url, timeout=5))
    infos = [connect_redis(u, timeout=5) for u in info_urls]
    limiter = RedisRateLimiter(hot, timeout=5, budget_spent=nothing_spent, slices=slices)
    every_layer_and_budgets = replace(EVERY_LAYER, budgets=budgets())
    if slices:
        label += ", slices"

    def acquire_settle(limits: Limits) -> Callable[[int], Awaitable[None]]:
        return acquire_settle_op(limiter, limits, wait=False)

    async def drained(work: Awaitable[tuple[float, float, float]]
                      ) -> tuple[float, float, float]:
        result = await work
        await asyncio.sleep(0)  # the last turn's settles leave
        await hot.ping()  # answered after them: each connection keeps its order
        return result

    await run(acquire_settle(every_layer_and_budgets), 2 * len(SUBJECTS), 8)
    costs = []
    for name, limits in (("all 9 layers", EVERY_LAYER),
                         ("9 layers + 3 budgets", every_layer_and_budgets)):
        (ops, _, _), cost = await measured(
            infos, drained(run(acquire_settle(limits), total, 32)), total)
        costs.append((f"{label}, {name}", cost))
        print(f"{label}, {name}: {ops:,.0f} acquire+settle/s at concurrency 32")
    print_costs(costs)
    if len(infos) > 1:
        for name, cost in costs:
            print(f"{name}: {len(infos)} primaries carry about "
                  f"{len(infos) * 1e6 / cost.cpu_us:,.0f} requests/s at one core each")
    await limiter.global_lease.give_back(everything=True)
    await limiter.counter_leases.give_back(everything=True)
    for client in infos:
        await client.aclose()
    await hot.aclose()


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
        print()
        print("As the gateway runs it (pipelined, settles batched), every layer on:")
        for slices in (False, True):
            asyncio.run(as_the_gateway("one Redis", stack.urls.redis_url,
                                       [stack.urls.redis_url], args.requests, slices=slices))
        cluster = RedisClusterStack(Path(tmp) / "cluster", replicas=0)
        cluster.start()
        try:
            primaries = [s.url for s in cluster.servers]
            for slices in (False, True):
                asyncio.run(as_the_gateway("cluster of 3", cluster.url, primaries,
                                           args.requests, slices=slices))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
