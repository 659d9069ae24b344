"""The auth path cannot be used to load PostgreSQL (real gateway, PostgreSQL, Redis, NATS):
unknown keys are remembered in Redis, failing client networks are refused before any lookup
(but keys held good in Redis pass), and GET /v1/usage has a limit of its own, a cap on reports
in flight and a statement timeout of its own."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from schemas.subjects import CONTROL, CONTROL_VIEW
from services.domain.catalog import hash_api_key
from services.domain.catalog.api_keys import generate_api_key
from services.gateway.app import create_gateway_app
from services.gateway.auth import TOMBSTONE, UNKNOWN
from services.gateway.gateway import GATEWAY
from services.infra.devstack import free_port
from services.infra.http import DB, REGISTRY
from tests.helpers import eventually
from tests.integration.gateway_fixtures import Platform, platform  # noqa: F401

# Loopback is a trusted proxy by default: the test names its client address in X-Forwarded-For.
THROTTLED_IP = "203.0.113.7"
OTHER_IP = "198.51.100.21"
SOURCES = ("local", "redis", "redis_unknown", "postgres", "postgres_shared")


@pytest.fixture
async def redis_client(platform: Platform) -> AsyncIterator[aioredis.Redis]:  # noqa: F811
    client = aioredis.from_url(platform.servers.redis_url)
    yield client
    await client.aclose()


class Gateway:
    """One gateway app over real TCP, and what its registry says."""

    def __init__(self, app: web.Application, runner: web.AppRunner, url: str) -> None:
        self.app, self.runner, self.url = app, runner, url

    def sample(self, name: str, **labels: str) -> float:
        return self.app[REGISTRY].get_sample_value(name, labels) or 0.0

    def queries(self) -> float:
        """PostgreSQL key lookups this gateway ran (counted where the query is issued)."""
        return self.sample("auth_lookups_total", source="postgres")

    def lookups(self) -> float:
        return sum(self.sample("auth_lookups_total", source=s) for s in SOURCES)

    async def call(self, path: str, key: str | None, ip: str = OTHER_IP,
                   authorization: str | None = None) -> tuple[int, dict[str, Any], Any]:
        headers = {"X-Forwarded-For": ip}
        if authorization is not None:
            headers["Authorization"] = authorization
        elif key is not None:
            headers["Authorization"] = f"Bearer {key}"
        async with aiohttp.ClientSession() as s, s.get(f"{self.url}{path}",
                                                       headers=headers) as r:
            return r.status, await r.json(), r.headers


@pytest.fixture
async def gateways(platform: Platform) -> AsyncIterator[list[Gateway]]:  # noqa: F811
    """Gateways started by `start(**settings)`; all share the platform's Redis."""
    started: list[Gateway] = []
    yield started
    for gw in started:
        await gw.runner.cleanup()


async def start(p: Platform, started: list[Gateway], **overrides: Any) -> Gateway:
    """A gateway that hears only of events the log gets from now on: a key creation or a
    tenant's change it heard of late would tombstone keys in Redis, and the tests here count
    lookups and cache entries."""
    await control_events_delivered(p)
    app = create_gateway_app(p.settings(**overrides))
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    gw = Gateway(app, runner, f"http://127.0.0.1:{port}")
    started.append(gw)
    return gw


# --------------------------------------------------------------------------- unknown keys


async def test_a_flood_of_one_unknown_key_costs_one_query(
        platform: Platform, gateways: list[Gateway],  # noqa: F811
        redis_client: aioredis.Redis) -> None:
    p = platform
    # The flood is about the key cache, not the throttle; and on a busy machine a Redis read
    # that outlasts the usual 0.25 s deadline would skip the cache (as a Redis outage does).
    quiet = {"auth_failure_limit": 0, "ratelimit_redis_timeout": 5.0}
    first = await start(p, gateways, **quiet)
    second = await start(p, gateways, **quiet)
    unknown = generate_api_key()
    answers = await asyncio.gather(*[first.call("/v1/models", unknown) for _ in range(100)])
    assert {status for status, _, _ in answers} == {401}
    assert first.queries() == 1  # concurrent misses share one query; the rest hit caches
    answers = await asyncio.gather(*[second.call("/v1/models", unknown) for _ in range(100)])
    assert {status for status, _, _ in answers} == {401}
    assert second.queries() == 0  # another gateway finds "unknown" in Redis
    assert second.sample("auth_lookups_total", source="redis_unknown") >= 1
    ttl = await redis_client.ttl(f"api_key:{hash_api_key(unknown)}")
    assert 0 < ttl <= 30  # AUTH_UNKNOWN_KEY_CACHE_SECONDS


async def test_an_unknown_key_is_asked_of_postgresql_once_per_ttl(
        platform: Platform, gateways: list[Gateway]) -> None:  # noqa: F811
    gw = await start(platform, gateways, auth_failure_limit=0,
                     auth_unknown_key_cache_seconds=1, auth_local_cache_seconds=0.1)
    unknown = generate_api_key()
    started = time.monotonic()
    tried = 0
    while time.monotonic() - started < 3.5:  # a steady flood for a few TTLs
        status, _, _ = await gw.call("/v1/models", unknown)
        assert status == 401
        tried += 1
    elapsed = time.monotonic() - started
    assert tried > 20
    # Redis forgets it after each TTL (so it is asked again), never sooner.
    assert 2 <= gw.queries() <= elapsed // 1 + 1, (gw.queries(), elapsed)


async def test_a_key_created_after_it_was_tried_works_at_once(
        platform: Platform, gateways: list[Gateway],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    p = platform
    # Both caches would hide the key for minutes: only its creation event can clear them.
    gw = await start(p, gateways, auth_failure_limit=0, auth_local_cache_seconds=300,
                     auth_unknown_key_cache_seconds=300)
    plaintext = generate_api_key()
    for _ in range(2):
        status, _, _ = await gw.call("/v1/models", plaintext)
        assert status == 401
    # The catalog makes this very key (a guess that came true, or a lookup that raced it).
    monkeypatch.setattr("services.domain.catalog.api_keys.generate_api_key", lambda: plaintext)
    made = await p.catalog.create_api_key(p.environment_id, name="tried before")
    assert made.plaintext == plaintext

    async def works() -> bool:
        return (await gw.call("/v1/models", plaintext))[0] == 200

    await eventually(works, timeout=15, what="the new key to authenticate")


# --------------------------------------------------------------------------- failing networks


async def test_a_network_over_the_failure_limit_is_refused_before_any_lookup(
        platform: Platform, gateways: list[Gateway],  # noqa: F811
        redis_client: aioredis.Redis) -> None:
    p = platform
    # A short process cache, so that this gateway reads Redis (and fills it) again soon.
    gw = await start(p, gateways, auth_failure_limit=4, auth_failure_window_seconds=60,
                     auth_local_cache_seconds=0.2)
    good = p.key.plaintext
    await until_cached(gw, redis_client, good)  # known good here, and held good in Redis

    for _ in range(4):  # the first failures keep their 401
        status, body, _ = await gw.call("/v1/models", generate_api_key(), ip=THROTTLED_IP)
        assert status == 401 and body["error"]["type"] == "authentication_error"
    status, body, headers = await gw.call("/v1/models", generate_api_key(), ip=THROTTLED_IP)
    assert status == 429
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "too_many_auth_failures"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["x-ratelimit-scope"] == "auth_failures"

    # Refused without a lookup. Nothing to look up (not a key's shape): from memory, not a
    # single Redis command.
    lookups, queries = gw.lookups(), gw.queries()
    commands = await redis_commands(redis_client)
    for authorization in ("Bearer nonsense", "Basic x"):
        status, _, headers = await gw.call("/v1/models", None, ip=THROTTLED_IP,
                                           authorization=authorization)
        assert status == 429 and int(headers["Retry-After"]) >= 1
    assert await redis_commands(redis_client) == commands
    # A key's shape: one Redis call reads its cache entry with the network's count (a key
    # held good there would pass); refused, it is looked up nowhere, PostgreSQL least of all.
    for _ in range(3):
        status, _, _ = await gw.call("/v1/models", generate_api_key(), ip=THROTTLED_IP)
        assert status == 429
    assert gw.lookups() == lookups and gw.queries() == queries
    # (Redis counts the script's own reads too: two GETs and a PTTL; nothing is written.)
    assert changed(commands, await redis_commands(redis_client)) == {
        "cmdstat_evalsha": 3, "cmdstat_get": 6, "cmdstat_pttl": 3}
    assert gw.sample("auth_throttled_total") == 6
    # No credential at all is not a guess: told what is missing, never throttled.
    status, body, _ = await gw.call("/v1/models", None, ip=THROTTLED_IP)
    assert status == 401 and "didn't provide an API key" in body["error"]["message"]

    # Another network, and a key known good even from the throttled one, are unaffected.
    status, _, _ = await gw.call("/v1/models", generate_api_key(), ip=OTHER_IP)
    assert status == 401
    assert (await gw.call("/v1/models", good, ip=THROTTLED_IP))[0] == 200
    assert (await gw.call("/v1/models", good, ip=OTHER_IP))[0] == 200
    # A key Redis does not hold as good waits like everyone else from there...
    fresh = await p.catalog.create_api_key(p.environment_id, name="fresh")
    assert (await gw.call("/v1/models", fresh.plaintext, ip=THROTTLED_IP))[0] == 429
    # ...until it is in the shared cache (used from another network). Its creation event
    # tombstones the entry when it arrives, so it must have arrived first.
    authenticator = gw.app[GATEWAY].auth
    fresh_hash = hash_api_key(fresh.plaintext)

    async def creation_applied() -> bool:
        return fresh_hash in authenticator._invalidated

    await eventually(creation_applied, timeout=20, what="the key's creation event applied")
    await until_cached(gw, redis_client, fresh.plaintext)

    # The count is shared: another gateway refuses the network too, looking nothing up.
    other = await start(p, gateways, auth_failure_limit=4, auth_failure_window_seconds=60)
    status, _, headers = await other.call("/v1/models", generate_api_key(), ip=THROTTLED_IP)
    assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60
    assert other.lookups() == 0 and other.sample("auth_throttled_total") == 1
    # And it lets through, from that network, the keys Redis holds good, though it has never
    # seen them succeed itself: a tenant behind the same NAT as a guesser is not locked out
    # of any gateway.
    for key in (good, fresh.plaintext):
        assert (await other.call("/v1/models", key, ip=THROTTLED_IP))[0] == 200
    assert other.sample("auth_lookups_total", source="redis") == 2 and other.queries() == 0


async def test_requests_without_a_credential_are_not_counted_as_failures(
        platform: Platform, gateways: list[Gateway],  # noqa: F811
        redis_client: aioredis.Redis) -> None:
    """A client that sends no Authorization header is misconfigured, not guessing: however
    often it tries, its network keeps its whole budget for real failures."""
    gw = await start(platform, gateways, auth_failure_limit=4)
    for _ in range(10):
        status, body, _ = await gw.call("/v1/models", None, ip=THROTTLED_IP)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert not await redis_client.exists(f"authfail:{THROTTLED_IP}")
    assert gw.sample("auth_failures_total", reason="missing") == 10
    assert gw.sample("auth_throttled_total") == 0
    for _ in range(4):  # the network's whole budget is still there
        assert (await gw.call("/v1/models", generate_api_key(), ip=THROTTLED_IP))[0] == 401
    assert (await gw.call("/v1/models", generate_api_key(), ip=THROTTLED_IP))[0] == 429


async def control_events_delivered(p: Platform) -> None:
    """Wait until the outbox relay has published every event in the log and the CONTROL
    stream's mirror, which gateways read, holds them all: a gateway started after that never
    hears of them (it reads new events only), whereas one started before the mirror caught up
    would, and would tombstone a key it finds there as just created."""
    async def delivered() -> bool:
        # In the relay's order: (transaction id, position).
        if not await p.pool.fetchval(
                "SELECT NOT EXISTS (SELECT 1 FROM events e WHERE (e.transaction_id, e.position)"
                " > coalesce((SELECT (c.transaction_id, c.position) FROM checkpoints c "
                "WHERE c.name = 'outbox-relay'), ('0'::xid8, 0::bigint)))"):
            return False
        source = await p.bus.js.stream_info(CONTROL.name)
        mirror = await p.bus.js.stream_info(CONTROL_VIEW.name)
        return mirror.state.last_seq >= source.state.last_seq

    await eventually(delivered, timeout=30, what="the log's events in CONTROL_VIEW")


async def until_cached(gw: Gateway, client: aioredis.Redis, key: str) -> None:
    """Use `key` from an unthrottled network until Redis holds it as a principal. (A key's
    creation leaves a tombstone for a few seconds, which no lookup may overwrite.)"""
    entry = f"api_key:{hash_api_key(key)}"

    async def cached() -> bool:
        assert (await gw.call("/v1/models", key, ip=OTHER_IP))[0] == 200
        return await client.get(entry) not in (None, TOMBSTONE, UNKNOWN)

    await eventually(cached, timeout=20, interval=0.1, what="the key cached good in Redis")


def changed(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: calls - before.get(name, 0) for name, calls in after.items()
            if calls != before.get(name, 0)}


async def redis_commands(client: aioredis.Redis) -> dict[str, int]:
    """Calls per command since Redis started, but INFO's own."""
    stats = await client.info("commandstats")
    return {name: int(value["calls"]) for name, value in stats.items()
            if name != "cmdstat_info"}


# --------------------------------------------------------------------------- /v1/usage


async def test_usage_has_its_own_limit_per_key(
        platform: Platform, gateways: list[Gateway],  # noqa: F811
        redis_client: aioredis.Redis) -> None:
    p = platform
    gw = await start(p, gateways, usage_requests_per_minute=3)
    for _ in range(3):
        status, body, headers = await gw.call("/v1/usage", p.key.plaintext)
        assert status == 200 and body["data"] == []
        assert headers["x-ratelimit-limit-requests"] == "3"
    status, body, headers = await gw.call("/v1/usage", p.key.plaintext)
    assert status == 429
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert headers["x-ratelimit-scope"] == "key_usage_requests"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert gw.sample("rate_limit_exceeded_total", reason="key_usage_requests") == 1
    # Per key, and apart from inference: the key's inference counter was never touched.
    other = await p.catalog.create_api_key(p.environment_id, name="other")
    assert (await gw.call("/v1/usage", other.plaintext))[0] == 200
    assert not await redis_client.exists(f"ratelimit:key:{p.key.key_id}:minute:{{{p.tenant_id}}}")
    assert (await gw.call("/v1/models", p.key.plaintext))[0] == 200


@contextlib.asynccontextmanager
async def usage_tables_locked(p: Platform) -> AsyncIterator[None]:
    """While inside, every usage report waits on a lock (holding its pooled connection), as a
    slow aggregate would."""
    conn = await asyncpg.connect(p.servers.database_url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE usage_hourly, usage_records IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


async def reports_waiting(p: Platform, count: int) -> None:
    async def waiting() -> bool:
        # From the test's pool: the lock's own transaction would see one cached snapshot.
        return int(await p.pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%usage_hourly%'")) == count

    await eventually(waiting, timeout=10, what=f"{count} usage reports waiting")


async def test_usage_reports_in_flight_are_capped_per_process(
        platform: Platform, gateways: list[Gateway]) -> None:  # noqa: F811
    """Slow reports cannot take the gateway's PostgreSQL pool from key lookups: past
    USAGE_MAX_CONCURRENT at once, a report is refused (429) before it takes a connection."""
    p = platform
    gw = await start(p, gateways, usage_max_concurrent=2, db_max_connections=3)
    key = p.key.plaintext
    async with usage_tables_locked(p):
        slow = [asyncio.create_task(gw.call("/v1/usage", key)) for _ in range(2)]
        await reports_waiting(p, 2)
        refused = await asyncio.gather(*[gw.call("/v1/usage", key) for _ in range(10)])
        for status, body, headers in refused:
            assert status == 429
            assert body["error"]["type"] == "rate_limit_error"
            assert body["error"]["code"] == "rate_limit_exceeded"
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert headers["Retry-After"] == "1"
            assert headers["x-ratelimit-scope"] == "usage_reports_in_flight"
        assert gw.sample("rate_limit_exceeded_total", reason="usage_reports_in_flight") == 10
        await reports_waiting(p, 2)  # none of the refused reached PostgreSQL
        # The pool still has room for what the hot path needs: a key never seen before is
        # looked up in PostgreSQL at once.
        fresh = await p.catalog.create_api_key(p.environment_id, name="looked up meanwhile")
        status, _, _ = await asyncio.wait_for(gw.call("/v1/models", fresh.plaintext), 10)
        assert status == 200 and gw.queries() >= 1
    # The lock gone, the slow ones finish, and their slots are free again.
    assert [status for status, _, _ in await asyncio.gather(*slow)] == [200, 200]
    assert [(await gw.call("/v1/usage", key))[0] for _ in range(2)] == [200, 200]


async def test_a_usage_report_has_its_own_statement_timeout(
        platform: Platform, gateways: list[Gateway]) -> None:  # noqa: F811
    """USAGE_STATEMENT_TIMEOUT_MS, not the pool's 30 s: a report that runs too long is cut
    short (504) and gives its slot and connection back."""
    p = platform
    gw = await start(p, gateways, usage_max_concurrent=1, usage_statement_timeout_ms=300)
    async with usage_tables_locked(p):
        started = time.monotonic()
        status, body, _ = await asyncio.wait_for(gw.call("/v1/usage", p.key.plaintext), 10)
        assert status == 504 and "took too long" in body["error"]["message"]
        assert time.monotonic() - started < 15  # not the pool's 30 s
        status, _, _ = await asyncio.wait_for(gw.call("/v1/usage", p.key.plaintext), 10)
        assert status == 504  # the slot came back: not a 429
    assert (await gw.call("/v1/usage", p.key.plaintext))[0] == 200
    # SET LOCAL: the pool's connections keep their own timeout.
    assert await gw.app[DB].fetchval("SHOW statement_timeout") == "30s"
