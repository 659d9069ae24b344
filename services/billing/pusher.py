"""The Stripe pusher: closed hours of usage to Stripe Meter Events, each exactly once.

One pusher is active across billing replicas: leadership is a session advisory lock on the
pusher's own connection (as the outbox relay's), released when that connection dies; standbys
retry every `BILLING_LEADER_RETRY` seconds. Each pass:

1. **Plan** (one short transaction, under a transaction advisory lock so that even two
   leaders could not plan twice, and a tenant's switch to the cost price is never in
   between): for every closed hour in the look-back window, per tenant and meter of the
   hour's pricing (its cost in whole units on the cost meter, or its tokens on the token
   meters before the tenant's switch), what the hour holds minus what is already planned is
   appended as
   `billing.export_planned` with its deterministic identifier (hours.py); tenants without a
   Stripe customer get `billing.export_skipped`, once.
2. **Send** every planned export (this pass's, and any a crashed leader left): one call at a
   time per customer and meter, several customers at once; 429, 409, 5xx and network errors
   are retried with backoff; then `billing.usage_exported` (or `billing.export_failed`) is
   appended. A crash between Stripe's answer and that append leaves the plan planned: the next
   leader sends it again with the same identifier and value, Stripe answers "duplicate", and the
   export is recorded as exported, `duplicate: true`. Nothing is charged twice — as long as
   Stripe still remembers the identifier, which it promises for about 24 h. So an attempt that
   may have reached Stripe (a timeout, a cut connection, a 5xx, or a plan another sender left
   without an answer) is recorded as ambiguous, and such a plan older than
   `BILLING_RESEND_HORIZON` (20 h) is not sent again but held for an operator
   (`billing.export_held`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import stripe
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas.events import (
    Event,
    UsageExportFailed,
    UsageExportHeld,
    UsageExportPlanned,
    UsageExportSkipped,
)
from services.billing import export_outcome as outcome
from services.billing.hours import (
    HourDue,
    Plan,
    Skip,
    closed_before,
    decide,
    floor_hour,
    meter_timestamp,
    meter_total,
    must_hold,
    send_groups,
)
from services.billing.settings import BillingSettings
from services.domain.billing_ledger import PLAN_LOCK_KEY, record_billing_events
from services.domain.stripe_billing import (
    Failure,
    MeterSend,
    StripeBilling,
    classify,
    describe,
    may_have_reached,
)
from services.infra.aio import wait_event
from services.infra.backoff import Backoff
from services.infra.db import Connection, connect

log = structlog.get_logger("billing.pusher")

PUSHER_LOCK_KEY = 0x62696C6C_70757368  # "billpush": leadership (session lock)
ACTOR = "billing-pusher"

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class PusherMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.exports = Counter("billing_exports_total", "Meter events to Stripe, by outcome",
                               ["status"], registry=registry)
        """status: exported, duplicate (Stripe had it: a resend), retry (a retryable error),
        failed (given up), skipped (tenant without a Stripe customer), held (no longer
        resent: it may have reached Stripe too long ago; an operator settles it)."""
        # Every outcome's series exists from the start, at 0: an alert on rate(...) sees the
        # first failure instead of a series that appears with it.
        for status in ("exported", "duplicate", "retry", "failed", "skipped", "held"):
            self.exports.labels(status)
        self.leader = Gauge("billing_pusher_leader", "1 while this process pushes to Stripe",
                            registry=registry)
        self.pending = Gauge("billing_exports_pending", "Planned meter events not yet sent",
                             registry=registry)
        self.held = Gauge("billing_exports_held",
                          "Meter events held for an operator (crosslogic billing settle): "
                          "counted by the leader each pass", registry=registry)


# Per tenant, hour and meter: what the closed hours hold, against what was planned for them.
# `{keys}` limits the tenant hours looked at. Each hour is on the meters of its pricing
# (services/domain/cost_meter.py `meters_for`): the cost meter from the tenant's `cost_from` on,
# the token meters before it; the cost is the hour's sum in the currency, made whole units in
# Python (hours.meter_total), so the filter here only leaves out what is surely planned.
_DUE = """
WITH keys AS (
    {keys}
), usage AS (
    SELECT h.tenant_id, h.hour, sum(h.prompt_tokens)::numeric AS input_tokens,
           sum(h.completion_tokens)::numeric AS output_tokens, sum(h.cost) AS cost
    FROM usage_hourly h JOIN keys USING (tenant_id, hour) GROUP BY 1, 2
), per_meter AS (
    SELECT u.tenant_id, u.hour, x.meter, x.total
    FROM usage u LEFT JOIN billing_accounts a USING (tenant_id)
    CROSS JOIN LATERAL (VALUES ('input_tokens', u.input_tokens, 1::numeric),
                               ('output_tokens', u.output_tokens, 1::numeric),
                               ('cost', u.cost, $unit::numeric)) AS x (meter, total, unit)
    WHERE (x.meter = 'cost') = (a.cost_from IS NOT NULL AND u.hour >= a.cost_from)
), planned AS (
    SELECT m.tenant_id, m.hour, m.meter,
           coalesce(sum(m.value) FILTER (WHERE m.status <> 'skipped'), 0) AS planned,
           max(m.sequence) FILTER (WHERE m.status <> 'skipped') AS last_sequence,
           bool_or(m.status = 'skipped') AS skipped
    FROM meter_exports m JOIN keys USING (tenant_id, hour) GROUP BY 1, 2, 3
)
SELECT m.tenant_id, m.hour, m.meter, m.total, coalesce(p.planned, 0) AS planned,
       p.last_sequence, coalesce(p.skipped, false) AS skipped, a.customer_id
FROM per_meter m
LEFT JOIN planned p USING (tenant_id, hour, meter)
LEFT JOIN billing_accounts a USING (tenant_id)
WHERE m.total > coalesce(p.planned, 0) * (CASE WHEN m.meter = 'cost' THEN $unit::numeric
                                               ELSE 1 END)
ORDER BY m.hour, m.tenant_id, m.meter
"""

# Every closed tenant hour of the look-back ($1 ≤ hour < $2).
_DUE_ALL = _DUE.format(keys="""SELECT DISTINCT tenant_id, hour FROM usage_hourly
    WHERE hour >= $1 AND hour < $2""")

# Only the tenant hours that may have something due since the previous pass: usage changed
# (a log position past $3, the previous pass's mark), the hour closed since ($4: the previous
# pass's bound), or hours skipped for a tenant that is linked now. Each by its own index.
_CHANGED_KEYS = """
    SELECT tenant_id, hour FROM usage_hourly
    WHERE last_position > $3 AND hour >= $1 AND hour < $2
    UNION
    SELECT tenant_id, hour FROM usage_hourly WHERE hour >= $4 AND hour < $2
    UNION
    SELECT s.tenant_id, s.hour FROM meter_exports s JOIN billing_accounts a USING (tenant_id)
    WHERE s.status = 'skipped' AND a.customer_id IS NOT NULL AND s.hour >= $1 AND s.hour < $2
      -- a token hour skipped before the tenant was linked to the cost price: due on the cost
      -- meter until that is planned
      AND (a.cost_from IS NULL OR s.hour < a.cost_from OR s.meter = 'cost'
           OR NOT EXISTS (SELECT 1 FROM meter_exports c
                          WHERE c.tenant_id = s.tenant_id AND c.hour = s.hour
                            AND c.meter = 'cost'))
"""
_DUE_CHANGED = _DUE.format(keys=_CHANGED_KEYS)
_HOURS_CHANGED = f"SELECT count(*) FROM ({_CHANGED_KEYS}) k"

# Planned exports, and whether an attempt was recorded as one that may have reached Stripe
# (from the feed; an hour of slack for the clocks of two leaders).
_PLANNED = """
SELECT m.identifier, m.tenant_id, m.meter, m.event_name, m.hour, m.sequence, m.value,
       m.customer_id, m.planned_at, m.error,
       EXISTS (SELECT 1 FROM billing_events b
               WHERE b.tenant_id = m.tenant_id AND b.type = 'billing.export_failed'
                 AND b.occurred_at >= m.planned_at - interval '1 hour'
                 AND b.data->>'identifier' = m.identifier
                 AND coalesce((b.data->>'ambiguous')::bool, false)) AS ambiguous
FROM meter_exports m WHERE m.status = 'planned'
ORDER BY m.hour, m.sequence, m.tenant_id, m.meter
"""

LEFT_OVER = ("left planned by an earlier sender, which may have sent it before it stopped: "
             "Stripe may have it")


@dataclass
class _Pending:
    plan: Plan
    planned_at: datetime
    ambiguous: bool
    """An attempt may have reached Stripe (recorded as such)."""
    error: str
    """The failure recorded last."""


class Pusher:
    def __init__(self, settings: BillingSettings, pool: asyncpg.Pool[asyncpg.Record],
                 stripe_billing: StripeBilling, *, clock: Clock = utcnow,
                 metrics: PusherMetrics | None = None,
                 while_leading: Callable[[], AbstractAsyncContextManager[None]] | None = None
                 ) -> None:
        self.settings = settings
        self.pool = pool
        self.stripe = stripe_billing
        self.clock = clock
        self.metrics = metrics or PusherMetrics(None)
        self._while_leading = while_leading or contextlib.nullcontext
        """What else the leader does while it leads (settle operators' commands)."""
        self.is_leader = False
        self._reported_unlinked: set[object] = set()
        self._mark: int | None = None
        """The highest log position in usage_hourly at the previous plan (None: look at every
        hour next time)."""
        self._closed_upto = datetime.min.replace(tzinfo=UTC)
        self._full_scan_at = 0.0
        self.hours_checked: int | None = None
        """Tenant hours the last plan looked at (None: it looked at every hour)."""
        self._seen: set[str] = set()
        """Planned identifiers this process has had in hand since it took the lead: any other
        was left by another sender, which may have sent it."""
        self._wake = asyncio.Event()
        self.cost_unit = settings.cost_unit
        # A Decimal from a checked setting (a power of ten), not anyone's input: written into
        # the statements once, where both queries can use it.
        unit = f"'{self.cost_unit:f}'"
        self._due_all = _DUE_ALL.replace("$unit", unit)
        self._due_changed = _DUE_CHANGED.replace("$unit", unit)

    def wake(self) -> None:
        """Run a pass now (a tenant was linked, tests)."""
        self._wake.set()

    # ------------------------------------------------------------------ leadership

    async def run(self) -> None:
        """Compete for leadership; push while leader; until cancelled."""
        while True:
            conn: Connection | None = None
            try:
                conn = await connect(self.settings.database_url.reveal())
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", PUSHER_LOCK_KEY):
                    self._seen.clear()  # another leader may have sent meanwhile
                    self._mark = None  # …and planned: look at everything first
                    self.is_leader = True
                    self.metrics.leader.set(1)
                    log.info("billing pusher is leader")
                    async with self._while_leading():
                        await self._lead(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("pusher lost its database connection", error=str(exc))
            finally:
                if self.is_leader:
                    log.info("billing pusher stepped down")
                self.is_leader = False
                self.metrics.leader.set(0)
                self.metrics.held.set(0)  # the leader's to count
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close())
            await asyncio.sleep(self.settings.billing_leader_retry)

    async def _lead(self, lock_conn: Connection) -> None:
        while True:
            try:
                await self.push_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("push pass failed; retrying", error=str(exc))
            except Exception:
                # A bug must not end pushing for good: the next pass starts from the ledger.
                log.exception("push pass failed")
            # Still holding the lock? A dead connection ends leadership here.
            await lock_conn.fetchval("SELECT 1")
            await wait_event(self._wake, self.settings.billing_push_interval)
            self._wake.clear()

    # ------------------------------------------------------------------ one pass

    async def push_once(self) -> int:
        """Plan what is due, then send everything planned. Returns meter events settled."""
        decisions = await self.plan()
        settled = await self.send_planned(
            {d.identifier for d in decisions if isinstance(d, Plan)})
        # Standing, not a rate: the alert stays up until an operator settles every one.
        self.metrics.held.set(await self.pool.fetchval(
            "SELECT count(*) FROM meter_exports WHERE status = 'held'"))
        return settled

    async def plan(self) -> list[Plan | Skip]:
        now = self.clock()
        upto = closed_before(now, self.settings.hour_grace)
        since = floor_hour(now - timedelta(days=self.settings.billing_push_lookback_days))
        full = self._mark is None or \
            time.monotonic() - self._full_scan_at >= self.settings.billing_full_scan_interval
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PLAN_LOCK_KEY)
            # Read before the hours: a change committed in between is looked at twice, never
            # missed (the projection commits positions in order).
            mark = int(await conn.fetchval(
                "SELECT coalesce(max(last_position), 0) FROM usage_hourly"))
            if full:
                rows = await conn.fetch(self._due_all, since, upto)
                self.hours_checked = None
            else:
                args = (since, upto, self._mark, max(self._closed_upto, since))
                self.hours_checked = int(await conn.fetchval(_HOURS_CHANGED, *args))
                rows = await conn.fetch(self._due_changed, *args) \
                    if self.hours_checked else []
            due = [HourDue(r["tenant_id"], r["hour"], r["meter"],
                           meter_total(r["meter"], r["total"], self.cost_unit),
                           int(r["planned"]), r["last_sequence"], r["skipped"],
                           r["customer_id"]) for r in rows]
            decisions = decide(due, self.settings.meter_events)
            events: list[Event] = []
            for d in decisions:
                if isinstance(d, Plan):
                    events.append(UsageExportPlanned(
                        tenant_id=d.tenant_id, meter=d.meter, event_name=d.event_name,
                        hour=d.hour, value=d.value, identifier=d.identifier,
                        sequence=d.sequence, customer_id=d.customer_id))
                else:
                    events.append(UsageExportSkipped(
                        tenant_id=d.tenant_id, meter=d.meter, hour=d.hour, value=d.value,
                        identifier=d.identifier, reason=d.reason, sequence=d.sequence))
            if events:
                await record_billing_events(conn, events, actor=ACTOR)
        self._mark, self._closed_upto = mark, upto
        if full:
            self._full_scan_at = time.monotonic()
        for d in decisions:
            if isinstance(d, Skip):
                self.metrics.exports.labels("skipped").inc()
                if d.tenant_id not in self._reported_unlinked:
                    self._reported_unlinked.add(d.tenant_id)
                    log.warning("usage not pushed: the tenant has no Stripe customer "
                                "(crosslogic billing link TENANT_ID)",
                                tenant_id=str(d.tenant_id), hour=d.hour.isoformat())
        return decisions

    async def send_planned(self, fresh: Collection[str] = ()) -> int:
        """Send every planned export. `fresh`: identifiers this process planned just now;
        others it has not had in hand before were left by another sender (a crashed or
        deposed leader) and count as possibly sent."""
        rows = await self.pool.fetch(_PLANNED)
        pending = {r["identifier"]: _Pending(
            Plan(r["tenant_id"], r["hour"], r["meter"], r["event_name"], int(r["value"]),
                 r["identifier"], r["sequence"], r["customer_id"]),
            r["planned_at"], r["ambiguous"], r["error"] or "") for r in rows}
        self._seen &= pending.keys()
        for ident, p in pending.items():
            if ident not in fresh and ident not in self._seen and not p.ambiguous:
                await self._record(UsageExportFailed(
                    tenant_id=p.plan.tenant_id, meter=p.plan.meter, hour=p.plan.hour,
                    identifier=ident, error=LEFT_OVER, retryable=True, value=p.plan.value,
                    ambiguous=True))
                p.ambiguous = True
            self._seen.add(ident)
        self.metrics.pending.set(len(pending))
        if not pending:
            return 0
        gate = asyncio.Semaphore(self.settings.billing_push_concurrency)
        settled = 0

        async def one_group(group: list[Plan]) -> None:
            nonlocal settled
            async with gate:
                for plan in group:  # one call at a time per customer and meter
                    if not await self._send(pending[plan.identifier]):
                        return  # Stripe keeps failing: the next pass resumes here
                    settled += 1
                    self.metrics.pending.dec()

        await asyncio.gather(*(one_group(g) for g in send_groups(
            p.plan for p in pending.values())))
        return settled

    async def _send(self, pending: _Pending) -> bool:
        """Send one planned meter event and record the outcome. False: still planned."""
        plan = pending.plan
        backoff = Backoff(self.settings.billing_retry_initial, self.settings.billing_retry_max)
        bound = log.bind(identifier=plan.identifier, customer_id=plan.customer_id)
        last_error = ""
        ambiguous = pending.ambiguous
        for attempt in range(1, self.settings.billing_push_attempts + 1):
            if must_hold(pending.planned_at, self.clock(), self.settings.resend_horizon,
                         ambiguous):
                await self._hold(pending, last_error or pending.error)
                return True
            try:
                sent = await self.stripe.send_meter_event(
                    event_name=plan.event_name, customer_id=plan.customer_id, value=plan.value,
                    identifier=plan.identifier,
                    timestamp=meter_timestamp(plan.hour, self.clock(),
                                              self.settings.backdate_window))
            except stripe.StripeError as exc:
                last_error = describe(exc)
                if classify(exc) is Failure.PERMANENT:
                    bound.error("stripe refused a meter event; giving it up", error=last_error)
                    await self._record(outcome.failed(plan.tenant_id, plan, exc))
                    self.metrics.exports.labels("failed").inc()
                    return True
                self.metrics.exports.labels("retry").inc()
                ambiguous = ambiguous or may_have_reached(exc)
                bound.warning("meter event not sent; retrying", attempt=attempt,
                              error=last_error)
                if attempt < self.settings.billing_push_attempts:
                    await asyncio.sleep(backoff.next())
                continue
            await self._record(outcome.exported(plan.tenant_id, plan,
                                                duplicate=sent is MeterSend.DUPLICATE))
            self.metrics.exports.labels(
                "duplicate" if sent is MeterSend.DUPLICATE else "exported").inc()
            return True
        # Still planned: the next pass sends it again. Recorded once, not at every pass —
        # and once more when it first may have reached Stripe, which the hold rule needs.
        await self._record_retrying(plan, last_error,
                                    newly_ambiguous=ambiguous and not pending.ambiguous)
        return False

    async def _hold(self, pending: _Pending, last_error: str) -> None:
        plan = pending.plan
        age = self.clock() - pending.planned_at
        reason = (f"planned {age.total_seconds() / 3600:.1f} h ago and an earlier attempt may "
                  f"have reached Stripe{f' ({last_error})' if last_error else ''}; Stripe "
                  "keeps identifiers unique for about 24 h, so a resend could be counted "
                  "twice: check Stripe for this identifier")
        await self._record(UsageExportHeld(
            tenant_id=plan.tenant_id, meter=plan.meter, hour=plan.hour,
            identifier=plan.identifier, value=plan.value, planned_at=pending.planned_at,
            reason=reason))
        self.metrics.exports.labels("held").inc()
        log.error("meter event held for an operator: it may have reached Stripe too long ago "
                  "to resend", identifier=plan.identifier, customer_id=plan.customer_id,
                  value=plan.value, planned_at=pending.planned_at.isoformat())

    async def _record(self, event: Event) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await record_billing_events(conn, [event], actor=ACTOR)

    async def _record_retrying(self, plan: Plan, error: str, *, newly_ambiguous: bool) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            already = await conn.fetchval(
                "SELECT error IS NOT NULL FROM meter_exports WHERE identifier = $1",
                plan.identifier)
            if not already or newly_ambiguous:
                await record_billing_events(conn, [UsageExportFailed(
                    tenant_id=plan.tenant_id, meter=plan.meter, hour=plan.hour,
                    identifier=plan.identifier, error=error, retryable=True,
                    value=plan.value, ambiguous=newly_ambiguous)], actor=ACTOR)
