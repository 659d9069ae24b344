"""Commands on the catalog: each appends its event and updates the projection in one
transaction, so the caller reads its own write; the outbox relay then tells everyone else.

The admin API is a thin HTTP layer over these; tests and `crosslogic dev` call them directly.
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import re
import secrets
import string
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final

import asyncpg

from schemas.events import (
    ApiKeyCreated,
    ApiKeyRevoked,
    ApiKeyUpdated,
    BudgetCleared,
    BudgetSet,
    DeploymentCreated,
    DeploymentDeleted,
    DeploymentUpdated,
    EntityStatus,
    EnvironmentCreated,
    EnvironmentUpdated,
    Event,
    EventMetadata,
    ModelCreated,
    ModelUpdated,
    Quota,
    TenantCreated,
    TenantReactivated,
    TenantSuspended,
    TenantUpdated,
)
from schemas.ids import uuid7
from services.domain.budgets import Budget, Period, Scope
from services.domain.catalog.projections import catalog_projections
from services.domain.catalog.weights import InvalidWeightsSource, parse_weights_source
from services.infra.db import Connection
from services.infra.eventlog import NO_STREAM, ConcurrencyError, EventLog

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


class CatalogError(Exception):
    """A command that cannot be done as asked; the message says why."""


class NotFound(CatalogError):
    pass


class Conflict(CatalogError):
    pass


class Invalid(CatalogError):
    """The request contradicts the current state (e.g. max_nodes below min_nodes after a
    change): `field` names the offending field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class LimitReached(CatalogError):
    """The tenant has as many of these as it may have (a limit the caller set)."""


QuotaChanges = Mapping[str, int | None]
"""A partial change of a Quota: the fields present are set (None clears a limit), the others
are kept."""


def merge_quota(current: Quota, changes: QuotaChanges) -> Quota:
    """`current` with `changes` applied. Events carry whole quotas (the projection replaces
    all columns at once), so a partial change is merged here, against the row it was read
    with, inside the command's transaction."""
    allowed = Quota.__struct_fields__
    unknown = sorted(set(changes) - set(allowed))
    if unknown:
        raise ValueError(f"unknown quota fields: {', '.join(unknown)}")
    values = {f: getattr(current, f) for f in allowed}
    values.update(changes)
    return Quota(**values)


def check_node_bounds(min_nodes: int, max_nodes: int) -> None:
    if min_nodes < 0:
        raise Invalid("min_nodes must be 0 or more", "min_nodes")
    if max_nodes < min_nodes:
        raise Invalid(f"max_nodes ({max_nodes}) must be at least min_nodes ({min_nodes})",
                      "max_nodes")


def _quota_of(row: asyncpg.Record) -> Quota:
    """The limits columns of an environments or api_keys row (environments have no
    concurrency column: `get` gives None)."""
    return Quota(requests_per_minute=row.get("requests_per_minute"),
                 tokens_per_minute=row.get("tokens_per_minute"),
                 tokens_per_day=row.get("tokens_per_day"),
                 concurrency=row.get("concurrency"))


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


class Catalog:
    """`correlation_id` (e.g. the admin API's request id) goes into every event's metadata,
    so an operator can find what one request did."""

    def __init__(self, eventlog: EventLog, *, actor: str = "system",
                 correlation_id: str | None = None) -> None:
        self.log = eventlog
        self.actor = actor
        self.correlation_id = correlation_id
        self._projections = catalog_projections()

    async def _write(self, conn: Connection, stream: str, events: list[Event],
                     expected_version: int) -> None:
        meta = EventMetadata(actor=self.actor, correlation_id=self.correlation_id)
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

    async def update_tenant(self, tenant_id: uuid.UUID, *, name: str | None = None,
                            email: str | None = None) -> None:
        async with self.log.pool.acquire() as conn, conn.transaction():
            version = await self._version(conn, "tenants", tenant_id)
            if name is None and email is None:
                return  # nothing to change: no event
            event = TenantUpdated(tenant_id=tenant_id, name=name, email=email)
            await self._write(conn, event.stream, [event], version)

    async def suspend_tenant(self, tenant_id: uuid.UUID, reason: str = "") -> None:
        """Conflict when it is suspended already: a second suspension would overwrite the
        first one's reason and say nothing new."""
        await self._tenant_status(tenant_id, TenantSuspended(tenant_id=tenant_id, reason=reason),
                                  "suspended")

    async def reactivate_tenant(self, tenant_id: uuid.UUID, reason: str = "") -> None:
        await self._tenant_status(tenant_id,
                                  TenantReactivated(tenant_id=tenant_id, reason=reason),
                                  "active")

    async def _tenant_status(self, tenant_id: uuid.UUID, event: Event, to: str) -> None:
        async with self.log.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT status, version FROM tenants WHERE id = $1",
                                      tenant_id)
            if row is None:
                raise NotFound(f"tenant {tenant_id} not found")
            if row["status"] == to:
                raise Conflict(f"tenant {tenant_id} is {to} already")
            await self._write(conn, event.stream, [event], row["version"])

    # ------------------------------------------------------------------ environments

    async def _lock_tenant(self, conn: Connection, tenant_id: uuid.UUID) -> None:
        """Serializes the commands that check a name within a tenant: two creating
        `production` at once take turns, and the second sees the first's row."""
        if await conn.fetchval("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE",
                               tenant_id) is None:
            raise NotFound(f"tenant {tenant_id} not found")

    @staticmethod
    async def _check_environment_name(conn: Connection, tenant_id: uuid.UUID, name: str,
                                      but: uuid.UUID | None = None) -> None:
        taken = await conn.fetchval(
            "SELECT id FROM environments WHERE tenant_id = $1 AND name = $2 "
            "AND ($3::uuid IS NULL OR id <> $3)", tenant_id, name, but)
        if taken is not None:
            raise Conflict(f"tenant {tenant_id} has an environment named {name!r} already "
                           f"({taken})")

    async def create_environment(self, tenant_id: uuid.UUID, name: str, region: str,
                                 quota: Quota | None = None,
                                 tenant_limit: int | None = None) -> uuid.UUID:
        """Conflict when the tenant has an environment of that name (names are how people
        tell production from staging); LimitReached when it has `tenant_limit` already."""
        event = EnvironmentCreated(environment_id=uuid7(), tenant_id=tenant_id, name=name,
                                   region=region, quota=quota or Quota())
        async with self.log.pool.acquire() as conn, conn.transaction():
            await self._lock_tenant(conn, tenant_id)
            if tenant_limit is not None:
                held = await conn.fetchval(
                    "SELECT count(*) FROM environments WHERE tenant_id = $1", tenant_id)
                if held >= tenant_limit:
                    raise LimitReached(f"tenant {tenant_id} has {held} environments, the most "
                                       f"it may have ({tenant_limit})")
            await self._check_environment_name(conn, tenant_id, name)
            await self._write(conn, event.stream, [event], NO_STREAM)
        return event.environment_id

    async def update_environment(self, environment_id: uuid.UUID, *, name: str | None = None,
                                 region: str | None = None, quota: QuotaChanges | None = None,
                                 status: EntityStatus | None = None) -> None:
        async with self.log.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT tenant_id, requests_per_minute, tokens_per_minute, tokens_per_day,
                          version FROM environments WHERE id = $1""", environment_id)
            if row is None:
                raise NotFound(f"environment {environment_id} not found")
            if name is None and region is None and quota is None and status is None:
                return
            if name is not None:
                await self._lock_tenant(conn, row["tenant_id"])
                await self._check_environment_name(conn, row["tenant_id"], name,
                                                   but=environment_id)
            merged = merge_quota(_quota_of(row), quota) if quota is not None else None
            event = EnvironmentUpdated(environment_id=environment_id,
                                       tenant_id=row["tenant_id"], name=name, region=region,
                                       quota=merged, status=status)
            await self._write(conn, event.stream, [event], row["version"])

    # ------------------------------------------------------------------ budgets

    async def set_budget(self, scope: Scope, scope_id: uuid.UUID, amount: Decimal,
                         period: Period) -> None:
        """At most `amount` dollars per `period` for this tenant, environment or key
        (NotFound when it does not exist). Setting it again replaces it."""
        budget = Budget(scope, str(scope_id), amount, period)  # ValueError: out of bounds
        async with self.log.pool.acquire() as conn, conn.transaction():
            tenant_id, version = await self._budget_owner(conn, scope, scope_id)
            event = BudgetSet(scope=scope, scope_id=scope_id, tenant_id=tenant_id,
                              amount=budget.amount, period=period.kind,
                              every_days=period.every_days, anchor=period.anchor)
            await self._write(conn, event.stream, [event], version)

    async def clear_budget(self, scope: Scope, scope_id: uuid.UUID) -> bool:
        """False when the scope had no budget (nothing recorded)."""
        async with self.log.pool.acquire() as conn, conn.transaction():
            tenant_id, version = await self._budget_owner(conn, scope, scope_id)
            current = await conn.fetchval("SELECT amount FROM budgets WHERE scope_id = $1",
                                          scope_id)
            if current is None:
                return False
            event = BudgetCleared(scope=scope, scope_id=scope_id, tenant_id=tenant_id)
            await self._write(conn, event.stream, [event], version)
            return True

    async def budget_owner(self, scope: Scope, scope_id: uuid.UUID) -> uuid.UUID:
        """The tenant a scope belongs to; NotFound when there is no such scope."""
        async with self.log.pool.acquire() as conn:
            tenant_id, _ = await self._budget_owner(conn, scope, scope_id)
        return tenant_id

    async def _budget_owner(self, conn: Connection, scope: Scope,
                            scope_id: uuid.UUID) -> tuple[uuid.UUID, int]:
        """The tenant the scope belongs to, and the budget stream's version."""
        table = {"tenant": "tenants", "environment": "environments", "key": "api_keys"}[scope]
        column = "id" if scope == "tenant" else "tenant_id"
        tenant_id = await conn.fetchval(f"SELECT {column} FROM {table} WHERE id = $1",
                                        scope_id)
        if tenant_id is None:
            raise NotFound(f"{scope} {scope_id} not found")
        version = await conn.fetchval("SELECT version FROM budgets WHERE scope_id = $1",
                                      scope_id)
        return tenant_id, NO_STREAM if version is None else int(version)

    # ------------------------------------------------------------------ API keys

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
            merged = merge_quota(_quota_of(row), limits) if limits is not None else None
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
                                    name=row["name"], role=row["role"], limits=_quota_of(row),
                                    expires_at=successor_expiry)
            await self._write(conn, created.stream, [created], NO_STREAM)
        return NewApiKey(created.key_id, created.tenant_id, created.environment_id, plaintext,
                         plaintext[-4:])

    # ------------------------------------------------------------------ models

    async def create_model(self, name: str, *, family: str, vram_gb: int,
                           input_price_per_million: Decimal, output_price_per_million: Decimal,
                           context_length: int,
                           weights_source: str | None = None) -> uuid.UUID:
        """`weights_source`: see services/domain/catalog/weights.py; stored in its canonical
        form. None: the Hugging Face Hub repo of `name`."""
        event = ModelCreated(model_id=uuid7(), name=name, family=family, vram_gb=vram_gb,
                             input_price_per_million=input_price_per_million,
                             output_price_per_million=output_price_per_million,
                             context_length=context_length,
                             weights_source=_weights_source(weights_source))
        async with self.log.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval("SELECT 1 FROM models WHERE name = $1", name):
                raise Conflict(f"model {name!r} already exists")
            await self._write(conn, event.stream, [event], NO_STREAM)
        return event.model_id

    async def update_model(self, model_id: uuid.UUID, *, family: str | None = None,
                           vram_gb: int | None = None,
                           input_price_per_million: Decimal | None = None,
                           output_price_per_million: Decimal | None = None,
                           context_length: int | None = None,
                           status: EntityStatus | None = None,
                           weights_source: str | None = None) -> None:
        """None leaves a field as it is. A model's source can be changed, not removed: set
        hf://<org>/<repo> to go back to the Hub. Nodes already up keep the weights they
        loaded; the next launch uses the new source."""
        source = _weights_source(weights_source)
        async with self.log.pool.acquire() as conn, conn.transaction():
            version = await self._version(conn, "models", model_id)
            event = ModelUpdated(model_id=model_id, family=family, vram_gb=vram_gb,
                                 input_price_per_million=input_price_per_million,
                                 output_price_per_million=output_price_per_million,
                                 context_length=context_length, status=status,
                                 weights_source=source)
            if all(getattr(event, f) is None for f in _MODEL_CHANGES):
                return
            await self._write(conn, event.stream, [event], version)

    # ------------------------------------------------------------------ deployments

    async def create_deployment(self, model: str | uuid.UUID, *, regions: Sequence[str],
                                gpu_type: str, spot: bool, min_nodes: int, max_nodes: int,
                                allow_on_demand_fallback: bool = True) -> uuid.UUID:
        """`model` is the model's id or its name; it must be in the catalog and not deleted."""
        if not regions:
            raise Invalid("a deployment needs at least one region", "regions")
        check_node_bounds(min_nodes, max_nodes)
        async with self.log.pool.acquire() as conn, conn.transaction():
            row = await _find_model(conn, model)
            if row is None:
                raise NotFound(f"model {model} not found")
            if row["status"] == EntityStatus.DELETED:
                raise Conflict(f"model {row['name']!r} is deleted")
            event = DeploymentCreated(deployment_id=uuid7(), model_id=row["id"],
                                      model_name=row["name"], regions=list(regions),
                                      gpu_type=gpu_type, spot=spot, min_nodes=min_nodes,
                                      max_nodes=max_nodes,
                                      allow_on_demand_fallback=allow_on_demand_fallback)
            await self._write(conn, event.stream, [event], NO_STREAM)
        return event.deployment_id

    async def update_deployment(self, deployment_id: uuid.UUID, *,
                                regions: Sequence[str] | None = None,
                                gpu_type: str | None = None, spot: bool | None = None,
                                min_nodes: int | None = None, max_nodes: int | None = None,
                                allow_on_demand_fallback: bool | None = None) -> None:
        if regions is not None and not regions:
            raise Invalid("a deployment needs at least one region", "regions")
        async with self.log.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT status, min_nodes, max_nodes, version FROM deployments WHERE id = $1",
                deployment_id)
            if row is None:
                raise NotFound(f"deployment {deployment_id} not found")
            if row["status"] == EntityStatus.DELETED:
                raise Conflict(f"deployment {deployment_id} is deleted")
            # The bounds are checked as they will be after the change, not field by field.
            check_node_bounds(row["min_nodes"] if min_nodes is None else min_nodes,
                              row["max_nodes"] if max_nodes is None else max_nodes)
            event = DeploymentUpdated(deployment_id=deployment_id,
                                      regions=None if regions is None else list(regions),
                                      gpu_type=gpu_type, spot=spot, min_nodes=min_nodes,
                                      max_nodes=max_nodes,
                                      allow_on_demand_fallback=allow_on_demand_fallback)
            if all(getattr(event, f) is None for f in _DEPLOYMENT_CHANGES):
                return
            await self._write(conn, event.stream, [event], row["version"])

    async def delete_deployment(self, deployment_id: uuid.UUID, reason: str = "") -> None:
        """Idempotent: deleting a deleted deployment changes nothing."""
        async with self.log.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT status, version FROM deployments WHERE id = $1",
                                      deployment_id)
            if row is None:
                raise NotFound(f"deployment {deployment_id} not found")
            if row["status"] == EntityStatus.DELETED:
                return
            event = DeploymentDeleted(deployment_id=deployment_id, reason=reason)
            await self._write(conn, event.stream, [event], row["version"])


_MODEL_CHANGES = ("family", "vram_gb", "input_price_per_million", "output_price_per_million",
                  "context_length", "status", "weights_source")
_DEPLOYMENT_CHANGES = ("regions", "gpu_type", "spot", "min_nodes", "max_nodes",
                       "allow_on_demand_fallback")


def _weights_source(text: str | None) -> str | None:
    """The canonical form of a source, so that one source is one string in the log."""
    if text is None:
        return None
    try:
        return str(parse_weights_source(text))
    except InvalidWeightsSource as exc:
        raise Invalid(f"weights_source {exc}", "weights_source") from None


async def _find_model(conn: Connection, model: str | uuid.UUID) -> asyncpg.Record | None:
    """By id when `model` is (or reads as) a UUID, else by name."""
    model_id: uuid.UUID | None = model if isinstance(model, uuid.UUID) else None
    if model_id is None:
        try:
            model_id = uuid.UUID(str(model))
        except ValueError:
            model_id = None
    if model_id is not None:
        row = await conn.fetchrow("SELECT id, name, status FROM models WHERE id = $1", model_id)
        if row is not None:
            return row
    return await conn.fetchrow("SELECT id, name, status FROM models WHERE name = $1",
                               str(model))


