"""Reads of subscriptions and their delivery log, as typed records (the admin API's answers).

No record holds a target's secret part or a signing secret. Subscriptions are keyset-paged in
id order like the catalog; deliveries and attempts newest first (what an operator looking at
a delivery log wants), also keyset-paged on their UUIDv7 ids.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal, TypeAlias

import asyncpg
import msgspec

from services.domain.catalog.queries import Time
from services.infra.db import Connection

Reader: TypeAlias = "asyncpg.Pool[asyncpg.Record] | Connection"
Scope = Literal["platform", "tenant"]


class NotificationSubscriptionRecord(msgspec.Struct, kw_only=True, frozen=True):
    id: uuid.UUID
    tenant_id: uuid.UUID | None
    """null: a platform (operator) subscription."""
    kind: str
    target: str
    """Masked: the token of a webhook URL is never shown."""
    event_types: list[str]
    description: str
    status: str
    """active, disabled (the notifier gave up on the endpoint) or deleted."""
    status_reason: str
    created_at: Time
    updated_at: Time
    failing_since: Time | None
    """When the endpoint started failing without a success since; null when it is well."""
    last_success_at: Time | None


class NotificationAttemptRecord(msgspec.Struct, kw_only=True, frozen=True):
    """One request to the endpoint: the delivery log."""

    id: uuid.UUID
    delivery_id: uuid.UUID
    subscription_id: uuid.UUID
    attempt: int
    started_at: Time
    latency_ms: float
    status_code: int | None
    outcome: str
    """delivered, rate_limited (429), failed, gone (404/410), refused (never sent)."""
    error: str
    response_excerpt: str


class NotificationDeliveryRecord(msgspec.Struct, kw_only=True, frozen=True):
    id: uuid.UUID
    subscription_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    status: str
    """pending, delivered, failed (schedule exhausted or endpoint gone) or cancelled."""
    attempts: int
    next_attempt_at: Time | None
    """When it is tried next; null unless pending."""
    last_status_code: int | None
    last_error: str
    created_at: Time
    updated_at: Time
    delivered_at: Time | None


class NotificationDeliveryDetail(NotificationDeliveryRecord, frozen=True, kw_only=True):
    event: Annotated[dict[str, Any], msgspec.Meta(
        description="the event as delivered (sensitive fields removed)")]
    attempt_log: list[NotificationAttemptRecord]


_SUBSCRIPTION = """s.id, s.tenant_id, s.kind, s.target_masked AS target, s.event_types,
    s.description, s.status, s.status_reason, s.created_at, s.updated_at, e.failing_since,
    e.last_success_at"""
_SUBSCRIPTION_FROM = """notification_subscriptions s
    LEFT JOIN notification_endpoints e ON e.subscription_id = s.id"""
_DELIVERY = """id, subscription_id, event_id, event_type, status, attempts,
    CASE WHEN status = 'pending' THEN next_attempt_at END AS next_attempt_at, last_status_code,
    last_error, created_at, updated_at, delivered_at"""
_ATTEMPT = """id, delivery_id, subscription_id, attempt, started_at, latency_ms, status_code,
    outcome, error, response_excerpt"""


def _subscription(r: asyncpg.Record) -> NotificationSubscriptionRecord:
    return NotificationSubscriptionRecord(**{**dict(r), "event_types": list(r["event_types"])})


def _delivery(r: asyncpg.Record) -> NotificationDeliveryRecord:
    return NotificationDeliveryRecord(**dict(r))


def _attempt(r: asyncpg.Record) -> NotificationAttemptRecord:
    return NotificationAttemptRecord(**dict(r))


async def get_subscription(db: Reader, subscription_id: uuid.UUID
                           ) -> NotificationSubscriptionRecord | None:
    r = await db.fetchrow(f"SELECT {_SUBSCRIPTION} FROM {_SUBSCRIPTION_FROM} WHERE s.id = $1",
                          subscription_id)
    return None if r is None else _subscription(r)


async def list_subscriptions(db: Reader, *, tenant_id: uuid.UUID | None = None,
                             scope: Scope | None = None, include_deleted: bool = False,
                             after: uuid.UUID | None = None,
                             limit: int = 50) -> list[NotificationSubscriptionRecord]:
    """In id order. `tenant_id`: that tenant's only; `scope`: platform or tenant ones."""
    rows = await db.fetch(
        f"""SELECT {_SUBSCRIPTION} FROM {_SUBSCRIPTION_FROM}
            WHERE ($1::uuid IS NULL OR s.id > $1)
              AND ($3::uuid IS NULL OR s.tenant_id = $3)
              AND ($4::text IS NULL OR ($4 = 'platform') = (s.tenant_id IS NULL))
              AND ($5 OR s.status <> 'deleted')
            ORDER BY s.id LIMIT $2""",
        after, limit, tenant_id, scope, include_deleted)
    return [_subscription(r) for r in rows]


async def list_deliveries(db: Reader, subscription_id: uuid.UUID, *,
                          status: str | None = None, before: uuid.UUID | None = None,
                          limit: int = 50) -> list[NotificationDeliveryRecord]:
    """Newest first."""
    rows = await db.fetch(
        f"""SELECT {_DELIVERY} FROM notification_deliveries
            WHERE subscription_id = $1 AND ($2::text IS NULL OR status = $2)
              AND ($3::uuid IS NULL OR id < $3)
            ORDER BY id DESC LIMIT $4""",
        subscription_id, status, before, limit)
    return [_delivery(r) for r in rows]


async def get_delivery(db: Reader, subscription_id: uuid.UUID,
                       delivery_id: uuid.UUID) -> NotificationDeliveryDetail | None:
    r = await db.fetchrow(
        f"""SELECT {_DELIVERY}, event FROM notification_deliveries
            WHERE id = $1 AND subscription_id = $2""", delivery_id, subscription_id)
    if r is None:
        return None
    attempts = await db.fetch(
        f"SELECT {_ATTEMPT} FROM notification_attempts WHERE delivery_id = $1 ORDER BY id",
        delivery_id)
    return NotificationDeliveryDetail(**dict(r), attempt_log=[_attempt(a) for a in attempts])


async def list_attempts(db: Reader, subscription_id: uuid.UUID, *,
                        before: uuid.UUID | None = None,
                        limit: int = 50) -> list[NotificationAttemptRecord]:
    """The subscription's delivery log, newest first."""
    rows = await db.fetch(
        f"""SELECT {_ATTEMPT} FROM notification_attempts
            WHERE subscription_id = $1 AND ($2::uuid IS NULL OR id < $2)
            ORDER BY id DESC LIMIT $3""", subscription_id, before, limit)
    return [_attempt(r) for r in rows]
