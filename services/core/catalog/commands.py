"""Commands on the catalog: each appends its event and updates the projection in one
transaction, so the caller reads its own write; the outbox relay then tells everyone else.

The admin API is a thin HTTP layer over these; tests and `crosslogic dev` call them directly.
"""

from __future__ import annotations

import fnmatch
import hashlib
import secrets
import string
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from schemas.events import (
    ApiKeyCreated,
    ApiKeyRevoked,
    EnvironmentCreated,
    Event,
    EventMetadata,
    ModelCreated,
    Quota,
    TenantCreated,
    TenantReactivated,
    TenantSuspended,
)
from schemas.ids import uuid7
from services.core.catalog.projections import catalog_projections
from services.core.db import Connection
from services.core.eventlog import NO_STREAM, ConcurrencyError, EventLog

API_KEY_PREFIX = "clsk_live_"
_KEY_ALPHABET = string.ascii_letters + string.digits
_KEY_LENGTH = 40  # 40 base62 characters: ~238 bits


def generate_api_key() -> str:
    return API_KEY_PREFIX + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(_KEY_LENGTH))


def hash_api_key(key: str) -> str:
    """What is stored and looked up: the SHA-256 of the whole key, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


class CatalogError(Exception):
    """A command that cannot be done as asked; the message says why."""


class NotFound(CatalogError):
    pass


class Conflict(CatalogError):
    pass


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


class Catalog:
    def __init__(self, eventlog: EventLog, *, actor: str = "system") -> None:
        self.log = eventlog
        self.actor = actor
        self._projections = catalog_projections()

    async def _write(self, conn: Connection, stream: str, events: list[Event],
                     expected_version: int) -> None:
        meta = EventMetadata(actor=self.actor)
        for e in events:
            e.metadata = meta
        try:
            result = await self.log.append(stream, events, expected_version, conn=conn)
        except ConcurrencyError as exc:
            raise Conflict(f"{stream} changed concurrently; retry") from exc
        for projection in self._projections:
            mine = [r for r in result.events
                    if any(fnmatch.fnmatchcase(r.type, t) for t in projection.event_types)]
            if mine:
                try:
                    await projection.apply(conn, mine)
                except asyncpg.UniqueViolationError as exc:  # e.g. two models of one name
                    raise Conflict(exc.detail or str(exc)) from exc

    async def _version(self, conn: Connection, table: str, id_: uuid.UUID) -> int:
        version = await conn.fetchval(f"SELECT version FROM {table} WHERE id = $1", id_)
        if version is None:
            raise NotFound(f"{table[:-1]} {id_} not found")
        return int(version)

    # ------------------------------------------------------------------ tenants

    async def create_tenant(self, name: str, email: str = "", *,
                            tenant_id: uuid.UUID | None = None) -> uuid.UUID:
        event = TenantCreated(tenant_id=tenant_id or uuid7(), name=name, email=email)
        async with self.log.pool.acquire() as conn, conn.transaction():
            await self._write(conn, event.stream, [event], NO_STREAM)
        return event.tenant_id

    async def suspend_tenant(self, tenant_id: uuid.UUID, reason: str = "") -> None:
        await self._tenant_status(tenant_id, TenantSuspended(tenant_id=tenant_id, reason=reason))

    async def reactivate_tenant(self, tenant_id: uuid.UUID, reason: str = "") -> None:
        await self._tenant_status(tenant_id,
                                  TenantReactivated(tenant_id=tenant_id, reason=reason))

    async def _tenant_status(self, tenant_id: uuid.UUID, event: Event) -> None:
        async with self.log.pool.acquire() as conn, conn.transaction():
            version = await self._version(conn, "tenants", tenant_id)
            await self._write(conn, event.stream, [event], version)

    # ------------------------------------------------------------------ environments

    async def create_environment(self, tenant_id: uuid.UUID, name: str, region: str,
                                 quota: Quota | None = None) -> uuid.UUID:
        event = EnvironmentCreated(environment_id=uuid7(), tenant_id=tenant_id, name=name,
                                   region=region, quota=quota or Quota())
        async with self.log.pool.acquire() as conn, conn.transaction():
            await self._version(conn, "tenants", tenant_id)
            await self._write(conn, event.stream, [event], NO_STREAM)
        return event.environment_id

    # ------------------------------------------------------------------ API keys

    async def create_api_key(self, environment_id: uuid.UUID, *, name: str = "",
                             role: str = "developer", limits: Quota | None = None,
                             expires_at: datetime | None = None) -> NewApiKey:
        plaintext = generate_api_key()
        async with self.log.pool.acquire() as conn, conn.transaction():
            tenant_id = await conn.fetchval("SELECT tenant_id FROM environments WHERE id = $1",
                                            environment_id)
            if tenant_id is None:
                raise NotFound(f"environment {environment_id} not found")
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

    # ------------------------------------------------------------------ models

    async def create_model(self, name: str, *, family: str, vram_gb: int,
                           input_price_per_million: Decimal, output_price_per_million: Decimal,
                           context_length: int) -> uuid.UUID:
        event = ModelCreated(model_id=uuid7(), name=name, family=family, vram_gb=vram_gb,
                             input_price_per_million=input_price_per_million,
                             output_price_per_million=output_price_per_million,
                             context_length=context_length)
        async with self.log.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval("SELECT 1 FROM models WHERE name = $1", name):
                raise Conflict(f"model {name!r} already exists")
            await self._write(conn, event.stream, [event], NO_STREAM)
        return event.model_id


