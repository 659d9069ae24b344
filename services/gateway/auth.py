"""API key authentication: Bearer clsk_live_… → SHA-256 → in-process cache (seconds) → Redis
`api_key:{hash}` (60 s) → PostgreSQL (the catalog's projections). With warm caches nothing
here touches PostgreSQL.

Revocations and suspensions arrive as events (apikey.*, tenant.*, environment.*) on NATS; every
gateway drops the affected entries from its own cache and marks them in Redis with a short
tombstone, so a lookup that raced the change cannot put the stale answer back.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import msgspec
import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, Counter

from schemas.events import (
    ApiKeyRevoked,
    ApiKeyUpdated,
    EnvironmentUpdated,
    Event,
    TenantReactivated,
    TenantSuspended,
    TenantUpdated,
)
from services.core.catalog import hash_api_key, looks_like_api_key

log = structlog.get_logger("auth")

TOMBSTONE = b"-"
TOMBSTONE_SECONDS = 5


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


class AuthError(Exception):
    """Why a request is refused: 401 for the key itself, 403 for its tenant/environment."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


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
       e.tokens_per_day AS env_tpd
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
        r["env_tpm"], r["env_tpd"])


@dataclass(frozen=True)
class AuthSettings:
    local_ttl: float = 5.0
    redis_ttl: int = 60
    local_capacity: int = 100_000


class AuthMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.attempts = Counter("auth_attempts_total", "Authentication attempts", ["status"],
                                registry=registry)
        self.failures = Counter("auth_failures_total", "Authentication failures", ["reason"],
                                registry=registry)
        self.lookups = Counter("auth_lookups_total", "Where key lookups were answered",
                               ["source"], registry=registry)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Principal)


class Authenticator:
    def __init__(self, db: asyncpg.Pool[asyncpg.Record], redis: aioredis.Redis,
                 settings: AuthSettings | None = None, *,
                 registry: CollectorRegistry | None = None) -> None:
        self.db = db
        self.redis = redis
        self.settings = settings or AuthSettings()
        self.metrics = AuthMetrics(registry)
        self._local: OrderedDict[str, tuple[Principal | None, float]] = OrderedDict()
        self._invalidated: dict[str, float] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        try:
            hashed = hash_api_key(bearer_key(authorization))
            principal = check(await self.lookup(hashed), time.time())
        except AuthError as exc:
            self.metrics.attempts.labels("failure").inc()
            self.metrics.failures.labels(exc.reason).inc()
            raise
        self.metrics.attempts.labels("success").inc()
        return principal

    async def lookup(self, hashed: str) -> Principal | None:
        now = time.monotonic()
        cached = self._local.get(hashed)
        if cached is not None and cached[1] > now:
            self.metrics.lookups.labels("local").inc()
            return cached[0]
        started = now
        principal, source = await self._lookup_shared(hashed)
        self.metrics.lookups.labels(source).inc()
        # An invalidation that arrived while we were reading makes our answer suspect:
        # use it for this request, but do not cache it.
        if self._invalidated.get(hashed, 0.0) < started:
            self._remember(hashed, principal, now)
        return principal

    async def _lookup_shared(self, hashed: str) -> tuple[Principal | None, str]:
        redis_key = f"api_key:{hashed}"
        cached: bytes | str | None = None  # bytes: the gateway's client does not decode
        redis_ok = True
        try:
            cached = await self.redis.get(redis_key)
        except (aioredis.RedisError, OSError):
            redis_ok = False  # Redis down: PostgreSQL still answers, just slower
        if isinstance(cached, bytes) and cached != TOMBSTONE:
            return _decoder.decode(cached), "redis"
        row = await self.db.fetchrow(_LOOKUP, hashed)
        principal = _principal(row) if row is not None else None
        if principal is not None and redis_ok and cached != TOMBSTONE:
            # NX: a tombstone written meanwhile wins over our possibly stale answer.
            with contextlib.suppress(aioredis.RedisError, OSError):
                await self.redis.set(redis_key, _encoder.encode(principal),
                                     ex=self.settings.redis_ttl, nx=True)
        return principal, "postgres"

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
            case TenantSuspended() | TenantReactivated() | TenantUpdated():
                await self.invalidate(await self._hashes("tenant_id", str(event.tenant_id)))
            case EnvironmentUpdated():
                await self.invalidate(await self._hashes("environment_id",
                                                         str(event.environment_id)))

    async def _hashes(self, column: str, value: str) -> list[str]:
        # Off the hot path: only when a tenant or an environment changes.
        rows = await self.db.fetch(f"SELECT key_hash FROM api_keys WHERE {column} = $1::uuid",
                                   value)
        local = [h for h, (p, _) in self._local.items()
                 if p is not None and getattr(p, column) == value]
        return sorted({r["key_hash"] for r in rows} | set(local))

