"""Catalog commands on tenants, their environments, and the budgets set on a tenant, an
environment or an API key."""

from __future__ import annotations

import uuid
from decimal import Decimal

from schemas.events import (
    BudgetCleared,
    BudgetSet,
    EntityStatus,
    EnvironmentCreated,
    EnvironmentUpdated,
    Event,
    Quota,
    TenantCreated,
    TenantReactivated,
    TenantSuspended,
    TenantUpdated,
)
from schemas.ids import uuid7
from services.domain.budgets import Budget, Period, Scope
from services.domain.catalog.command_base import CatalogCommandBase
from services.domain.catalog.errors import Conflict, LimitReached, NotFound
from services.domain.catalog.quotas import QuotaChanges, merge_quota, quota_of
from services.infra.db import Connection
from services.infra.eventlog import NO_STREAM


class TenantCommands(CatalogCommandBase):
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
            merged = merge_quota(quota_of(row), quota) if quota is not None else None
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
