"""JetStream durable pull consumers: fetch a batch, hand it to the handler, then ack, retry or
park each message.

Consumers ack explicitly. A message that does not decode, that is not what its subject says
(schemas/arrival.py: a ``node.heartbeat.A`` carrying node B), that the handler refuses
(`Delivery.refuse`), or that keeps failing (``max_deliver``), is parked on the dead-letter
subject ``dlq.<consumer>.<subject>`` with the reason in its headers, then terminated; refusals
are counted in ``nats_messages_refused_total{consumer, reason}``. Failures of the handler's own
dependencies (Postgres down) are *transient*: the batch is retried in place, without spending
delivery attempts, so an outage never sends good messages to the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas.arrival import mismatch
from schemas.events import Event, EventDecodeError, decode_event
from services.infra.bus_metrics import (
    REFUSAL_REASONS,
    REFUSED,
    SUBJECT_MISMATCH,
    UNDECODABLE,
    BusMetrics,
)

log = structlog.get_logger("bus")


class TransientError(Exception):
    """Raise from a handler when a dependency is down: the batch is retried, not failed."""


class PermanentError(Exception):
    """Raise from a handler for a message that can never succeed: parked at once, not retried."""


@dataclass(frozen=True)
class ConsumerSpec:
    durable: str
    stream: str
    subjects: tuple[str, ...]
    batch: int = 256
    max_deliver: int = 5
    ack_wait: float = 30.0
    fetch_timeout: float = 1.0
    nak_delays: tuple[float, ...] = (0.5, 2.0, 10.0, 30.0)
    """Redelivery delay after the 1st, 2nd, … failure (the last repeats)."""
    transient_errors: tuple[type[BaseException], ...] = (TransientError, OSError, TimeoutError)
    max_ack_pending: int = 10_000


@dataclass
class Delivery:
    event: Event
    subject: str
    num_delivered: int
    stream_sequence: int
    msg: Msg = field(repr=False)
    refusal: str | None = None
    """Set by the handler (`refuse`): the message is parked, not acked, once the batch is
    handled; the rest of the batch goes on."""

    def refuse(self, reason: str) -> None:
        self.refusal = reason


BatchHandler = Callable[[list[Delivery]], Awaitable[None]]


class ConsumerBus(Protocol):
    """What a `Consumer` needs of its bus (`Bus` is one): the metrics it counts outcomes in,
    and the dead-letter stream it parks messages on."""

    @property
    def metrics(self) -> BusMetrics: ...

    async def dead_letter(self, consumer: str, msg: Msg, reason: str) -> None: ...


class Consumer:
    """Fetches batches from a durable pull consumer and hands them to `handler`. Run it with
    `run()` (until cancelled) or drive it with `process_batch()` in tests."""

    def __init__(self, bus: ConsumerBus, spec: ConsumerSpec,
                 sub: JetStreamContext.PullSubscription, handler: BatchHandler) -> None:
        self.bus = bus
        self.spec = spec
        self.sub = sub
        self.handler = handler
        self.log = log.bind(consumer=spec.durable)
        self._outcomes = bus.metrics.consumed
        # Each outcome's series from the start, at 0: an alert on increase() sees the first
        # dead letter, not a series that appears with it.
        for outcome in ("ack", "nak", "dead_letter"):
            self._outcomes.labels(spec.durable, outcome)
        self._refused = bus.metrics.refused
        for reason in REFUSAL_REASONS:
            self._refused.labels(spec.durable, reason)

    async def run(self) -> None:
        delay = 0.2
        while True:
            try:
                await self.process_batch()
                delay = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # NATS down or restarting: the client reconnects by itself; we wait for it.
                self.log.warning("fetch failed; retrying", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def process_batch(self) -> int:
        """Fetch up to `batch` messages (waiting at most `fetch_timeout`) and settle each."""
        try:
            msgs = await self.sub.fetch(self.spec.batch, timeout=self.spec.fetch_timeout)
        except (nats.errors.TimeoutError, TimeoutError):
            # Nothing to fetch (nats-py raises either, depending on where it waited).
            return 0
        deliveries: list[Delivery] = []
        for msg in msgs:
            meta = msg.metadata
            try:
                event = decode_event(msg.data)
            except EventDecodeError as exc:
                self.log.warning("undecodable message to dead letters", subject=msg.subject,
                                 error=str(exc))
                await self._park(msg, f"decode: {exc}", UNDECODABLE)
                continue
            wrong = mismatch(event, msg.subject)
            if wrong is not None:
                self.log.warning("message its subject does not name to dead letters",
                                 subject=msg.subject, error=wrong)
                await self._park(msg, f"subject: {wrong}", SUBJECT_MISMATCH)
                continue
            deliveries.append(Delivery(event, msg.subject, meta.num_delivered,
                                       meta.sequence.stream, msg))
        if deliveries:
            await self._settle(deliveries)
        return len(msgs)

    async def _settle(self, deliveries: list[Delivery]) -> None:
        try:
            await self._handle_with_retry(deliveries)
        except Exception as exc:
            if len(deliveries) == 1:
                await self._failed(deliveries[0], exc)
                return
            # Someone in the batch is poison: find who by handling them one at a time.
            for d in deliveries:
                try:
                    await self._handle_with_retry([d])
                except Exception as exc:
                    await self._failed(d, exc)
                else:
                    await self._done(d)
            return
        for d in deliveries:
            await self._done(d)

    async def _handle_with_retry(self, deliveries: list[Delivery]) -> None:
        delay = 0.2
        while True:
            for d in deliveries:  # a refusal holds for the attempt that made it only
                d.refusal = None
            try:
                await self.handler(deliveries)
                return
            except self.spec.transient_errors as exc:
                self.log.warning("handler dependency unavailable; retrying batch",
                                 error=str(exc) or type(exc).__name__, size=len(deliveries))
                with contextlib.suppress(Exception):
                    for d in deliveries:
                        await d.msg.in_progress()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _done(self, d: Delivery) -> None:
        if d.refusal is None:
            await d.msg.ack()
            self._outcomes.labels(self.spec.durable, "ack").inc()
            return
        self.log.warning("message refused; to dead letters", subject=d.subject,
                         error=d.refusal)
        await self._park(d.msg, f"refused: {d.refusal}", REFUSED)

    async def _failed(self, d: Delivery, exc: Exception) -> None:
        if isinstance(exc, PermanentError):
            self.log.warning("message refused; to dead letters", subject=d.subject,
                             error=str(exc))
            await self._park(d.msg, f"refused: {exc}", REFUSED)
            return
        if d.num_delivered >= self.spec.max_deliver:
            self.log.error("message kept failing; to dead letters", subject=d.subject,
                           deliveries=d.num_delivered, error=str(exc))
            await self._park(d.msg, f"failed {d.num_delivered} deliveries: {exc}")
            return
        self.log.warning("handler failed; redelivering later", subject=d.subject,
                         deliveries=d.num_delivered, exc_info=True)
        delays = self.spec.nak_delays
        await d.msg.nak(delay=delays[min(d.num_delivered, len(delays)) - 1])
        self._outcomes.labels(self.spec.durable, "nak").inc()

    async def _park(self, msg: Msg, reason: str, refusal: str | None = None) -> None:
        await self.bus.dead_letter(self.spec.durable, msg, reason)
        await msg.term()
        self._outcomes.labels(self.spec.durable, "dead_letter").inc()
        if refusal is not None:
            self._refused.labels(self.spec.durable, refusal).inc()

