"""API key authentication: Bearer clsk_live_… → SHA-256 → in-process cache (seconds) → Redis
`api_key:{hash}` (60 s) → PostgreSQL (the catalog's projections). With warm caches nothing
here touches PostgreSQL.

Revocations and suspensions arrive as events (apikey.*, tenant.*, environment.*) on NATS; every
gateway drops the affected entries from its own cache and marks them in Redis with a short
tombstone, so a lookup that raced the change cannot put the stale answer back.

Unknown and failing credentials cost no database query per attempt: a key PostgreSQL does not
know is remembered in Redis for AUTH_UNKNOWN_KEY_CACHE_SECONDS (its creation event clears that),
concurrent lookups of one key in a process share one query, and a client network with too many
failures is refused (429) without a PostgreSQL lookup (ratelimit/auth_failures.py) — except
for keys Redis holds as a principal (read in the same call as the network's count) or
this process has recently seen good, so one bad neighbour behind a NAT cannot lock out others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, Counter
from redis.asyncio.cluster import RedisCluster

from schemas.events import (
    ApiKeyCreated,
    ApiKeyRevoked,
    ApiKeyUpdated,
    BudgetCleared,
    BudgetSet,
    EnvironmentUpdated,
    Event,
    TenantReactivated,
    TenantSuspended,
    TenantUpdated,
)
from services.domain.budgets import nano
from services.domain.catalog import hash_api_key, looks_like_api_key
from services.gateway.ratelimit import lua
from services.gateway.ratelimit.auth_failures import (
    Cached,
    FailureLedger,
    FailureLimit,
    counts_as_failure,
    judge,
    judge_lookup,
    network_of,
)
from services.gateway.ratelimit.auth_failures import redis_key as failure_key
from services.gateway.ratelimit.verdicts import retry_after_header
from services.gateway.settings import GatewaySettings

log = structlog.get_logger("auth")

TOMBSTONE = b"-"
TOMBSTONE_SECONDS = 5
UNKNOWN = b"0"
"""Cached in `api_key:{hash}` for a key PostgreSQL does not know (a Principal never encodes
to this: its msgpack is an array)."""
_REDIS_DOWN = (aioredis.RedisError, OSError)


def _cached_as(entry: bytes | str | None) -> Cached:
    """What a Redis `api_key:{hash}` entry is, for the failure throttle."""
    if entry is None:
        return Cached.NOTHING
    if entry == UNKNOWN:
        return Cached.UNKNOWN
    if entry == TOMBSTONE:
        return Cached.CHANGING
    return Cached.PRINCIPAL


class PrincipalBudget(msgspec.Struct, frozen=True, array_like=True):
    """A spend budget over the key (its own, its environment's or its tenant's)."""

    scope: str
    amount_nano: int
    period: str
    every_days: int
    anchor: float | None
    """Unix seconds, for a period of `days`."""


class Principal(msgspec.Struct, frozen=True, array_like=True):
    """Who a key authenticates as, with what it needs for limits; cached in Redis."""

    key_id: str
    tenant_id: str
    environment_id: str
    role: str
    region: str
    key_status: str
    tenant_status: str
    environment_status: str
    expires_at: float | None
    key_requests_per_minute: int | None
    key_tokens_per_minute: int | None
    key_tokens_per_day: int | None
    key_concurrency: int | None
    environment_requests_per_minute: int | None
    environment_tokens_per_minute: int | None
    environment_tokens_per_day: int | None
    budgets: tuple[PrincipalBudget, ...] = ()


class AuthError(Exception):
    """Why a request is refused: 401 for the key itself, 403 for its tenant/environment."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class AuthThrottled(AuthError):
    """429: the client's network failed to authenticate too often; nothing was looked up."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(429, "throttled", "Too many failed authentications from your "
                         f"address. Retry after {retry_after_header(retry_after)}s.")

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": retry_after_header(self.retry_after),
                "x-ratelimit-scope": "auth_failures"}


def bearer_key(authorization: str | None) -> str:
    if not authorization:
        raise AuthError(401, "missing", "You didn't provide an API key. Provide it in the "
                        "Authorization header: 'Authorization: Bearer YOUR_KEY'.")
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthError(401, "malformed", "The Authorization header must be 'Bearer <key>'.")
    if not looks_like_api_key(key):
        raise AuthError(401, "invalid", "Incorrect API key provided.")
    return key


def check(principal: Principal | None, now: float) -> Principal:
    """Pure: is this principal allowed in at `now` (Unix seconds)?"""
    if principal is None:
        raise AuthError(401, "invalid", "Incorrect API key provided.")
    if principal.key_status != "active":
        raise AuthError(401, "revoked", "This API key has been revoked.")
    if principal.expires_at is not None and principal.expires_at <= now:
        raise AuthError(401, "expired", "This API key has expired.")
    if principal.tenant_status != "active":
        raise AuthError(403, "tenant_suspended", "This account is suspended.")
    if principal.environment_status != "active":
        raise AuthError(403, "environment_suspended", "This environment is suspended.")
    return principal


_LOOKUP = """
SELECT k.id, k.tenant_id, k.environment_id, k.role, e.region, k.status AS key_status,
       t.status AS tenant_status, e.status AS environment_status, k.expires_at,
       k.requests_per_minute, k.tokens_per_minute, k.tokens_per_day, k.concurrency,
       e.requests_per_minute AS env_rpm, e.tokens_per_minute AS env_tpm,
       e.tokens_per_day AS env_tpd,
       (SELECT json_agg(json_build_array(b.scope, b.amount::text, b.period, b.every_days,
                                         extract(epoch FROM b.anchor)::float8))
        FROM budgets b
        WHERE b.scope_id IN (k.id, k.environment_id, k.tenant_id) AND b.amount IS NOT NULL)
       AS budgets
FROM api_keys k
JOIN environments e ON e.id = k.environment_id
JOIN tenants t ON t.id = k.tenant_id
WHERE k.key_hash = $1
"""


def _principal(r: asyncpg.Record) -> Principal:
    expires: datetime | None = r["expires_at"]
    return Principal(
        str(r["id"]), str(r["tenant_id"]), str(r["environment_id"]), r["role"], r["region"],
        r["key_status"], r["tenant_status"], r["environment_status"],
        expires.timestamp() if expires else None, r["requests_per_minute"],
        r["tokens_per_minute"], r["tokens_per_day"], r["concurrency"], r["env_rpm"],
        r["env_tpm"], r["env_tpd"], _budgets(r["budgets"]))


def _budgets(raw: list[list[Any]] | str | None) -> tuple[PrincipalBudget, ...]:
    """The lookup's budgets column (json: the pools decode it; a bare connection may not)."""
    rows = json.loads(raw) if isinstance(raw, str) else raw or []
    return tuple(PrincipalBudget(scope, nano(Decimal(amount)), period, every_days, anchor)
                 for scope, amount, period, every_days, anchor in rows)


@dataclass(frozen=True)
class AuthSettings:
    local_ttl: float = 5.0
    redis_ttl: int = 60
    local_capacity: int = 100_000
    unknown_ttl: int = 30
    """Seconds Redis remembers that a key does not exist (0: not remembered)."""
    failures: FailureLimit = field(default_factory=FailureLimit)
    known_good_seconds: float = 600.0
    """A key that authenticated here is let past a throttled network for this long after its
    last success (it is still looked up and checked as usual), even when Redis has forgotten
    it or is down. A key Redis holds as a principal passes anyway, on every gateway."""


def auth_settings(s: GatewaySettings) -> AuthSettings:
    return AuthSettings(local_ttl=s.auth_local_cache_seconds,
                        redis_ttl=s.auth_redis_cache_seconds,
                        unknown_ttl=s.auth_unknown_key_cache_seconds,
                        failures=FailureLimit(s.auth_failure_limit,
                                              s.auth_failure_window_seconds),
                        known_good_seconds=s.auth_known_good_seconds)


class AuthMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.attempts = Counter("auth_attempts_total", "Authentication attempts", ["status"],
                                registry=registry)
        self.failures = Counter("auth_failures_total", "Authentication failures", ["reason"],
                                registry=registry)
        self.lookups = Counter("auth_lookups_total", "Where key lookups were answered",
                               ["source"], registry=registry)
        self.throttled = Counter("auth_throttled_total",
                                 "Requests refused (429) because their client network failed "
                                 "to authenticate too often; nothing was looked up",
                                 registry=registry)
        # Looked up once: these two count every request on the hot path.
        self.successes = self.attempts.labels("success")
        self.local_hits = self.lookups.labels("local")


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Principal)


class Authenticator:
    def __init__(self, db: asyncpg.Pool[asyncpg.Record], redis: aioredis.Redis | RedisCluster,
                 settings: AuthSettings | None = None, *,
                 registry: CollectorRegistry | None = None) -> None:
        self.db = db
        self.redis = redis
        self.settings = settings or AuthSettings()
        self.metrics = AuthMetrics(registry)
        self._local: OrderedDict[str, tuple[Principal | None, float]] = OrderedDict()
        self._invalidated: dict[str, float] = {}
        self._good: dict[str, float] = {}
        """Hashes that authenticated here → until when they pass a throttled network."""
        self._ledger = FailureLedger(self.settings.failures, self.settings.local_capacity)
        self._queries: dict[str, asyncio.Task[Principal | None]] = {}
        """The PostgreSQL lookup of a key under way, shared by everyone asking meanwhile."""
        # One script reads both on one Redis; a cluster keeps them in different slots.
        self._read_with_failures = (self._read_from_slots if isinstance(redis, RedisCluster)
                                    else redis.register_script(lua.AUTH_LOOKUP.source))
        self._throttling = self.settings.failures.enabled

    async def authenticate(self, authorization: str | None,
                           client_ip: str | None = None) -> Principal:
        """The principal `authorization` stands for, or AuthError. With `client_ip`, failures
        are counted against its network, which is refused (AuthThrottled) once over the
        limit, unless the key is known good (auth_failures.judge_lookup)."""
        client = client_ip if self._throttling else None
        hashed: str | None = None
        try:
            hashed = hash_api_key(bearer_key(authorization))
            cached = self._local.get(hashed)
            if (cached is not None and cached[0] is not None
                    and cached[1] > time.monotonic()):
                # The hot path: a key this process knows, no I/O at all.
                self.metrics.local_hits.inc()
                principal = check(cached[0], time.time())
            else:
                principal = check(await self.lookup(hashed, client), time.time())
                self._known_good(hashed)
        except AuthThrottled:
            self._throttled()
            raise
        except AuthError as exc:
            if hashed is not None:
                self._good.pop(hashed, None)
            if client is not None and counts_as_failure(exc.status, exc.reason):
                try:
                    await self._count_failure(network_of(client))
                except AuthThrottled:
                    self._throttled()
                    raise
            self.metrics.attempts.labels("failure").inc()
            self.metrics.failures.labels(exc.reason).inc()
            raise
        self.metrics.successes.inc()
        return principal

    def _throttled(self) -> None:
        self.metrics.attempts.labels("throttled").inc()
        self.metrics.throttled.inc()

    async def lookup(self, hashed: str, client_ip: str | None = None) -> Principal | None:
        """The key's principal (None: no such key), from the nearest cache that has it. With
        `client_ip` and a key not known good, AuthThrottled when its network is refused."""
        now = time.monotonic()
        cached = self._local.get(hashed)
        if cached is not None and cached[1] > now:
            self.metrics.local_hits.inc()
            return cached[0]
        network: str | None = None
        if client_ip is not None and self._good.get(hashed, 0.0) <= now:
            # Even when this process already refuses the network: whether the key passes
            # depends on Redis's entry for it, read in the same call as the shared count.
            network = network_of(client_ip)
        started = now
        principal, source = await self._lookup_shared(hashed, network)
        self.metrics.lookups.labels(source).inc()
        # An invalidation that arrived while we were reading makes our answer suspect:
        # use it for this request, but do not cache it.
        if self._invalidated.get(hashed, 0.0) < started:
            self._remember(hashed, principal, now)
        return principal

    async def _lookup_shared(self, hashed: str,
                             network: str | None) -> tuple[Principal | None, str]:
        redis_key = f"api_key:{hashed}"
        cached: bytes | str | None = None  # bytes: the gateway's client does not decode
        redis_ok = True
        failures, left_ms = 0, 0
        try:
            if network is None:
                cached = await self.redis.get(redis_key)
            else:
                reply = await self._read_with_failures(keys=[failure_key(network), redis_key])
                cached, failures, left_ms = reply[0], int(reply[1]), int(reply[2])
        except _REDIS_DOWN:
            redis_ok = False  # Redis down: PostgreSQL still answers, just slower
        if network is not None:
            # Redis down: nothing is known of the key, and this process's own count decides.
            self._refuse_if_throttled(network, cached, failures, left_ms)
        if cached == UNKNOWN:
            return None, "redis_unknown"
        if isinstance(cached, bytes) and cached != TOMBSTONE:
            return _decoder.decode(cached), "redis"
        # Everyone in this process asking for this key meanwhile shares one query (and its
        # caching); a caller that gives up does not cancel it for the others.
        query = self._queries.get(hashed)
        source = "postgres_shared"  # answered by a query another request started
        if query is None:
            query = asyncio.ensure_future(self._query(hashed, redis_key,
                                                      redis_ok and cached != TOMBSTONE))
            self._queries[hashed] = query
            query.add_done_callback(lambda done: self._query_done(hashed, done))
            source = "postgres"  # counted once per query PostgreSQL runs
        return await asyncio.shield(query), source

    async def _read_from_slots(self, keys: list[str]) -> list[Any]:
        """AUTH_LOOKUP's reply, on a Redis Cluster: one pipeline, split by the client over the
        (at most two) primaries holding the keys."""
        failures, entry = keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(entry)
            pipe.get(failures)
            pipe.pttl(failures)
            cached, count, left_ms = await pipe.execute()
        return [cached, int(count or 0), left_ms]

    def _refuse_if_throttled(self, network: str, entry: bytes | str | None, failures: int,
                             left_ms: int) -> None:
        """AuthThrottled when `network` may not have this key looked up (judge_lookup)."""
        now = time.monotonic()
        verdict = judge_lookup(_cached_as(entry), failures, left_ms / 1000,
                               self._ledger.blocked_for(network, now), self.settings.failures)
        self._ledger.block(network, verdict.block_for, now)
        if verdict.refuse_for > 0:
            raise AuthThrottled(verdict.refuse_for)

    async def _query(self, hashed: str, redis_key: str, cache: bool) -> Principal | None:
        row = await self.db.fetchrow(_LOOKUP, hashed)
        principal = _principal(row) if row is not None else None
        if cache:
            # NX: a tombstone written meanwhile wins over our possibly stale answer.
            with contextlib.suppress(*_REDIS_DOWN):
                if principal is not None:
                    await self.redis.set(redis_key, _encoder.encode(principal),
                                         ex=self.settings.redis_ttl, nx=True)
                elif self.settings.unknown_ttl > 0:
                    await self.redis.set(redis_key, UNKNOWN, ex=self.settings.unknown_ttl,
                                         nx=True)
        return principal

    def _query_done(self, hashed: str, query: asyncio.Task[Principal | None]) -> None:
        if self._queries.get(hashed) is query:
            del self._queries[hashed]
        if not query.cancelled():
            query.exception()  # retrieved: every caller may have given up

    def _known_good(self, hashed: str) -> None:
        if len(self._good) >= self.settings.local_capacity:
            now = time.monotonic()
            self._good = {h: t for h, t in self._good.items() if t > now}
            if len(self._good) >= self.settings.local_capacity:
                self._good.clear()  # rare; the worst is a throttled neighbour waiting
        self._good[hashed] = time.monotonic() + self.settings.known_good_seconds

    async def _count_failure(self, network: str) -> None:
        """Count a failed authentication here and in Redis; AuthThrottled when the network
        was already over the limit (the first failures keep their own error)."""
        now = time.monotonic()
        blocked = self._ledger.blocked_for(network, now)
        if blocked > 0:
            raise AuthThrottled(blocked)
        count, left = self._ledger.fail(network, now)
        limit = self.settings.failures
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                key = failure_key(network)
                pipe.set(key, 0, px=limit.window_ms, nx=True)
                pipe.incr(key)
                pipe.pttl(key)
                _, shared, left_ms = await pipe.execute()
            if int(shared) > count:
                count = int(shared)
                left = int(left_ms) / 1000 if int(left_ms) > 0 else limit.window
        except _REDIS_DOWN:
            pass  # this process's own count still holds the line
        verdict = judge(count, left, limit)
        self._ledger.block(network, verdict.block_for, now)
        if verdict.throttled:
            raise AuthThrottled(verdict.block_for)

    def _remember(self, hashed: str, principal: Principal | None, now: float) -> None:
        self._local[hashed] = (principal, now + self.settings.local_ttl)
        self._local.move_to_end(hashed)
        while len(self._local) > self.settings.local_capacity:
            self._local.popitem(last=False)

    # ------------------------------------------------------------------ invalidation

    async def invalidate(self, hashes: list[str]) -> None:
        """Forget these keys here and in Redis (every replica does this on the event)."""
        if not hashes:
            return
        now = time.monotonic()
        for h in hashes:
            self._local.pop(h, None)
            self._invalidated[h] = now
            # A query under way may have read the old answer: later askers start their own.
            self._queries.pop(h, None)
        self._prune_invalidated(now)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for h in hashes:
                    pipe.set(f"api_key:{h}", TOMBSTONE, ex=TOMBSTONE_SECONDS)
                await pipe.execute()
        except (aioredis.RedisError, OSError) as exc:
            log.warning("could not invalidate cached keys in redis", error=str(exc),
                        keys=len(hashes))

    def _prune_invalidated(self, now: float) -> None:
        horizon = now - 60.0
        if len(self._invalidated) > 10_000:
            self._invalidated = {h: t for h, t in self._invalidated.items() if t > horizon}

    async def on_event(self, event: Event) -> None:
        """Apply a control-plane event that may change who is allowed in."""
        match event:
            case ApiKeyRevoked() | ApiKeyUpdated():
                await self.invalidate([event.key_hash])
            case ApiKeyCreated():
                # Only a guess could have tried the new key's hash before, but a remembered
                # "unknown" must never hide a key that now exists.
                await self.invalidate([event.key_hash])
            case TenantSuspended() | TenantReactivated() | TenantUpdated():
                await self.invalidate(await self._hashes("tenant_id", str(event.tenant_id)))
            case EnvironmentUpdated():
                await self.invalidate(await self._hashes("environment_id",
                                                         str(event.environment_id)))
            case BudgetSet() | BudgetCleared():
                column = {"tenant": "tenant_id", "environment": "environment_id",
                          "key": "id"}[event.scope]
                await self.invalidate(await self._hashes(column, str(event.scope_id)))

    async def _hashes(self, column: str, value: str) -> list[str]:
        # Off the hot path: only when a tenant, an environment or a budget changes.
        rows = await self.db.fetch(f"SELECT key_hash FROM api_keys WHERE {column} = $1::uuid",
                                   value)
        attribute = "key_id" if column == "id" else column
        local = [h for h, (p, _) in self._local.items()
                 if p is not None and getattr(p, attribute) == value]
        return sorted({r["key_hash"] for r in rows} | set(local))

