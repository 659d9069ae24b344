"""The pipelined Redis client against a real Redis: ordering, errors, outages, recovery."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.infra.devstack import RedisServer, free_port
from services.infra.pipelined_redis import PipelinedRedis


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[PipelinedRedis]:
    c = PipelinedRedis(redis_url, timeout=1.0)
    yield c
    await c.aclose()


async def test_concurrent_commands_get_their_own_replies(client: PipelinedRedis) -> None:
    await client.execute("SET", "k", "v")
    replies = await asyncio.gather(*(client.execute("INCRBY", f"n{i % 7}", i)
                                     for i in range(500)))
    totals: dict[int, int] = {}
    for i, reply in enumerate(replies):
        totals[i % 7] = totals.get(i % 7, 0) + i
        assert reply == totals[i % 7]  # each caller saw the running total after its own add
    assert await client.execute("GET", "k") == b"v"
    assert await client.ping()


async def test_scripts_and_errors(client: PipelinedRedis) -> None:
    sha = await client.script_load("return tonumber(ARGV[1]) + #KEYS")
    assert await client.evalsha(sha, 2, "a", "b", 40) == 42
    with pytest.raises(NoScriptError):
        await client.evalsha("0" * 40, 0)
    with pytest.raises(ResponseError):
        await client.execute("INCR")  # wrong number of arguments
    assert await client.execute("INCR", "after-errors") == 1  # the connection is still good


async def test_fire_and_forget(client: PipelinedRedis, redis_url: str) -> None:
    await client.ping()
    for i in range(100):
        client.execute_nowait("RPUSH", "list", i)
    assert await client.execute("LLEN", "list") == 100  # sent in order, before this one


async def test_unreachable_redis_fails_fast() -> None:
    c = PipelinedRedis(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    with pytest.raises(RedisConnectionError):
        await c.ping()
    assert c.execute_nowait("PING") is None


async def test_frozen_redis_times_out_then_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        c = PipelinedRedis(f"redis://127.0.0.1:{server.port}/0", timeout=0.3)
        assert await c.ping()
        assert server.proc is not None and server.proc._proc is not None
        pid = server.proc._proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            results = await asyncio.gather(*(c.execute("INCR", "x") for _ in range(5)),
                                           return_exceptions=True)
            assert all(isinstance(r, RedisTimeoutError) for r in results)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await c.ping()  # reconnected by itself
        server.stop()
        with pytest.raises(RedisConnectionError):
            await c.ping()
        server.start()
        assert await c.ping()
        await c.aclose()
    finally:
        server.stop()


async def test_database_and_password_in_the_url(redis_url: str) -> None:
    plain = aioredis.from_url(redis_url)
    await plain.config_set("requirepass", "s3cret")
    try:
        base = redis_url.replace("redis://", "redis://:s3cret@").rsplit("/", 1)[0]
        c = PipelinedRedis(f"{base}/3", timeout=1.0)
        await c.execute("SET", "where", "db3")
        other = aioredis.from_url(f"{base}/3")
        assert await other.get("where") == b"db3"
        await other.aclose()
        await c.aclose()
        bad = PipelinedRedis(redis_url, timeout=1.0)
        with pytest.raises(ResponseError):
            await bad.execute("GET", "where")
        await bad.aclose()
    finally:
        authed = aioredis.from_url(redis_url.replace("redis://", "redis://:s3cret@"))
        await authed.config_set("requirepass", "")
        await authed.aclose()
        await plain.aclose()
