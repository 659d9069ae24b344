"""Settling a held meter export on an operator's command (the admin API's
`POST /tenants/{tenant_id}/billing/exports/settle`, sent here as `SettleExport`).

A held export (`billing.export_held`) is one the pusher no longer resends: an earlier attempt
may have reached Stripe longer ago than Stripe's identifier deduplication can be counted on.
An operator looks the identifier up in Stripe, then has it resent or recorded as exported.
The pusher's leader carries that out, the one process that sends meter events: its Stripe
client, its metrics, and Stripe's answer recorded as it records any
(export_outcome.py), appended and applied to the ledger in one transaction,
caused by the hold. The leader hears commands only while it leads (`serving`), so a command
reaches one leader or none (the admin API answers 503: nobody pushes to Stripe now).

Only the admin API's NATS identity (and the operators' all-powerful admin identity) may send
on `BILLING_SETTLE`; what arrives is still read as untrusted: bounded, decoded strictly, and
answered `bad_command` when it is not a command.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import msgspec
import nats.errors
import stripe
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from schemas.commands import SettleAction, SettleExport, SettleOutcome, SettleResult
from schemas.events import UsageExported, UsageExportFailed
from schemas.subjects import BILLING_SETTLE
from services.billing import export_outcome as outcome
from services.billing.pusher import PusherMetrics
from services.domain.billing_ledger import record_billing_events
from services.domain.stripe_billing import MeterSend, StripeBilling, may_have_reached
from services.infra.db import Connection

log = structlog.get_logger("billing.settle")

ACTOR = "admin-api"
"""The events name who decided (an operator, through the admin API), as they did when the
admin API carried settling out itself; the correlation is the admin request's id."""

MAX_COMMAND_BYTES = 4096


@dataclass(frozen=True)
class _Export:
    identifier: str
    meter: str
    event_name: str | None
    hour: datetime
    sequence: int
    value: int
    customer_id: str | None
    status: str


def lock_key(identifier: str) -> int:
    """A signed 64-bit advisory lock key per identifier; a collision only serializes two."""
    digest = hashlib.blake2b(f"settle:{identifier}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class SettleDesk:
    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], stripe_billing: StripeBilling,
                 nc: NATS, metrics: PusherMetrics, *,
                 settled: Callable[[], None] = lambda: None) -> None:
        self.pool = pool
        self.stripe = stripe_billing
        self.nc = nc
        self.metrics = metrics
        self.listening = False
        """Subscribed (while the pusher leads)."""
        self.settled = settled
        """Called after each settling (the pusher wakes and recounts what is held)."""

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Hear settle commands while inside (the pusher's leadership)."""
        try:
            sub = await self.nc.subscribe(BILLING_SETTLE, cb=self._on_request)
        except nats.errors.Error as exc:
            # Leading (pushing) matters more: settling waits for the next leadership.
            log.warning("cannot hear settle commands", error=str(exc))
            yield
            return
        try:
            with contextlib.suppress(nats.errors.Error):
                await self.nc.flush(timeout=5)  # the server knows of it: commands reach here
            self.listening = True
            yield
        finally:
            self.listening = False
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _on_request(self, msg: Msg) -> None:
        # One subscription's messages are handled one at a time: two settles of one export
        # meet the lock below only when two leaders overlap.
        if not msg.reply:
            log.warning("settle command without a reply subject: ignored")
            return
        answer = await self.answer(msg.data)
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(msgspec.json.encode(answer))

    async def answer(self, data: bytes) -> SettleOutcome:
        if len(data) > MAX_COMMAND_BYTES:
            return SettleOutcome(result=SettleResult.BAD_COMMAND,
                                 detail=f"command over {MAX_COMMAND_BYTES} bytes")
        try:
            command = msgspec.json.decode(data, type=SettleExport)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("unreadable settle command", error=str(exc)[:200])
            return SettleOutcome(result=SettleResult.BAD_COMMAND, detail=str(exc)[:200])
        bound = log.bind(tenant_id=str(command.tenant_id), identifier=command.identifier,
                         action=command.action.value, request_id=command.correlation_id)
        try:
            result = await self.settle(command)
        except Exception:
            bound.exception("settling a held meter export failed")
            return SettleOutcome(result=SettleResult.FAILED,
                                 detail="billing could not finish settling it: look at the "
                                        "export's status before settling it again")
        finally:
            self.settled()
        bound.info("held meter export settled on an operator's command",
                   result=result.result.value, status=result.status, stripe=result.stripe)
        return result

    async def settle(self, command: SettleExport) -> SettleOutcome:
        key = lock_key(command.identifier)
        # A session lock, not a row lock in a transaction: nothing is held open in the log
        # (its readers wait for open writers) while Stripe answers.
        async with self.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", key)
            try:
                return await self._settle(conn, command)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", key)

    async def _settle(self, conn: Connection, command: SettleExport) -> SettleOutcome:
        tenant_id, ident = command.tenant_id, command.identifier
        export = await _find(conn, tenant_id, ident)
        if export is None:
            return SettleOutcome(result=SettleResult.NOT_FOUND,
                                 detail=f"meter export {ident!r} of tenant {tenant_id} "
                                        "not found")
        if export.status != "held":
            return SettleOutcome(result=SettleResult.NOT_HELD, status=export.status,
                                 detail=f"Meter export {ident!r} is {export.status}, not "
                                        "held: only a held export is settled by hand.")
        answer: MeterSend | None = None
        if command.action is SettleAction.RESEND:
            if not export.customer_id or not export.event_name:
                return SettleOutcome(result=SettleResult.NOT_SENDABLE, status=export.status,
                                     detail=f"Meter export {ident!r} has no Stripe customer "
                                            "or meter event name to send it with.")
            try:
                # Stamped now: its hour's invoice may be final by now.
                answer = await self.stripe.send_meter_event(
                    event_name=export.event_name, customer_id=export.customer_id,
                    value=export.value, identifier=ident, timestamp=int(time.time()))
            except stripe.StripeError as exc:
                return await self._failed(conn, command, export, exc)
        # Marked exported by hand: Stripe had it (the earlier attempt arrived).
        duplicate = answer is not MeterSend.SENT
        await _record(conn, command, outcome.exported(tenant_id, export, duplicate=duplicate))
        self.metrics.exports.labels("duplicate" if duplicate else "exported").inc()
        return SettleOutcome(result=SettleResult.SETTLED, status="exported",
                             stripe=answer.value if answer else None)

    async def _failed(self, conn: Connection, command: SettleExport, export: _Export,
                      exc: stripe.StripeError) -> SettleOutcome:
        """Recorded as the pusher records a failure: retryable keeps it held, a refusal
        marks it failed."""
        failure = outcome.failed(command.tenant_id, export, exc)
        await _record(conn, command, failure)
        self.metrics.exports.labels("retry" if failure.retryable else "failed").inc()
        log.warning("resending a held meter export failed", identifier=export.identifier,
                    error=failure.error, retryable=failure.retryable)
        status = await conn.fetchval("SELECT status FROM meter_exports WHERE identifier = $1",
                                     export.identifier)
        return SettleOutcome(
            result=SettleResult.STRIPE_UNAVAILABLE if failure.retryable
            else SettleResult.STRIPE_REFUSED,
            detail=failure.error, status=str(status), may_have_reached=may_have_reached(exc))


async def _find(conn: Connection, tenant_id: uuid.UUID, identifier: str) -> _Export | None:
    row = await conn.fetchrow(
        """SELECT identifier, meter, event_name, hour, sequence, value, customer_id, status
           FROM meter_exports WHERE identifier = $1 AND tenant_id = $2""",
        identifier, tenant_id)
    return None if row is None else _Export(**dict(row))


async def _record(conn: Connection, command: SettleExport,
                  event: UsageExported | UsageExportFailed) -> None:
    held = await conn.fetchval(
        """SELECT event_id FROM billing_events WHERE tenant_id = $1
             AND type = 'billing.export_held' AND data->>'identifier' = $2
           ORDER BY occurred_at DESC LIMIT 1""", command.tenant_id, event.identifier)
    async with conn.transaction():
        await record_billing_events(conn, [event], actor=ACTOR,
                                    correlation_id=command.correlation_id or None,
                                    causation_id=str(held) if held else None)
