"""The delivery loop: claim due deliveries (one per endpoint at a time), send them, record how
it went. Several replicas run it against the same tables and share the work (see `store`).

Wakes up when the intake queued something, when a send finished (the endpoint's next delivery
may be due), when the next pending delivery falls due, and at least every `poll_interval`.
Stopping lets sends in flight finish (bounded by their timeout) so they are recorded, rather
than cut off and sent again by another replica once their lease runs out.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable
from urllib.parse import urlsplit

import asyncpg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.domain.notifications.targets import Kind, scrub
from services.infra.aio import wait_event
from services.infra.eventlog import EventLog
from services.notifier import store
from services.notifier.policy import AttemptResult, Rules, decide
from services.notifier.senders import Sender

log = structlog.get_logger("notifier")

DATABASE_DOWN: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)


class NotifierMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.queued = Counter("notifier_deliveries_queued_total",
                              "Deliveries queued (one per subscription and event)",
                              registry=registry)
        self.attempts = Counter("notifier_attempts_total", "Requests made to endpoints",
                                ["kind", "outcome"], registry=registry)
        self.latency = Histogram("notifier_attempt_seconds", "Time of one attempt", ["kind"],
                                 registry=registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.finished = Counter("notifier_deliveries_total", "Deliveries finished",
                                ["status"], registry=registry)
        self.disabled = Counter("notifier_endpoints_disabled_total", "Endpoints disabled",
                                registry=registry)
        self.inflight = Gauge("notifier_inflight", "Sends in flight on this replica",
                              registry=registry)


class Scheduler:
    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], eventlog: EventLog, sender: Sender,
                 rules_for: Callable[[Kind], Rules], metrics: NotifierMetrics, *,
                 concurrency: int, lease_seconds: float, poll_interval: float) -> None:
        self.pool = pool
        self.eventlog = eventlog
        self.sender = sender
        self.rules_for = rules_for
        self.metrics = metrics
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self._wakeup = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        delay = 0.2
        while not self._stopping:
            self._wakeup.clear()
            free = self.concurrency - len(self._inflight)
            try:
                claimed = await store.claim(self.pool, free, self.lease_seconds)
                wait = self.poll_interval
                if len(claimed) < free:
                    due = await store.next_due_in(self.pool)
                    if due is not None:
                        wait = min(max(due, 0.02), self.poll_interval)
                delay = 0.2
            except DATABASE_DOWN as exc:
                log.warning("cannot claim deliveries; retrying", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except Exception:
                # A bug must not stop every delivery for good: say so loudly, keep going.
                log.exception("claiming deliveries failed; retrying")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            for c in claimed:
                task = asyncio.create_task(self._deliver(c), name=f"deliver-{c.id}")
                self._inflight.add(task)
                task.add_done_callback(self._finished)
            self.metrics.inflight.set(len(self._inflight))
            if claimed and len(claimed) == free:
                continue  # more may be due; a full house waits for a finished send below
            await wait_event(self._wakeup, wait)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self.metrics.inflight.set(len(self._inflight))
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())
        self._wakeup.set()

    async def _deliver(self, claimed: store.Claimed) -> None:
        target = claimed.target
        kind = target.kind.value
        try:
            result = await self.sender.send(target, claimed.event)
        except Exception as exc:
            # A payload this build cannot shape is a failed attempt like any other: it goes
            # through the schedule to delivery_failed instead of being retried for ever.
            # The traceback may quote the URL (its token) or the secret: scrubbed first.
            trace = scrub("".join(traceback.format_exception(exc)), target.address,
                          urlsplit(target.address).path, target.signing_secret)
            log.error("sending failed", delivery_id=str(claimed.id), traceback=trace)
            result = AttemptResult(None, 0.0, error=f"notifier error: {type(exc).__name__}")
        self.metrics.latency.labels(kind).observe(result.latency_ms / 1000)
        delay = 0.2
        while True:
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    now = await store.clock(conn)
                    decision = decide(result, failures=claimed.failures,
                                      failing_since=await store.failing_since(
                                          conn, target.subscription_id),
                                      now=now, rules=self.rules_for(target.kind))
                    recorded = await store.record(conn, claimed, result, decision, now,
                                                  eventlog=self.eventlog)
                break
            except DATABASE_DOWN as exc:
                if self._stopping:
                    # The lease runs out and another replica sends it again.
                    log.warning("could not record an attempt before stopping",
                                delivery_id=str(claimed.id), error=str(exc))
                    return
                log.warning("cannot record an attempt; retrying", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.metrics.attempts.labels(kind, decision.outcome.value).inc()
        if decision.status != "pending" and recorded.current:
            self.metrics.finished.labels(decision.status).inc()
        if recorded.disabled:
            self.metrics.disabled.inc()
        # The masked target only: a webhook URL carries its token.
        level = log.info if decision.outcome.value == "delivered" else log.warning
        level("notification attempt", subscription_id=str(target.subscription_id),
              kind=kind, target=target.masked, event_type=claimed.event_type,
              event_id=str(claimed.event_id), attempt=claimed.attempts + 1,
              status=result.status_code, outcome=decision.outcome.value,
              next_in=decision.next_attempt_in, ms=result.latency_ms,
              error=result.error or None, disabled=recorded.disabled or None,
              exhausted=decision.exhausted or None)

    async def stop(self, grace: float) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
