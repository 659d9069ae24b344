"""The billing ledger: projection `billing_events` of the billing.* events, how commands record
them, and the reads the admin API and billing service share.

The projection keeps three tables (migration 0009): `billing_events` (the per-tenant feed,
each with its `stripe_id`: `stripe_id_of`),
`billing_accounts` (Stripe customer, subscription and payment standing) and `meter_exports`
(each meter event planned for Stripe and its outcome). The admin API (linking a customer) and
the billing service (the Stripe pusher, webhooks) append their events and apply them inline in
one transaction (`record_billing_events`), so a read right after sees them; the runner applies
them again later, which changes nothing: every row keeps the stream version it last applied.
A customer link also goes to the tenants projection (`tenants.stripe_customer_id`), inline.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from schemas.events import (
    Event,
    EventMetadata,
    InvoicePaid,
    MeterErrorReported,
    PaymentFailed,
    PricingSwitched,
    StripeCustomerLinked,
    SubscriptionChanged,
    UsageExported,
    UsageExportFailed,
    UsageExportHeld,
    UsageExportPlanned,
    UsageExportSkipped,
    payload_of,
)
from services.domain.catalog.projections import TenantsProjection
from services.infra.db import Connection
from services.infra.eventlog import ANY, EventLog
from services.infra.log_records import RecordedEvent
from services.infra.projections import Projection

_json = msgspec.json.Encoder()

PLAN_LOCK_KEY = 0x62696C6C_706C616E  # "billplan"
"""Transaction advisory lock of the pusher's plan: one planner at a time, and a tenant's switch
to the cost price never between a plan's read of the account and its commit."""

ENDED_SUBSCRIPTION = frozenset({"canceled", "incomplete_expired"})
"""Subscription statuses Stripe never leaves: such a subscription bills nothing more."""


def stripe_id_of(e: Event) -> str | None:
    """What Stripe knows a billing event by (`billing_events.stripe_id`, as the reference's
    table has it): a webhook's event id (`evt_…`), the linked customer (`cus_…`), or a meter
    event's identifier (what Stripe deduplicates it by, and an operator looks it up by)."""
    for field in ("stripe_event_id", "identifier", "customer_id"):
        value = getattr(e, field, None)
        if isinstance(value, str) and value:
            return value
    return None


class BillingProjection(Projection):
    name = "billing_events"
    tables = ("billing_events", "billing_accounts", "meter_exports")
    event_types = ("billing.*",)

    async def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        feed = [(r.event_id, getattr(r.event, "tenant_id", None), r.stream, r.type,
                 _json.encode(payload_of(r.event)).decode(), r.occurred_at,
                 stripe_id_of(r.event)) for r in events]
        if feed:
            # The feed first: a tenant's payment standing is read back from it.
            await conn.executemany(
                """INSERT INTO billing_events (event_id, tenant_id, stream, type, data,
                                               occurred_at, stripe_id)
                   VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7)
                   ON CONFLICT (event_id) DO NOTHING""",
                feed)
        for r in events:
            await _apply_one(conn, r, r.event)


async def _apply_one(conn: Connection, r: RecordedEvent, e: Event) -> None:
    v = r.stream_version
    at = r.occurred_at
    if isinstance(e, StripeCustomerLinked):
        await conn.execute(
            """INSERT INTO billing_accounts (tenant_id, customer_id, subscription_id,
                   subscription_status, linked_at, updated_at, version, cost_from)
               VALUES ($1, $2, $3, CASE WHEN $3::text IS NULL THEN NULL ELSE 'active' END,
                       $4, $4, $5, $6)
               ON CONFLICT (tenant_id) DO UPDATE SET customer_id = EXCLUDED.customer_id,
                   subscription_id = coalesce(EXCLUDED.subscription_id,
                                              billing_accounts.subscription_id),
                   subscription_status = coalesce(EXCLUDED.subscription_status,
                                                  billing_accounts.subscription_status),
                   linked_at = EXCLUDED.linked_at, updated_at = EXCLUDED.updated_at,
                   version = EXCLUDED.version,
                   cost_from = coalesce(billing_accounts.cost_from, EXCLUDED.cost_from)
               WHERE billing_accounts.version < EXCLUDED.version""",
            e.tenant_id, e.customer_id, e.subscription_id, at, v, e.cost_from)
    elif isinstance(e, PricingSwitched):
        # The first switch counts: hours from then on may already be planned on the cost
        # meter, so a later one must not move them back to the token meters.
        await conn.execute(
            """UPDATE billing_accounts SET cost_from = coalesce(cost_from, $2),
                   updated_at = $3, version = $4
               WHERE tenant_id = $1 AND version < $4""",
            e.tenant_id, e.cost_from, at, v)
    elif isinstance(e, InvoicePaid | PaymentFailed):
        await conn.execute(_STANDING, e.tenant_id, at, v)
    elif isinstance(e, SubscriptionChanged):
        # Only news of the current subscription changes the account (the rule of
        # services.billing.stripe_events.is_current_subscription): an old subscription's
        # late `deleted` stays in the feed and replaces nothing.
        await conn.execute(
            """UPDATE billing_accounts SET subscription_id = $2, subscription_status = $3,
                   updated_at = $4, version = $5
               WHERE tenant_id = $1 AND version < $5
                 AND (subscription_id IS NULL OR subscription_id = $2
                      OR (subscription_status = ANY($6::text[])
                          AND NOT $3 = ANY($6::text[])))""",
            e.tenant_id, e.subscription_id, e.status, at, v, sorted(ENDED_SUBSCRIPTION))
    elif isinstance(e, UsageExportSkipped):
        await conn.execute(
            """INSERT INTO meter_exports (identifier, tenant_id, meter, event_name, hour,
                   sequence, value, status, error, updated_at, version)
               VALUES ($1, $2, $3, '', $4, $5, $6, 'skipped', $7, $8, $9)
               ON CONFLICT (identifier) DO NOTHING""",
            e.identifier, e.tenant_id, e.meter, e.hour, e.sequence, e.value,
            e.reason, at, v)
    elif isinstance(e, UsageExportPlanned):
        # A skipped hour becomes a plan under the same identifier once the tenant is linked.
        await conn.execute(
            """INSERT INTO meter_exports (identifier, tenant_id, meter, event_name, hour,
                   sequence, value, customer_id, status, planned_at, updated_at, version)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'planned', $9, $9, $10)
               ON CONFLICT (identifier) DO UPDATE SET event_name = EXCLUDED.event_name,
                   value = EXCLUDED.value, customer_id = EXCLUDED.customer_id,
                   status = 'planned', error = NULL, planned_at = EXCLUDED.planned_at,
                   updated_at = EXCLUDED.updated_at, version = EXCLUDED.version
               WHERE meter_exports.status = 'skipped'
                 AND meter_exports.version < EXCLUDED.version""",
            e.identifier, e.tenant_id, e.meter, e.event_name, e.hour, e.sequence, e.value,
            e.customer_id, at, v)
    elif isinstance(e, UsageExported):
        await conn.execute(
            """UPDATE meter_exports SET status = 'exported', duplicate = $2, error = NULL,
                   exported_at = $3, updated_at = $3, version = $4
               WHERE identifier = $1 AND version < $4""",
            e.identifier, e.duplicate, at, v)
    elif isinstance(e, UsageExportFailed):
        await conn.execute(
            """UPDATE meter_exports SET error = $2,
                   status = CASE WHEN $3 THEN status ELSE 'failed' END,
                   updated_at = $4, version = $5
               WHERE identifier = $1 AND version < $5""",
            e.identifier, e.error[:2000], e.retryable, at, v)
    elif isinstance(e, UsageExportHeld):
        await conn.execute(
            """UPDATE meter_exports SET status = 'held', error = $2, updated_at = $3,
                   version = $4
               WHERE identifier = $1 AND version < $4""",
            e.identifier, e.reason[:2000], at, v)
    elif isinstance(e, MeterErrorReported) and e.sample_identifiers:
        # Stripe samples the invalid events it found; mark ours among them for operators.
        codes = ",".join(sorted(e.error_counts)) or "error"
        await conn.execute(
            "UPDATE meter_exports SET stripe_error = $2 WHERE identifier = ANY($1::text[])",
            e.sample_identifiers, codes)


# A tenant's payment standing, read from its invoice events in the feed, whatever order they
# arrived in (Stripe retries a delivery for days, so an old `payment_failed` can come after the
# `paid`). Per invoice: paid once any `paid` is in (a paid invoice stays paid), else its latest
# failure by Stripe's time (the events' occurred_at is the Stripe event's `created`). The tenant
# is flagged while any invoice is unpaid after a failure, as its latest such failure says,
# since the first of them; a paid invoice clears only its own failures.
_STANDING = """
WITH invoice_events AS (
    SELECT data->>'invoice_id' AS invoice_id, type = 'billing.invoice_paid' AS paid,
           coalesce((data->>'action_required')::bool, false) AS action_required,
           occurred_at, event_id
    FROM billing_events
    WHERE tenant_id = $1 AND type IN ('billing.invoice_paid', 'billing.payment_failed')
), invoices AS (
    SELECT DISTINCT ON (invoice_id) invoice_id, paid, action_required, occurred_at
    FROM invoice_events ORDER BY invoice_id, paid DESC, occurred_at DESC, event_id DESC
), standing AS (
    SELECT (SELECT CASE WHEN action_required THEN 'action_required' ELSE 'failed' END
            FROM invoices WHERE NOT paid ORDER BY occurred_at DESC LIMIT 1) AS status,
           (SELECT min(e.occurred_at) FROM invoice_events e JOIN invoices i USING (invoice_id)
            WHERE NOT i.paid) AS flagged_at,
           (SELECT invoice_id FROM invoice_events
            ORDER BY occurred_at DESC, event_id DESC LIMIT 1) AS last_invoice_id
)
INSERT INTO billing_accounts AS a (tenant_id, payment_status, payment_flagged_at,
                                   last_invoice_id, updated_at, version)
SELECT $1, coalesce(status, 'ok'), flagged_at, last_invoice_id, $2, $3 FROM standing
ON CONFLICT (tenant_id) DO UPDATE SET payment_status = EXCLUDED.payment_status,
    payment_flagged_at = EXCLUDED.payment_flagged_at,
    last_invoice_id = EXCLUDED.last_invoice_id,
    updated_at = greatest(a.updated_at, EXCLUDED.updated_at),
    version = greatest(a.version, EXCLUDED.version)
"""


async def record_billing_events(conn: Connection, events: Sequence[Event], *,
                                actor: str, correlation_id: str | None = None,
                                causation_id: str | None = None) -> list[RecordedEvent]:
    """Append `events` (each to its own stream, at any version) and apply them to the
    projection, inside the caller's transaction."""
    meta = EventMetadata(actor=actor, correlation_id=correlation_id, causation_id=causation_id)
    by_stream: dict[str, list[Event]] = {}
    for e in events:
        e.metadata = meta
        by_stream.setdefault(e.stream, []).append(e)
    log = EventLog(conn)
    recorded: list[RecordedEvent] = []
    for stream in sorted(by_stream):  # one order for every writer: no deadlocks
        recorded.extend((await log.append(stream, by_stream[stream], ANY, conn=conn)).events)
    recorded.sort(key=lambda r: r.position)
    if recorded:
        await BillingProjection().apply(conn, recorded)
        # The tenants projection keeps the customer too (`tenants.stripe_customer_id`); like
        # every catalog projection it is applied by whoever writes its events.
        linked = [r for r in recorded if isinstance(r.event, StripeCustomerLinked)]
        if linked:
            await TenantsProjection().apply(conn, linked)
    return recorded


# --------------------------------------------------------------------------- reads


class BillingAccount(msgspec.Struct, kw_only=True, frozen=True):
    tenant_id: uuid.UUID
    customer_id: str | None
    subscription_id: str | None
    subscription_status: str | None
    payment_status: str
    payment_flagged_at: datetime | None
    last_invoice_id: str | None
    linked_at: datetime | None
    updated_at: datetime
    cost_from: datetime | None = None
    """Hours from this one on are billed on the cost meter; None: on the token meters."""


class MeterExport(msgspec.Struct, kw_only=True, frozen=True):
    identifier: str
    meter: str
    event_name: str
    hour: datetime
    sequence: int
    value: int
    customer_id: str | None
    status: str
    """skipped, planned, exported, failed or held."""
    duplicate: bool
    error: str | None
    stripe_error: str | None
    planned_at: datetime | None
    exported_at: datetime | None


class BillingEventRecord(msgspec.Struct, kw_only=True, frozen=True):
    event_id: uuid.UUID
    type: str
    occurred_at: datetime
    data: dict[str, Any]


_ACCOUNT_COLUMNS = ("tenant_id, customer_id, subscription_id, subscription_status, "
                    "payment_status, payment_flagged_at, last_invoice_id, linked_at, updated_at, "
                    "cost_from")
_EXPORT_COLUMNS = ("identifier, meter, event_name, hour, sequence, value, customer_id, status, "
                   "duplicate, error, stripe_error, planned_at, exported_at")


def _to(record: asyncpg.Record, type_: type[Any]) -> Any:
    return type_(**dict(record))


async def get_account(db: asyncpg.Pool[asyncpg.Record] | Connection,
                      tenant_id: uuid.UUID) -> BillingAccount | None:
    row = await db.fetchrow(f"SELECT {_ACCOUNT_COLUMNS} FROM billing_accounts "
                            "WHERE tenant_id = $1", tenant_id)
    result: BillingAccount | None = None if row is None else _to(row, BillingAccount)
    return result


async def tenant_for_customer(db: asyncpg.Pool[asyncpg.Record] | Connection,
                              customer_id: str) -> uuid.UUID | None:
    """The tenant most recently linked to a Stripe customer."""
    value = await db.fetchval(
        """SELECT tenant_id FROM billing_accounts WHERE customer_id = $1
           ORDER BY linked_at DESC NULLS LAST LIMIT 1""", customer_id)
    return value if isinstance(value, uuid.UUID) else None


async def recent_exports(db: asyncpg.Pool[asyncpg.Record] | Connection, tenant_id: uuid.UUID,
                         limit: int = 24) -> list[MeterExport]:
    rows = await db.fetch(
        f"""SELECT {_EXPORT_COLUMNS} FROM meter_exports WHERE tenant_id = $1
            ORDER BY hour DESC, meter, sequence DESC LIMIT $2""", tenant_id, limit)
    return [_to(r, MeterExport) for r in rows]


async def recent_billing_events(db: asyncpg.Pool[asyncpg.Record] | Connection,
                                tenant_id: uuid.UUID, limit: int = 20) -> list[BillingEventRecord]:
    rows = await db.fetch(
        """SELECT event_id, type, occurred_at, data FROM billing_events WHERE tenant_id = $1
           ORDER BY occurred_at DESC, event_id DESC LIMIT $2""", tenant_id, limit)
    return [_to(r, BillingEventRecord) for r in rows]


async def last_token_hour(db: asyncpg.Pool[asyncpg.Record] | Connection,
                          tenant_id: uuid.UUID) -> datetime | None:
    """The latest hour of the tenant planned on a token meter (skipped hours were not)."""
    value = await db.fetchval(
        """SELECT max(hour) FROM meter_exports WHERE tenant_id = $1
             AND meter IN ('input_tokens', 'output_tokens') AND status <> 'skipped'""",
        tenant_id)
    return value if isinstance(value, datetime) else None


@dataclass(frozen=True)
class ExportTotals:
    """What a tenant's meter exports add up to, by status."""

    exported: int
    planned: int
    failed: int
    skipped: int
    held: int = 0


async def export_totals(db: asyncpg.Pool[asyncpg.Record] | Connection,
                        tenant_id: uuid.UUID,
                        meters: Sequence[str] = ("input_tokens", "output_tokens"),
                        ) -> ExportTotals:
    """Tokens (the token meters, the default) or cost units (`("cost",)`): never added up
    together."""
    row = await db.fetchrow(
        """SELECT coalesce(sum(value) FILTER (WHERE status = 'exported'), 0) AS exported,
                  coalesce(sum(value) FILTER (WHERE status = 'planned'), 0) AS planned,
                  coalesce(sum(value) FILTER (WHERE status = 'failed'), 0) AS failed,
                  coalesce(sum(value) FILTER (WHERE status = 'skipped'), 0) AS skipped,
                  coalesce(sum(value) FILTER (WHERE status = 'held'), 0) AS held
           FROM meter_exports WHERE tenant_id = $1 AND meter = ANY($2::text[])""",
        tenant_id, list(meters))
    assert row is not None
    return ExportTotals(int(row["exported"]), int(row["planned"]), int(row["failed"]),
                        int(row["skipped"]), int(row["held"]))
