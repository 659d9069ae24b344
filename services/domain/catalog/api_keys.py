"""API keys: their format and hash, and the catalog commands that create, change, rotate and
revoke them."""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import string
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from schemas.events import ApiKeyCreated, ApiKeyRevoked, ApiKeyUpdated, Quota
from schemas.ids import uuid7
from services.domain.catalog.command_base import CatalogCommandBase
from services.domain.catalog.errors import Conflict, Invalid, LimitReached, NotFound
from services.domain.catalog.quotas import QuotaChanges, merge_quota, quota_of
from services.infra.eventlog import NO_STREAM

API_KEY_PREFIX = "clsk_live_"
_KEY_ALPHABET = string.ascii_letters + string.digits
_KEY_LENGTH = 40  # 40 base62 characters: ~238 bits


def generate_api_key() -> str:
    return API_KEY_PREFIX + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(_KEY_LENGTH))


_KEY_SHAPE = re.compile(rf"{API_KEY_PREFIX}[A-Za-z0-9]{{{_KEY_LENGTH}}}")


def looks_like_api_key(key: str) -> bool:
    """Whether `key` could be one of ours at all: anything else is refused without a lookup,
    so a client spraying garbage never reaches PostgreSQL."""
    return _KEY_SHAPE.fullmatch(key) is not None


def hash_api_key(key: str) -> str:
    """What is stored and looked up: the SHA-256 of the whole key, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


class Keep(enum.Enum):
    KEEP = "keep"


KEEP: Final = Keep.KEEP
"""For an optional argument whose None means something (no expiry): leave it as it is."""


@dataclass(frozen=True)
class NewApiKey:
    key_id: uuid.UUID
    tenant_id: uuid.UUID
    environment_id: uuid.UUID
    plaintext: str
    """Shown once, to whoever created it; never stored."""
    last_four: str

    def __repr__(self) -> str:
        return f"NewApiKey(key_id={self.key_id}, last_four={self.last_four!r})"


class ApiKeyCommands(CatalogCommandBase):
    async def create_api_key(self, environment_id: uuid.UUID, *, name: str = "",
                             role: str = "developer", limits: Quota | None = None,
                             expires_at: datetime | None = None,
                             tenant_limit: int | None = None) -> NewApiKey:
        """LimitReached when the environment's tenant has `tenant_limit` active keys."""
        plaintext = generate_api_key()
        async with self.log.pool.acquire() as conn, conn.transaction():
            tenant_id = await conn.fetchval("SELECT tenant_id FROM environments WHERE id = $1",
                                            environment_id)
            if tenant_id is None:
                raise NotFound(f"environment {environment_id} not found")
            if tenant_limit is not None:
                # Counted under the tenant's lock: concurrent creations take turns.
                await self._lock_tenant(conn, tenant_id)
                held = await conn.fetchval(
                    "SELECT count(*) FROM api_keys WHERE tenant_id = $1 AND status = 'active'",
                    tenant_id)
                if held >= tenant_limit:
                    raise LimitReached(f"tenant {tenant_id} has {held} active API keys, the "
                                       f"most it may have ({tenant_limit})")
            event = ApiKeyCreated(key_id=uuid7(), tenant_id=tenant_id,
                                  environment_id=environment_id, key_hash=hash_api_key(plaintext),
                                  last_four=plaintext[-4:], name=name, role=role,
                                  limits=limits or Quota(), expires_at=expires_at)
            await self._write(conn, event.stream, [event], NO_STREAM)
        return NewApiKey(event.key_id, tenant_id, environment_id, plaintext, plaintext[-4:])

    async def revoke_api_key(self, key_id: uuid.UUID, reason: str = "") -> None:
        async with self.log.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT tenant_id, key_hash, status, version FROM api_keys WHERE id = $1",
                key_id)
            if row is None:
                raise NotFound(f"api key {key_id} not found")
            if row["status"] == "revoked":
                return  # already done: revoking is idempotent
            event = ApiKeyRevoked(key_id=key_id, tenant_id=row["tenant_id"],
                                  key_hash=row["key_hash"], reason=reason)
            await self._write(conn, event.stream, [event], row["version"])

    async def update_api_key(self, key_id: uuid.UUID, *, name: str | None = None,
                             role: str | None = None, limits: QuotaChanges | None = None,
                             expires_at: datetime | None = None) -> None:
        async with self.log.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT tenant_id, key_hash, status, requests_per_minute, tokens_per_minute,
                          tokens_per_day, concurrency, version FROM api_keys WHERE id = $1""",
                key_id)
            if row is None:
                raise NotFound(f"api key {key_id} not found")
            if row["status"] == "revoked":
                raise Conflict(f"api key {key_id} is revoked; create a new one")
            if name is None and role is None and limits is None and expires_at is None:
                return
            merged = merge_quota(quota_of(row), limits) if limits is not None else None
            event = ApiKeyUpdated(key_id=key_id, tenant_id=row["tenant_id"],
                                  key_hash=row["key_hash"], name=name, role=role,
                                  limits=merged, expires_at=expires_at)
            await self._write(conn, event.stream, [event], row["version"])

    async def rotate_api_key(self, key_id: uuid.UUID, reason: str = "rotated", *,
                             expires_at: datetime | Keep | None = KEEP,
                             now: datetime | None = None) -> NewApiKey:
        """Revoke the key and create its successor (same environment, name, role, limits and
        expiry) in one transaction: there is never a moment with neither or both active.
        `expires_at` gives the successor another expiry (None: none); left out, the old one
        is kept — unless it has passed: a successor that is expired at birth is refused
        (Invalid on `expires_at`), the caller says which expiry it wants."""
        plaintext = generate_api_key()
        async with self.log.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", key_id)
            if row is None:
                raise NotFound(f"api key {key_id} not found")
            if row["status"] == "revoked":
                raise Conflict(f"api key {key_id} is revoked; create a new one")
            successor_expiry: datetime | None
            if isinstance(expires_at, Keep):
                successor_expiry = row["expires_at"]
                if successor_expiry is not None and \
                        successor_expiry <= (now or datetime.now(UTC)):
                    raise Invalid(f"api key {key_id} expired at "
                                  f"{successor_expiry.isoformat()}: give its successor an "
                                  "expires_at (null for none)", "expires_at")
            else:
                successor_expiry = expires_at
            revoked = ApiKeyRevoked(key_id=key_id, tenant_id=row["tenant_id"],
                                    key_hash=row["key_hash"], reason=reason)
            await self._write(conn, revoked.stream, [revoked], row["version"])
            created = ApiKeyCreated(key_id=uuid7(), tenant_id=row["tenant_id"],
                                    environment_id=row["environment_id"],
                                    key_hash=hash_api_key(plaintext), last_four=plaintext[-4:],
                                    name=row["name"], role=row["role"], limits=quota_of(row),
                                    expires_at=successor_expiry)
            await self._write(conn, created.stream, [created], NO_STREAM)
        return NewApiKey(created.key_id, created.tenant_id, created.environment_id, plaintext,
                         plaintext[-4:])
