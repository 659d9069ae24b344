"""Exactness across processes: separate gateway processes hammer one key through one Redis."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from services.gateway.ratelimit import connect_redis
from tests.integration.test_ratelimit_redis import clear_of_window_end

ROOT = Path(__file__).resolve().parents[2]

# One gateway process: says "ready", waits for the starting gun (a Redis list, so every
# process starts at once), then fires `attempts` acquires, `concurrency` at a time.
WORKER = """
import asyncio, json, sys
import redis.asyncio as aioredis
from services.gateway.ratelimit import LimitSubject, Limits, RedisRateLimiter, connect_redis

async def main(url, attempts, concurrency, limit):
    client = connect_redis(url, timeout=10, max_connections=concurrency)
    limiter = RedisRateLimiter(client, timeout=10)
    subject = LimitSubject("hot-key", "env", "tenant")
    limits = Limits(key_requests_per_minute=limit, key_tokens_per_minute=limit * 10,
                    key_concurrency=limit)
    gate = aioredis.from_url(url, socket_timeout=None)
    print("ready", flush=True)
    await gate.blpop(["go"], timeout=30)
    pending = iter(range(attempts))
    results = []

    async def worker():
        for _ in pending:
            d = await limiter.acquire(subject, limits, 10)
            results.append((d.allowed, str(d.layer), d.degraded))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    print(json.dumps(results), flush=True)
    await gate.aclose()
    await client.aclose()

asyncio.run(main(sys.argv[1], *map(int, sys.argv[2:])))
"""


async def test_processes_sharing_redis_allow_exactly_the_limit(redis_url: str) -> None:
    limit, processes, attempts = 150, 3, 120
    r = connect_redis(redis_url, timeout=5)
    await clear_of_window_end(r, 4)
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, redis_url, str(attempts), "16", str(limit),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE) for _ in range(processes)]
    try:
        for p in procs:
            assert p.stdout is not None
            assert await asyncio.wait_for(p.stdout.readline(), 20) == b"ready\n"
        await r.rpush("go", *["go"] * processes)
        outputs = [await asyncio.wait_for(p.communicate(), 30) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    results = [tuple(x) for out, _ in outputs for x in json.loads(out)]
    assert all(p.returncode == 0 for p in procs)
    assert len(results) == processes * attempts
    assert not any(degraded for _, _, degraded in results)
    per_process = [sum(a for a, _, _ in json.loads(out)) for out, _ in outputs]
    assert sum(per_process) == limit, per_process
    refused_by = {layer for ok, layer, _ in results if not ok}
    assert refused_by <= {"key_requests", "key_tokens_minute", "key_concurrency"}
    assert int(await r.hget("ratelimit:key:hot-key:minute:{tenant}", "n") or 0) == limit
    assert int(await r.hget("tokens:key:hot-key:minute:{tenant}", "n") or 0) == limit * 10
    assert await r.zcard("ratelimit:key:hot-key:concurrency:{tenant}") == limit
    await r.aclose()
