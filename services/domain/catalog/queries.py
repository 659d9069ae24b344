"""Reads of the catalog's projections, as typed records: what the admin API returns and what
other readers (the CLI's dev stack, reconcilers) can share.

Records never carry an API key's hash, let alone the key: `last_four` is all there is to show.
Lists are keyset-paged by id (UUIDv7, so id order is creation order), which stays stable while
rows are added, unlike OFFSET paging.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, TypeAlias

import asyncpg
import msgspec

from services.infra.db import Connection

Reader: TypeAlias = "asyncpg.Pool[asyncpg.Record] | Connection"
Time = Annotated[datetime, msgspec.Meta(tz=True)]
"""timestamptz columns: always aware, encoded as ISO-8601 in UTC."""


class EnvironmentQuota(msgspec.Struct, kw_only=True, frozen=True):
    """An environment's limits; null means the platform default."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None


class KeyLimits(msgspec.Struct, kw_only=True, frozen=True):
    """An API key's own limits; null means none at the key's level."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    concurrency: int | None = None


class TenantRecord(msgspec.Struct, kw_only=True, frozen=True):
    id: uuid.UUID
    name: str
    email: str
    status: str
    status_reason: str
    stripe_customer_id: str | None = None
    """The Stripe customer the tenant is billed through (linked with `billing link`)."""
    created_at: Time
    updated_at: Time


class EnvironmentRecord(msgspec.Struct, kw_only=True, frozen=True):
    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    region: str
    status: str
    quota: EnvironmentQuota
    created_at: Time
    updated_at: Time


class ApiKeyRecord(msgspec.Struct, kw_only=True, frozen=True):
    """A key as shown after its creation: masked (`last_four` only)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    environment_id: uuid.UUID
    name: str
    last_four: str
    role: str
    status: str
    limits: KeyLimits
    expires_at: Time | None
    created_at: Time
    revoked_at: Time | None


class ModelRecord(msgspec.Struct, kw_only=True, frozen=True):
    id: uuid.UUID
    name: str
    family: str
    vram_gb: int
    input_price_per_million: Decimal
    output_price_per_million: Decimal
    context_length: int
    status: str
    weights_source: str | None
    """hf://<org>/<repo>, r2://<bucket>/<prefix> or file:///<path>; null: the Hugging Face
    Hub repo of the model's name."""
    created_at: Time
    updated_at: Time


class DeploymentRecord(msgspec.Struct, kw_only=True, frozen=True):
    id: uuid.UUID
    model_id: uuid.UUID
    model_name: str
    regions: list[str]
    gpu_type: str
    spot: bool
    min_nodes: int
    max_nodes: int
    allow_on_demand_fallback: bool
    status: str
    created_at: Time
    updated_at: Time
    deleted_at: Time | None


def plain_decimal(value: Decimal) -> Decimal:
    """``0.100000`` (numeric(20, 6) as stored) → ``0.1``; ``100.000000`` → ``100``, never
    ``1E+2``: prices read back the way an operator typed them."""
    if value == value.to_integral_value():
        return value.quantize(Decimal(1))
    return value.normalize()


# --------------------------------------------------------------------------- row → record


def _tenant(r: asyncpg.Record) -> TenantRecord:
    return TenantRecord(id=r["id"], name=r["name"], email=r["email"], status=r["status"],
                        status_reason=r["status_reason"],
                        stripe_customer_id=r["stripe_customer_id"], created_at=r["created_at"],
                        updated_at=r["updated_at"])


def _environment(r: asyncpg.Record) -> EnvironmentRecord:
    return EnvironmentRecord(
        id=r["id"], tenant_id=r["tenant_id"], name=r["name"], region=r["region"],
        status=r["status"],
        quota=EnvironmentQuota(requests_per_minute=r["requests_per_minute"],
                               tokens_per_minute=r["tokens_per_minute"],
                               tokens_per_day=r["tokens_per_day"]),
        created_at=r["created_at"], updated_at=r["updated_at"])


def _api_key(r: asyncpg.Record) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=r["id"], tenant_id=r["tenant_id"], environment_id=r["environment_id"],
        name=r["name"], last_four=r["last_four"], role=r["role"], status=r["status"],
        limits=KeyLimits(requests_per_minute=r["requests_per_minute"],
                         tokens_per_minute=r["tokens_per_minute"],
                         tokens_per_day=r["tokens_per_day"], concurrency=r["concurrency"]),
        expires_at=r["expires_at"], created_at=r["created_at"], revoked_at=r["revoked_at"])


def _model(r: asyncpg.Record) -> ModelRecord:
    return ModelRecord(id=r["id"], name=r["name"], family=r["family"], vram_gb=r["vram_gb"],
                       input_price_per_million=plain_decimal(r["input_price_per_million"]),
                       output_price_per_million=plain_decimal(r["output_price_per_million"]),
                       context_length=r["context_length"], status=r["status"],
                       weights_source=r["weights_source"], created_at=r["created_at"],
                       updated_at=r["updated_at"])


def _deployment(r: asyncpg.Record) -> DeploymentRecord:
    return DeploymentRecord(id=r["id"], model_id=r["model_id"], model_name=r["model_name"],
                            regions=list(r["regions"]), gpu_type=r["gpu_type"], spot=r["spot"],
                            min_nodes=r["min_nodes"], max_nodes=r["max_nodes"],
                            allow_on_demand_fallback=r["allow_on_demand_fallback"],
                            status=r["status"], created_at=r["created_at"],
                            updated_at=r["updated_at"], deleted_at=r["deleted_at"])


# Explicit columns: `SELECT *` on api_keys would fetch key_hash, which no record may hold.
_TENANT = ("id, name, email, status, status_reason, stripe_customer_id, created_at, "
           "updated_at")
_ENVIRONMENT = ("id, tenant_id, name, region, status, requests_per_minute, tokens_per_minute, "
                "tokens_per_day, created_at, updated_at")
_API_KEY = ("id, tenant_id, environment_id, name, last_four, role, status, requests_per_minute, "
            "tokens_per_minute, tokens_per_day, concurrency, expires_at, created_at, revoked_at")
_MODEL = ("id, name, family, vram_gb, input_price_per_million, output_price_per_million, "
          "context_length, status, weights_source, created_at, updated_at")
_DEPLOYMENT = ("id, model_id, model_name, regions, gpu_type, spot, min_nodes, max_nodes, "
               "allow_on_demand_fallback, status, created_at, updated_at, deleted_at")

# Keyset paging: rows after `$1` (NULL: from the start), in id order, at most `$2`.
_PAGE = "($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"


# --------------------------------------------------------------------------- tenants


async def get_tenant(db: Reader, tenant_id: uuid.UUID) -> TenantRecord | None:
    r = await db.fetchrow(f"SELECT {_TENANT} FROM tenants WHERE id = $1", tenant_id)
    return None if r is None else _tenant(r)


async def list_tenants(db: Reader, *, after: uuid.UUID | None = None,
                       limit: int = 50) -> list[TenantRecord]:
    rows = await db.fetch(f"SELECT {_TENANT} FROM tenants WHERE {_PAGE}", after, limit)
    return [_tenant(r) for r in rows]


# --------------------------------------------------------------------------- environments


async def get_environment(db: Reader, environment_id: uuid.UUID) -> EnvironmentRecord | None:
    r = await db.fetchrow(f"SELECT {_ENVIRONMENT} FROM environments WHERE id = $1",
                          environment_id)
    return None if r is None else _environment(r)


async def list_environments(db: Reader, tenant_id: uuid.UUID, *, after: uuid.UUID | None = None,
                            limit: int = 50) -> list[EnvironmentRecord]:
    rows = await db.fetch(
        f"SELECT {_ENVIRONMENT} FROM environments WHERE tenant_id = $3 AND {_PAGE}",
        after, limit, tenant_id)
    return [_environment(r) for r in rows]


# --------------------------------------------------------------------------- API keys


async def get_api_key(db: Reader, key_id: uuid.UUID) -> ApiKeyRecord | None:
    r = await db.fetchrow(f"SELECT {_API_KEY} FROM api_keys WHERE id = $1", key_id)
    return None if r is None else _api_key(r)


async def list_api_keys(db: Reader, *, tenant_id: uuid.UUID | None = None,
                        environment_id: uuid.UUID | None = None,
                        after: uuid.UUID | None = None, limit: int = 50) -> list[ApiKeyRecord]:
    """One tenant's or one environment's keys; never everyone's (one of the two is needed)."""
    if tenant_id is None and environment_id is None:
        raise ValueError("list_api_keys needs a tenant_id or an environment_id")
    rows = await db.fetch(
        f"""SELECT {_API_KEY} FROM api_keys
            WHERE ($3::uuid IS NULL OR tenant_id = $3)
              AND ($4::uuid IS NULL OR environment_id = $4) AND {_PAGE}""",
        after, limit, tenant_id, environment_id)
    return [_api_key(r) for r in rows]


# --------------------------------------------------------------------------- models


async def get_model(db: Reader, model_id: uuid.UUID) -> ModelRecord | None:
    r = await db.fetchrow(f"SELECT {_MODEL} FROM models WHERE id = $1", model_id)
    return None if r is None else _model(r)


async def list_models(db: Reader, *, after: uuid.UUID | None = None,
                      limit: int = 50) -> list[ModelRecord]:
    rows = await db.fetch(f"SELECT {_MODEL} FROM models WHERE {_PAGE}", after, limit)
    return [_model(r) for r in rows]


# --------------------------------------------------------------------------- deployments


async def get_deployment(db: Reader, deployment_id: uuid.UUID) -> DeploymentRecord | None:
    r = await db.fetchrow(f"SELECT {_DEPLOYMENT} FROM deployments WHERE id = $1",
                          deployment_id)
    return None if r is None else _deployment(r)


async def list_deployments(db: Reader, *, after: uuid.UUID | None = None, limit: int = 50,
                           include_deleted: bool = False) -> list[DeploymentRecord]:
    rows = await db.fetch(
        f"""SELECT {_DEPLOYMENT} FROM deployments
            WHERE ($3 OR status <> 'deleted') AND {_PAGE}""",
        after, limit, include_deleted)
    return [_deployment(r) for r in rows]
