"""The notifier's delivery state in PostgreSQL: queue events for their subscriptions, claim
due deliveries, record how each attempt went.

- Intake: one `notification_deliveries` row per (subscription, event), inserted with
  ``ON CONFLICT DO NOTHING``: the unique key is the idempotency on event id.
- Claim: each endpoint's oldest pending delivery (event order: occurred_at, then the UUIDv7
  id), if it is due, not leased, and the endpoint may be sent to; rows are taken with
  ``FOR UPDATE SKIP LOCKED`` and leased for `lease_seconds` in one short transaction, so
  replicas share the work and never send to one endpoint at once. The request itself runs
  outside any transaction (a transaction held open would hold back every reader of the log).
- Record: the attempt, the delivery's new state and the endpoint's (pace, failure clock), and
  the events a human must hear of, in one transaction; only the holder of the lease may
  record the delivery's state.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import msgspec

from schemas.events import NotificationAlert, encode_event
from schemas.ids import uuid7
from services.domain.notifications import Notifications
from services.domain.notifications.rules import (
    EventFacts,
    SubscriptionRule,
    facts_of,
    recipients,
    redact,
)
from services.domain.notifications.targets import Kind
from services.infra.db import Connection
from services.infra.eventlog import ANY, EventLog
from services.notifier.policy import AttemptResult, Decision
from services.notifier.senders import Target

Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
ACTOR = "notifier"


@dataclass(frozen=True)
class Queued:
    facts: EventFacts
    event: dict[str, Any]
    """The event as on NATS, sensitive fields removed."""


def queued(event: Mapping[str, Any]) -> Queued:
    """ValueError when `event` is not an event's JSON."""
    return Queued(facts_of(event), redact(event))


async def active_rules(conn: Connection) -> list[SubscriptionRule]:
    rows = await conn.fetch(
        """SELECT id, tenant_id, event_types, created_at FROM notification_subscriptions
           WHERE status = 'active'""")
    return [SubscriptionRule(r["id"], r["tenant_id"], tuple(r["event_types"]), r["created_at"])
            for r in rows]


async def intake(conn: Connection, items: Sequence[Queued], first_delay: float) -> int:
    """Queue each event for the subscriptions that want it; returns the rows added (an event
    seen before adds none)."""
    if not items:
        return 0
    rules = await active_rules(conn)
    ids, subs, events, types, times, bodies = [], [], [], [], [], []
    for item in items:
        for sub in recipients(rules, item.facts):
            ids.append(uuid7())
            subs.append(sub)
            events.append(item.facts.id)
            types.append(item.facts.type)
            times.append(item.facts.occurred_at)
            bodies.append(item.event)
    if not ids:
        return 0
    added = await conn.fetch(
        """INSERT INTO notification_deliveries (id, subscription_id, event_id, event_type,
               event_occurred_at, event, status, next_attempt_at)
           SELECT i, s, e, t, o, b, 'pending', now() + make_interval(secs => $7)
           FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[],
                       $6::jsonb[]) AS x(i, s, e, t, o, b)
           ON CONFLICT (subscription_id, event_id) DO NOTHING
           RETURNING id""",
        ids, subs, events, types, times, bodies, first_delay)
    return len(added)


async def record_alert(pool: Pool, event: NotificationAlert, first_delay: float) -> int:
    """Append an Alertmanager notification to the log and queue it, in one transaction. The
    relay publishes it later and the intake meets it again: the unique key makes that a
    no-op, so fan-out does not wait for the relay."""
    async with pool.acquire() as conn, conn.transaction():
        await EventLog(pool).append(event.stream, [event], ANY, conn=conn)
        wire: dict[str, Any] = msgspec.json.decode(encode_event(event))
        return await intake(conn, [queued(wire)], first_delay)


# --------------------------------------------------------------------------- claiming


@dataclass(frozen=True)
class Claimed:
    id: uuid.UUID
    lease_token: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    event: dict[str, Any]
    attempts: int
    failures: int
    target: Target


_CLAIM = """
WITH heads AS (
    SELECT DISTINCT ON (subscription_id) id
    FROM notification_deliveries WHERE status = 'pending'
    ORDER BY subscription_id, event_occurred_at, event_id
), due AS (
    SELECT d.id FROM notification_deliveries d
    JOIN heads h ON h.id = d.id
    LEFT JOIN notification_endpoints e ON e.subscription_id = d.subscription_id
    WHERE d.next_attempt_at <= now()
      AND (d.lease_until IS NULL OR d.lease_until < now())
      AND (e.next_send_at IS NULL OR e.next_send_at <= now())
    ORDER BY d.next_attempt_at
    LIMIT $1
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE notification_deliveries d
SET lease_until = now() + make_interval(secs => $2), lease_token = $3, updated_at = now()
FROM due WHERE d.id = due.id
RETURNING d.id, d.subscription_id, d.event_id, d.event_type, d.event, d.attempts, d.failures
"""

_TARGETS = """
SELECT s.id, s.tenant_id, s.kind, s.target_masked, s.status, x.target, x.signing_secret
FROM notification_subscriptions s JOIN notification_secrets x ON x.subscription_id = s.id
WHERE s.id = ANY($1::uuid[])
"""


async def claim(pool: Pool, limit: int, lease_seconds: float) -> list[Claimed]:
    if limit <= 0:
        return []
    token = uuid7()
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_CLAIM, limit, lease_seconds, token)
        if not rows:
            return []
        targets = {r["id"]: r for r in await conn.fetch(
            _TARGETS, list({r["subscription_id"] for r in rows}))}
        # Queued by an intake that read the subscription just before it was disabled or
        # deleted (whose command cancelled what it could see): never sent.
        stale = [r["id"] for r in rows
                 if (t := targets.get(r["subscription_id"])) is None or t["status"] != "active"]
        if stale:
            await conn.execute(
                """UPDATE notification_deliveries SET status = 'cancelled', lease_until = NULL,
                       lease_token = NULL, last_error = 'subscription not active',
                       updated_at = now()
                   WHERE id = ANY($1::uuid[])""", stale)
    out = []
    for r in rows:
        t = targets.get(r["subscription_id"])
        if t is None or t["status"] != "active":
            continue
        target = Target(t["id"], t["tenant_id"], Kind(t["kind"]), t["target"],
                        t["signing_secret"], t["target_masked"])
        out.append(Claimed(r["id"], token, r["event_id"], r["event_type"], r["event"],
                           r["attempts"], r["failures"], target))
    return out


async def next_due_in(pool: Pool) -> float | None:
    """Seconds until the earliest pending delivery becomes claimable (the scheduler's sleep),
    by the database's clock, which the claim also goes by; None when nothing is pending."""
    seconds: float | None = await pool.fetchval(
        """WITH heads AS (
               SELECT DISTINCT ON (subscription_id) subscription_id, next_attempt_at,
                      lease_until
               FROM notification_deliveries WHERE status = 'pending'
               ORDER BY subscription_id, event_occurred_at, event_id)
           SELECT extract(epoch FROM min(greatest(
                      h.next_attempt_at, coalesce(h.lease_until, '-infinity'),
                      coalesce(e.next_send_at, '-infinity'))) - clock_timestamp())::float8
           FROM heads h LEFT JOIN notification_endpoints e USING (subscription_id)""")
    return seconds


# --------------------------------------------------------------------------- recording


@dataclass(frozen=True)
class Recorded:
    decision: Decision
    current: bool
    """False: the lease was lost (the delivery was cancelled or taken over meanwhile)."""
    disabled: bool


async def clock(conn: Connection) -> datetime:
    now: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return now


async def failing_since(conn: Connection, subscription_id: uuid.UUID) -> datetime | None:
    when: datetime | None = await conn.fetchval(
        "SELECT failing_since FROM notification_endpoints WHERE subscription_id = $1",
        subscription_id)
    return when


async def record(conn: Connection, claimed: Claimed, result: AttemptResult,
                 decision: Decision, now: datetime, *, eventlog: EventLog) -> Recorded:
    """Everything one attempt changes, in the caller's transaction."""
    sub = claimed.target.subscription_id
    await conn.execute(
        """INSERT INTO notification_attempts (id, delivery_id, subscription_id, attempt,
               started_at, latency_ms, status_code, outcome, error, response_excerpt)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
        uuid7(), claimed.id, sub, claimed.attempts + 1,
        now - timedelta(milliseconds=result.latency_ms), result.latency_ms, result.status_code,
        decision.outcome.value, result.error[:1000], result.excerpt)
    next_attempt = now + timedelta(seconds=decision.next_attempt_in or 0.0)
    error = result.error or ("" if decision.status == "delivered"
                             else f"HTTP {result.status_code}")
    updated = await conn.fetchval(
        """UPDATE notification_deliveries SET status = $3::text, attempts = attempts + 1,
               failures = $4, next_attempt_at = CASE WHEN $3::text = 'pending'
                                                     THEN $5::timestamptz
                                                     ELSE next_attempt_at END,
               lease_until = NULL, lease_token = NULL, last_status_code = $6,
               last_error = $7, updated_at = $8::timestamptz,
               delivered_at = CASE WHEN $3::text = 'delivered' THEN $8::timestamptz END
           WHERE id = $1 AND lease_token = $2 RETURNING 1""",
        claimed.id, claimed.lease_token, decision.status, decision.failures, next_attempt,
        result.status_code, error[:1000], now)
    await conn.execute(
        """INSERT INTO notification_endpoints (subscription_id, next_send_at, failing_since,
               last_success_at, updated_at)
           VALUES ($1, $2, $3, CASE WHEN $4::bool THEN $5::timestamptz END, $5)
           ON CONFLICT (subscription_id) DO UPDATE SET
               next_send_at = greatest(notification_endpoints.next_send_at,
                                       EXCLUDED.next_send_at),
               failing_since = EXCLUDED.failing_since,
               last_success_at = CASE WHEN $4::bool THEN $5::timestamptz
                                      ELSE notification_endpoints.last_success_at END,
               updated_at = $5""",
        sub, now + timedelta(seconds=decision.next_send_in), decision.failing_since,
        decision.status == "delivered", now)
    if not updated:
        return Recorded(decision, current=False, disabled=False)
    commands = Notifications(eventlog, actor=ACTOR)
    disabled = False
    if decision.disable_reason is not None:
        disabled = await commands.disable_endpoint(sub, decision.disable_reason,
                                                   last_status_code=result.status_code,
                                                   conn=conn)
    elif decision.exhausted:
        await commands.delivery_failed(
            conn=conn, subscription_id=sub, tenant_id=claimed.target.tenant_id,
            delivery_id=claimed.id, event_id=claimed.event_id, event_type=claimed.event_type,
            attempts=claimed.attempts + 1, last_status_code=result.status_code,
            error=error)
    return Recorded(decision, current=True, disabled=disabled)
