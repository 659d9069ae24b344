"""The limiter on a real Redis Cluster (3 primaries, a replica each, from the embedded
redis-server): every layer exact across gateway processes, the platform-wide layer exact by
slices, settles and reconciling spread over slots, and a primary killed under load.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio.cluster import RedisCluster

from services.domain.catalog import hash_api_key
from services.gateway.gateway import BUDGET_RECONCILER
from services.gateway.ratelimit import Layer, LimitSubject, RedisRateLimiter
from services.gateway.ratelimit.limits import MINUTE_MS, Check, Kind, window_start
from services.gateway.ratelimit.planning import redis_key
from services.infra.cluster_slots import key_slot
from services.infra.pipelined_cluster import PipelinedCluster
from services.infra.redis_cluster_stack import RedisClusterStack
from services.infra.settings import Secret
from tests.helpers import eventually
from tests.integration.gateway_fixtures import Platform, chat_scope
from tests.integration.gateway_fixtures import platform as platform
from tests.integration.test_ratelimit_redis import held, only

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterStack]:
    stack = RedisClusterStack(tmp_path_factory.mktemp("cluster"))
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
async def rc(cluster: RedisClusterStack) -> AsyncIterator[RedisCluster]:
    """redis-py's cluster client, to look at what the limiter wrote."""
    client = RedisCluster.from_url(cluster.url)
    await clear_of_window_end(client, 15)
    yield client
    await client.aclose()


async def clear_of_window_end(client: RedisCluster, margin: float) -> None:
    async def roomy() -> bool:
        seconds, micros = await client.time(target_nodes=RedisCluster.RANDOM)
        now = seconds * 1000 + micros // 1000
        return window_start(now, MINUTE_MS) + MINUTE_MS - now > margin * 1000

    await eventually(roomy, timeout=margin + 5, what="a minute with room")


def tenants_on_every_primary(prefix: str, cluster: RedisClusterStack, count: int = 3
                             ) -> list[str]:
    """`count` tenant ids whose keys live on `count` different primaries."""
    found: dict[int, str] = {}
    for i in range(10_000):
        tenant = f"{prefix}{i}"
        primary = cluster.primary_for(f"x:{{{tenant}}}").port
        found.setdefault(primary, tenant)
        if len(found) == count:
            return list(found.values())
    raise AssertionError("tenants do not spread over the primaries")


async def counter(client: RedisCluster, key: str) -> int:
    return int(await client.hget(key, "n") or 0)


# One gateway process on the cluster: says "ready", waits for the starting gun, then fires
# `attempts` acquires at each of the cases' subjects, `concurrency` at a time, and holds every
# lease (so the concurrency layer fills up exactly like the others).
WORKER = """
import asyncio, json, sys
from redis.asyncio.cluster import RedisCluster
from services.gateway.ratelimit import LimitSubject, Limits, RedisRateLimiter
from services.infra.pipelined_cluster import PipelinedCluster

async def main(url, cases, attempts, concurrency):
    client = PipelinedCluster(url, timeout=10)
    limiter = RedisRateLimiter(client, timeout=10)
    plans = []
    for name, tenant, vary_key, given in json.loads(cases):
        given = {"environment_requests_per_minute": None, "tenant_requests_per_minute": None,
                 **given}
        plans.append((name, tenant, vary_key, Limits(**given)))
    gate = RedisCluster.from_url(url)
    print("ready", flush=True)
    await gate.blpop(["go"], timeout=30)
    jobs = iter([(plan, i) for i in range(attempts) for plan in plans])
    results = []

    async def worker():
        for (name, tenant, vary_key, limits), i in jobs:
            key = f"k{sys.argv[5]}-{i}" if vary_key else "hot"
            d = await limiter.acquire(LimitSubject(key, "env", tenant), limits, 10)
            results.append((name, d.allowed, str(d.layer), d.degraded))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    print(json.dumps(results), flush=True)
    await gate.aclose()
    await client.aclose()

asyncio.run(main(*sys.argv[1:3], *map(int, sys.argv[3:5])))
"""


async def run_workers(script: str, cluster: RedisClusterStack, rc: RedisCluster,
                      processes: int, *args: str) -> list[str]:
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, cluster.url, *args, str(n),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE) for n in range(processes)]
    try:
        for p in procs:
            assert p.stdout is not None
            assert await asyncio.wait_for(p.stdout.readline(), 30) == b"ready\n"
        await rc.rpush("go", *["go"] * processes)
        outputs = [(await asyncio.wait_for(p.communicate(), 90))[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    assert all(p.returncode == 0 for p in procs)
    return outputs


async def test_every_layer_is_exact_across_two_gateways_on_the_cluster(
        cluster: RedisClusterStack, rc: RedisCluster) -> None:
    limit, attempts = 60, 50  # two processes ask 100 times at each case
    a, b, c = tenants_on_every_primary("exact-", cluster)
    d = tenants_on_every_primary("exact-d-", cluster, 1)[0]
    cases = [  # name, tenant, a key per request, the one layer on
        ("requests", a, False, {"key_requests_per_minute": limit}),
        ("tokens", b, False, {"key_tokens_per_minute": limit * 10}),  # 10 tokens each
        ("concurrency", c, False, {"key_concurrency": limit}),
        ("tenant", d, True, {"tenant_requests_per_minute": limit}),
    ]
    outputs = await run_workers(WORKER, cluster, rc, 2, json.dumps(cases), str(attempts), "8")
    results = [x for out in outputs for x in json.loads(out)]
    assert not any(degraded for *_, degraded in results)
    layers = {"requests": "key_requests", "tokens": "key_tokens_minute",
              "concurrency": "key_concurrency", "tenant": "tenant_requests"}
    for name, *_ in cases:
        mine = [x for x in results if x[0] == name]
        assert len(mine) == 2 * attempts
        assert sum(allowed for _, allowed, _, _ in mine) == limit, name
        assert {layer for _, ok, layer, _ in mine if not ok} == {layers[name]}
        # Both gateways took part.
        assert all(any(x[0] == name and x[1] for x in json.loads(out)) for out in outputs)
    hot = {t: LimitSubject("hot", "env", t) for t in (a, b, c)}
    assert await counter(rc, redis_key(Layer.KEY_REQUESTS, hot[a])) == limit
    assert await counter(rc, redis_key(Layer.KEY_TOKENS_MINUTE, hot[b])) == limit * 10
    assert await rc.zcard(redis_key(Layer.KEY_CONCURRENCY, hot[c])) == limit
    assert await counter(rc, redis_key(Layer.TENANT_REQUESTS, LimitSubject("", "", d))) == limit
    # The three cases really ran on three different primaries.
    assert len({cluster.primary_for(redis_key(Layer.KEY_REQUESTS, hot[t])).port
                for t in (a, b, c)}) == 3


GLOBAL_WORKER = """
import asyncio, json, sys
from redis.asyncio.cluster import RedisCluster
from services.gateway.ratelimit import LimitSubject, Limits, RedisRateLimiter
from services.infra.pipelined_cluster import PipelinedCluster

async def main(url, concurrency, limit, n):
    client = PipelinedCluster(url, timeout=10)
    limiter = RedisRateLimiter(client, timeout=10)
    limits = Limits(global_requests_per_minute=limit, key_requests_per_minute=limit)
    gate = RedisCluster.from_url(url)
    print("ready", flush=True)
    await gate.blpop(["go"], timeout=30)
    results, seq = [], iter(range(10**9))

    async def worker():
        while True:
            i = next(seq)
            d = await limiter.acquire(LimitSubject(f"k{i}", f"e{i}", f"t{n}-{i}"), limits, 0)
            results.append((d.allowed, str(d.layer), d.degraded))
            if not d.allowed:
                return

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    back = await limiter.global_lease.give_back(everything=True)
    print(json.dumps({"results": results, "back": back}), flush=True)
    await gate.aclose()
    await client.aclose()

asyncio.run(main(sys.argv[1], *map(int, sys.argv[2:])))
"""


async def test_the_platform_wide_layer_is_exact_by_slices_on_the_cluster(
        cluster: RedisClusterStack, rc: RedisCluster) -> None:
    limit = 300
    await rc.delete("ratelimit:global:minute")
    outputs = await run_workers(GLOBAL_WORKER, cluster, rc, 2, "12", str(limit))
    results = [tuple(x) for out in outputs for x in json.loads(out)["results"]]
    assert sum(1 for x in results if x[0]) == limit
    assert {layer for ok, layer, _ in results if not ok} == {"global_requests"}
    assert not any(degraded for *_, degraded in results)
    assert await counter(rc, "ratelimit:global:minute") == limit
    # Every request was a tenant of its own: their keys spread over every primary.
    assert len({key_slot(f"{{t0-{i}}}") for i in range(100)}) > 50


async def test_settles_and_reconciling_spread_over_slots(
        cluster: RedisClusterStack, rc: RedisCluster) -> None:
    client = PipelinedCluster(cluster.url, timeout=5)
    limiter = RedisRateLimiter(client, timeout=5)
    limits = only(key_tokens_per_minute=10_000)
    subjects = [LimitSubject("k", "e", t) for t in tenants_on_every_primary("settle-", cluster)]
    try:
        reservations = [held((await limiter.acquire(s, limits, 500)).reservation)
                        for s in subjects for _ in range(4)]
        # Settled in one turn of the loop: one SETTLE_MANY per slot, not one for all.
        for i, reservation in enumerate(reservations):
            limiter.settle_nowait(reservation, i)

        async def settled() -> bool:
            held_now = [await rc.zcard(redis_key(Layer.KEY_CONCURRENCY, s)) for s in subjects]
            return not any(held_now)

        await eventually(settled, timeout=30, what="every lease settled")
        for n, s in enumerate(subjects):
            assert await counter(rc, redis_key(Layer.KEY_TOKENS_MINUTE, s)) == sum(
                range(4 * n, 4 * n + 4))
        # Reconciling budgets of tenants on every primary: one script per slot.
        checks = [budget_check(s) for s in subjects]
        for check in checks:
            await rc.hset(check.key, mapping={"w": check.window_ms, "n": 100})
        added = await limiter.reconcile(checks, [150, 100, 400])
        assert added == [50, 0, 300]
        assert [await counter(rc, c.key) for c in checks] == [150, 100, 400]
    finally:
        await client.aclose()


def budget_check(subject: LimitSubject) -> Check:
    """The tenant's monthly budget, in a period that ends in 30 days."""
    end = (int(time.time()) // 86_400 + 30) * 86_400_000
    return Check(Layer.TENANT_BUDGET, Kind.MONEY, redis_key(Layer.TENANT_BUDGET, subject),
                 10**12, end, 0)


async def test_a_primary_killed_under_load_fails_over_to_its_replica(tmp_path: Path) -> None:
    stack = RedisClusterStack(tmp_path / "cluster")
    stack.start()
    # A deadline a busy machine's healthy primaries always meet: the dead one refuses at once.
    client = PipelinedCluster(stack.url, timeout=1.0)
    limiter = RedisRateLimiter(client, timeout=1.0)
    try:
        tenants = tenants_on_every_primary("fo-", stack)
        victim = stack.primary_for(f"x:{{{tenants[0]}}}")
        replica = stack.replica_of(victim)
        # Far from every limit: whatever happens, no request should be refused.
        limits = only(key_requests_per_minute=10**6, tenant_requests_per_minute=10**6,
                      key_tokens_per_minute=10**9)
        log: list[tuple[float, str, bool, bool]] = []
        stop = asyncio.Event()

        async def load(n: int) -> None:
            while not stop.is_set():
                tenant = tenants[n % len(tenants)]
                d = await limiter.acquire(LimitSubject("k", "e", tenant), limits, 10)
                log.append((time.monotonic(), tenant, d.allowed, d.degraded))
                if d.reservation is not None:
                    limiter.settle_nowait(d.reservation, 5)
                await asyncio.sleep(0.002)

        workers = [asyncio.ensure_future(load(n)) for n in range(6)]

        async def calls_since(t: float, tenant: str) -> bool:
            return any(at > t and who == tenant and not degraded
                       for at, who, _, degraded in log)

        await eventually(lambda: calls_since(0, tenants[0]), timeout=30, what="load on")
        killed_at = time.monotonic()
        victim.kill()
        await asyncio.to_thread(stack.wait_promoted, replica)
        promoted_at = time.monotonic()
        # Back on Redis, the victim's tenant included, once the replica took over.
        await eventually(lambda: calls_since(promoted_at, tenants[0]), timeout=30,
                         what="the victim's tenant decided by redis again")
        back_at = next(at for at, who, _, degraded in log
                       if at > promoted_at and who == tenants[0] and not degraded)
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*workers)
        owner = stack.primary_for(f"x:{{{tenants[0]}}}")
        degraded_at_end = limiter.degraded  # the dead primary is no longer one of them
    finally:
        await client.aclose()
        stack.stop()
    before = [x for x in log if x[0] < killed_at]
    after = [x for x in log if x[0] > back_at + 1.0]  # the limiter's cool-down is 1 s
    assert before and after
    # Nothing refused, ever: while the primary was gone the local policy decided its
    # tenants' requests, and only theirs: the other primaries' tenants stayed exact.
    assert all(allowed for _, _, allowed, _ in log)
    assert not any(degraded for *_, degraded in before + after)
    assert any(degraded for at, *_, degraded in log if killed_at <= at <= back_at)
    assert not any(degraded for _, who, _, degraded in log if who != tenants[0])
    # Decided by redis again soon after the promotion (the slot map is fetched again within
    # a deadline of the first failure, and the dead primary probed again after the
    # limiter's cool-down), with slack for a busy machine.
    assert back_at - promoted_at < 10, back_at - promoted_at
    assert not degraded_at_end
    # Every tenant is on redis again, the victim's on its promoted replica.
    assert {who for _, who, _, _ in after} == set(tenants)
    assert owner is replica


async def test_a_gateway_keeps_its_redis_data_on_the_cluster(
        platform: Platform, cluster: RedisClusterStack, rc: RedisCluster) -> None:
    p = platform
    seeds = ",".join(f"127.0.0.1:{s.port}" for s in cluster.servers[:2])
    await p.start_gateway(redis_cluster=True, redis_url=Secret(f"redis://{seeds}"),
                          environment_requests_per_minute=6, global_requests_per_minute=1000)
    await p.add_node()
    await p.routable(1)

    async with aiohttp.ClientSession() as s:
        assert (await chat_scope(p, s, "sk-not-a-real-key"))[0] == 401
        answers = [await chat_scope(p, s) for _ in range(8)]
        async with s.get(f"{p.gateway_url}/ready") as resp:
            ready = await resp.json()
    assert answers == [(200, None)] * 6 + [(429, "environment_requests")] * 2, answers
    assert ready["checks"]["redis"] == "ok"
    subject = LimitSubject(str(p.key.key_id), str(p.environment_id), str(p.tenant_id))
    assert await counter(rc, redis_key(Layer.ENVIRONMENT_REQUESTS, subject)) == 6
    # The authenticator's shared data: the key's cache entry and the failure count.
    assert await rc.exists(f"api_key:{hash_api_key(p.key.plaintext)}") == 1
    assert int(await rc.get("authfail:127.0.0.1") or 0) >= 1
    # The budget reconciler's turn, sweep (a SCAN of every primary) and reconcile run there.
    assert p.gateway_app is not None
    reconciler = p.gateway_app[BUDGET_RECONCILER]
    assert await reconciler.sweep_once() == 0
    assert await reconciler.reconcile_once(datetime.now(UTC)) == 0


# One gateway process with RATELIMIT_SLICES: each case's workers ask until refused (so what a
# process holds is not stranded while another asks), then the process hands back what it
# holds, as a gateway does when it stops.
SLICED_WORKER = """
import asyncio, json, sys
from redis.asyncio.cluster import RedisCluster
from services.gateway.ratelimit import LimitSubject, Limits, RedisRateLimiter
from services.infra.pipelined_cluster import PipelinedCluster

async def main(url, cases, concurrency, n):
    client = PipelinedCluster(url, timeout=10)
    limiter = RedisRateLimiter(client, timeout=10, slices=True)
    gate = RedisCluster.from_url(url)
    print("ready", flush=True)
    await gate.blpop(["go"], timeout=30)
    results = []
    for name, tenant, vary_key, given in json.loads(cases):
        limits = Limits(**{"environment_requests_per_minute": None,
                           "tenant_requests_per_minute": None, **given})
        seq = iter(range(10**9))

        async def worker():
            while True:
                i = next(seq)
                key = f"k{n}-{i}" if vary_key else "hot"
                d = await limiter.acquire(LimitSubject(key, "env", tenant), limits, 10)
                results.append((name, d.allowed, str(d.layer), d.degraded))
                if not d.allowed:
                    return

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    await limiter.counter_leases.give_back(everything=True)
    print(json.dumps(results), flush=True)
    await gate.aclose()
    await client.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


async def test_slices_are_exact_across_two_gateways_on_the_cluster(
        cluster: RedisClusterStack, rc: RedisCluster) -> None:
    limit = 80
    a, b, c = tenants_on_every_primary("sliced-", cluster)
    d = tenants_on_every_primary("sliced-d-", cluster, 1)[0]
    cases = [
        ("requests", a, False, {"key_requests_per_minute": limit}),
        ("tokens", b, False, {"key_tokens_per_minute": limit * 10}),  # 10 tokens each
        ("concurrency", c, False, {"key_concurrency": limit, "key_requests_per_minute": 10**6}),
        ("tenant", d, True, {"tenant_requests_per_minute": limit}),
    ]
    outputs = await run_workers(SLICED_WORKER, cluster, rc, 2, json.dumps(cases), "8")
    results = [x for out in outputs for x in json.loads(out)]
    assert not any(degraded for *_, degraded in results)
    admitted = {name: sum(1 for x in results if x[0] == name and x[1]) for name, *_ in cases}
    # Exact where a request takes one: nothing is admitted past the limit, and a gateway
    # refused holds nothing. Tokens (10 a request) may strand less than a request's worth in
    # each gateway, which the other cannot spend: at most one request less per gateway.
    assert admitted["requests"] == admitted["tenant"] == admitted["concurrency"] == limit
    assert limit - 2 <= admitted["tokens"] <= limit
    hot = {t: LimitSubject("hot", "env", t) for t in (a, b, c)}
    # Handed back: Redis counts exactly what was admitted.
    assert await counter(rc, redis_key(Layer.KEY_REQUESTS, hot[a])) == limit
    assert await counter(rc, redis_key(Layer.KEY_TOKENS_MINUTE, hot[b])) == \
        admitted["tokens"] * 10
    assert await rc.zcard(redis_key(Layer.KEY_CONCURRENCY, hot[c])) == 0  # slots handed back
    assert await counter(rc, redis_key(Layer.TENANT_REQUESTS, LimitSubject("", "", d))) == limit
