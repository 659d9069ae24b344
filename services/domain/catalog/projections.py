"""Projections of the catalog: tenants, environments, api_keys, budgets, models, deployments.

Each applies its events idempotently (the row's `version` guards against applying an event
twice), because a command applies its own event inline and the runner may apply it again.
"""

from __future__ import annotations

from collections.abc import Sequence

from schemas.events import (
    ApiKeyCreated,
    ApiKeyRevoked,
    ApiKeyUpdated,
    BudgetCleared,
    BudgetSet,
    DeploymentCreated,
    DeploymentDeleted,
    DeploymentUpdated,
    EnvironmentCreated,
    EnvironmentUpdated,
    ModelCreated,
    ModelUpdated,
    StripeCustomerLinked,
    TenantCreated,
    TenantReactivated,
    TenantSuspended,
    TenantUpdated,
)
from services.infra.db import Connection
from services.infra.log_records import RecordedEvent
from services.infra.projections import Projection


class TenantsProjection(Projection):
    name = "tenants"
    tables = ("tenants",)
    event_types = ("tenant.*", "billing.customer_linked")

    async def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        for r in events:
            e = r.event
            if isinstance(e, TenantCreated):
                await conn.execute(
                    """INSERT INTO tenants (id, name, email, status, created_at, updated_at,
                                            version)
                       VALUES ($1, $2, $3, $4, $5, $5, $6) ON CONFLICT (id) DO NOTHING""",
                    e.tenant_id, e.name, e.email, e.status.value, e.occurred_at,
                    r.stream_version)
            elif isinstance(e, TenantUpdated):
                await conn.execute(
                    """UPDATE tenants SET name = coalesce($2, name), email = coalesce($3, email),
                           updated_at = $4, version = $5
                       WHERE id = $1 AND version < $5""",
                    e.tenant_id, e.name, e.email, e.occurred_at, r.stream_version)
            elif isinstance(e, StripeCustomerLinked):
                # The billing stream's event: its version is not the tenant's, so it leaves
                # `version` alone; the log's order makes the latest link win.
                await conn.execute(
                    "UPDATE tenants SET stripe_customer_id = $2 WHERE id = $1",
                    e.tenant_id, e.customer_id)
            elif isinstance(e, TenantSuspended | TenantReactivated):
                status = "suspended" if isinstance(e, TenantSuspended) else "active"
                await conn.execute(
                    """UPDATE tenants SET status = $2, status_reason = $3, updated_at = $4,
                           version = $5
                       WHERE id = $1 AND version < $5""",
                    e.tenant_id, status, e.reason, e.occurred_at, r.stream_version)


class EnvironmentsProjection(Projection):
    name = "environments"
    tables = ("environments",)
    event_types = ("environment.*",)

    async def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        for r in events:
            e = r.event
            if isinstance(e, EnvironmentCreated):
                await conn.execute(
                    """INSERT INTO environments (id, tenant_id, name, region, status,
                           requests_per_minute, tokens_per_minute, tokens_per_day, created_at,
                           updated_at, version)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10)
                       ON CONFLICT (id) DO NOTHING""",
                    e.environment_id, e.tenant_id, e.name, e.region, e.status.value,
                    e.quota.requests_per_minute, e.quota.tokens_per_minute,
                    e.quota.tokens_per_day, e.occurred_at, r.stream_version)
            elif isinstance(e, EnvironmentUpdated):
                quota = e.quota
                await conn.execute(
                    """UPDATE environments SET name = coalesce($2, name),
                           region = coalesce($3, region), status = coalesce($4, status),
                           requests_per_minute = CASE WHEN $5 THEN $6 ELSE requests_per_minute END,
                           tokens_per_minute = CASE WHEN $5 THEN $7 ELSE tokens_per_minute END,
                           tokens_per_day = CASE WHEN $5 THEN $8 ELSE tokens_per_day END,
                           updated_at = $9, version = $10
                       WHERE id = $1 AND version < $10""",
                    e.environment_id, e.name, e.region,
                    e.status.value if e.status else None, quota is not None,
                    quota.requests_per_minute if quota else None,
                    quota.tokens_per_minute if quota else None,
                    quota.tokens_per_day if quota else None, e.occurred_at, r.stream_version)


class ApiKeysProjection(Projection):
    name = "api_keys"
    tables = ("api_keys",)
    event_types = ("apikey.*",)

    async def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        for r in events:
            e = r.event
            if isinstance(e, ApiKeyCreated):
                await conn.execute(
                    """INSERT INTO api_keys (id, key_hash, tenant_id, environment_id, name,
                           last_four, role, status, requests_per_minute, tokens_per_minute,
                           tokens_per_day, concurrency, expires_at, created_at, updated_at,
                           version)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $9, $10, $11, $12,
                               $13, $13, $14)
                       ON CONFLICT (id) DO NOTHING""",
                    e.key_id, e.key_hash, e.tenant_id, e.environment_id, e.name, e.last_four,
                    e.role, e.limits.requests_per_minute, e.limits.tokens_per_minute,
                    e.limits.tokens_per_day, e.limits.concurrency, e.expires_at, e.occurred_at,
                    r.stream_version)
            elif isinstance(e, ApiKeyUpdated):
                limits = e.limits
                await conn.execute(
                    """UPDATE api_keys SET name = coalesce($2, name), role = coalesce($3, role),
                           requests_per_minute = CASE WHEN $4 THEN $5 ELSE requests_per_minute END,
                           tokens_per_minute = CASE WHEN $4 THEN $6 ELSE tokens_per_minute END,
                           tokens_per_day = CASE WHEN $4 THEN $7 ELSE tokens_per_day END,
                           concurrency = CASE WHEN $4 THEN $8 ELSE concurrency END,
                           expires_at = coalesce($9, expires_at),
                           updated_at = $10, version = $11
                       WHERE id = $1 AND version < $11""",
                    e.key_id, e.name, e.role, limits is not None,
                    limits.requests_per_minute if limits else None,
                    limits.tokens_per_minute if limits else None,
                    limits.tokens_per_day if limits else None,
                    limits.concurrency if limits else None, e.expires_at, e.occurred_at,
                    r.stream_version)
            elif isinstance(e, ApiKeyRevoked):
                await conn.execute(
                    """UPDATE api_keys SET status = 'revoked', revoked_at = $2, updated_at = $2,
                           version = $3
                       WHERE id = $1 AND version < $3""",
                    e.key_id, e.occurred_at, r.stream_version)


class BudgetsProjection(Projection):
    name = "budgets"
    tables = ("budgets",)
    event_types = ("budget.*",)

    async def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        for r in events:
            e = r.event
            if isinstance(e, BudgetSet):
                await conn.execute(
                    """INSERT INTO budgets (scope_id, scope, tenant_id, amount, period,
                           every_days, anchor, updated_at, version)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                       ON CONFLICT (scope_id) DO UPDATE SET amount = EXCLUDED.amount,
                           period = EXCLUDED.period, every_days = EXCLUDED.every_days,
                           anchor = EXCLUDED.anchor, updated_at = EXCLUDED.updated_at,
                           version = EXCLUDED.version
                       WHERE budgets.version < EXCLUDED.version""",
                    e.scope_id, e.scope, e.tenant_id, e.amount, e.period, e.every_days,
                    e.anchor, e.occurred_at, r.stream_version)
            elif isinstance(e, BudgetCleared):
                await conn.execute(
                    """UPDATE budgets SET amount = NULL, updated_at = $2, version = $3
                       WHERE scope_id = $1 AND version < $3""",
                    e.scope_id, e.occurred_at, r.stream_version)


class ModelsProjection(Projection):
    name = "models"
    tables = ("models",)
    event_types = ("model.*",)

    async def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        for r in events:
            e = r.event
            if isinstance(e, ModelCreated):
                await conn.execute(
                    """INSERT INTO models (id, name, family, vram_gb, input_price_per_million,
                           output_price_per_million, context_length, status, created_at,
                           updated_at, version, weights_source)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $8, $9, $10)
                       ON CONFLICT (id) DO NOTHING""",
                    e.model_id, e.name, e.family, e.vram_gb, e.input_price_per_million,
                    e.output_price_per_million, e.context_length, e.occurred_at,
                    r.stream_version, e.weights_source)
            elif isinstance(e, ModelUpdated):
                await conn.execute(
                    """UPDATE models SET family = coalesce($2, family),
                           vram_gb = coalesce($3, vram_gb),
                           input_price_per_million = coalesce($4, input_price_per_million),
                           output_price_per_million = coalesce($5, output_price_per_million),
                           context_length = coalesce($6, context_length),
                           status = coalesce($7, status),
                           weights_source = coalesce($10, weights_source), updated_at = $8,
                           version = $9
                       WHERE id = $1 AND version < $9""",
                    e.model_id, e.family, e.vram_gb, e.input_price_per_million,
                    e.output_price_per_million, e.context_length,
                    e.status.value if e.status else None, e.occurred_at, r.stream_version,
                    e.weights_source)


class DeploymentsProjection(Projection):
    name = "deployments"
    tables = ("deployments",)
    event_types = ("deployment.*",)

    async def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        for r in events:
            e = r.event
            if isinstance(e, DeploymentCreated):
                await conn.execute(
                    """INSERT INTO deployments (id, model_id, model_name, regions, gpu_type, spot,
                           min_nodes, max_nodes, allow_on_demand_fallback, status, created_at,
                           updated_at, version)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'active', $10, $10, $11)
                       ON CONFLICT (id) DO NOTHING""",
                    e.deployment_id, e.model_id, e.model_name, e.regions, e.gpu_type, e.spot,
                    e.min_nodes, e.max_nodes, e.allow_on_demand_fallback, e.occurred_at,
                    r.stream_version)
            elif isinstance(e, DeploymentUpdated):
                await conn.execute(
                    """UPDATE deployments SET regions = coalesce($2, regions),
                           gpu_type = coalesce($3, gpu_type), spot = coalesce($4, spot),
                           min_nodes = coalesce($5, min_nodes),
                           max_nodes = coalesce($6, max_nodes),
                           allow_on_demand_fallback = coalesce($7, allow_on_demand_fallback),
                           updated_at = $8, version = $9
                       WHERE id = $1 AND version < $9""",
                    e.deployment_id, e.regions, e.gpu_type, e.spot, e.min_nodes, e.max_nodes,
                    e.allow_on_demand_fallback, e.occurred_at, r.stream_version)
            elif isinstance(e, DeploymentDeleted):
                await conn.execute(
                    """UPDATE deployments SET status = 'deleted', status_reason = $2,
                           deleted_at = $3, updated_at = $3, version = $4
                       WHERE id = $1 AND version < $4""",
                    e.deployment_id, e.reason, e.occurred_at, r.stream_version)


def catalog_projections() -> list[Projection]:
    return [TenantsProjection(), EnvironmentsProjection(), ApiKeysProjection(),
            BudgetsProjection(), ModelsProjection(), DeploymentsProjection()]
