"""Events in: durable JetStream consumers on NODES and CONTROL, each batch queued for the
subscriptions that want it, then acknowledged (after the commit: a crash redelivers, and the
unique (subscription, event) key makes that a no-op).

Messages are read as JSON objects, not through the typed event decoder: a subscription may
name a type this build does not know yet (a newer service during a rolling deploy), and the
notifier only needs the type, id, time, tenant and payload. A message that is not an event at
all, or not the event its subject names (schemas/arrival.py: an ``apikey.created`` on
``node.>``, a node event of another node), is parked on the dead-letter stream and counted in
``nats_messages_refused_total{consumer, reason}``: subscribers must never be told a forged
fact. HEARTBEATS and USAGE are not consumed: far too many
messages, none worth a notification.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from schemas.arrival import raw_mismatch
from schemas.subjects import CONTROL, NODES
from services.infra.bus import Bus
from services.infra.bus_metrics import SUBJECT_MISMATCH, UNDECODABLE
from services.notifier import store
from services.notifier.scheduler import DATABASE_DOWN, NotifierMetrics

log = structlog.get_logger("notifier.intake")


@dataclass(frozen=True)
class IntakeSpec:
    durable: str
    stream: str
    subject: str | None
    """None: everything the stream holds."""


INTAKES = (IntakeSpec("notifier-nodes", NODES.name, "node.>"),
           IntakeSpec("notifier-control", CONTROL.name, None))


class SubjectMismatch(ValueError):
    """An event that is not the one its subject names."""


def parse(data: bytes, subject: str | None = None) -> store.Queued:
    """ValueError for a message that is not an event's JSON object; SubjectMismatch for one
    that `subject` (when given) does not name."""
    try:
        event: Any = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise ValueError("not a JSON object")
    if subject is not None and (wrong := raw_mismatch(event, subject)) is not None:
        raise SubjectMismatch(wrong)
    return store.queued(event)


class Intake:
    def __init__(self, bus: Bus, pool: asyncpg.Pool[asyncpg.Record], *, first_delay: float,
                 batch: int, on_queued: Callable[[], None], metrics: NotifierMetrics,
                 specs: tuple[IntakeSpec, ...] = INTAKES) -> None:
        self.bus = bus
        self.pool = pool
        self.first_delay = first_delay
        self.batch = batch
        self.on_queued = on_queued
        self.metrics = metrics
        self.specs = specs
        self._subs: list[tuple[IntakeSpec, JetStreamContext.PullSubscription]] = []

    async def start(self) -> None:
        for spec in self.specs:
            config = api.ConsumerConfig(
                durable_name=spec.durable, name=spec.durable,
                ack_policy=api.AckPolicy.EXPLICIT,
                # From the stream's start: a subscription only hears events from its own
                # creation on (rules.wants), so history is passed over, never sent.
                deliver_policy=api.DeliverPolicy.ALL,
                ack_wait=30.0, max_ack_pending=10_000, filter_subject=spec.subject)
            await self.bus.js.add_consumer(spec.stream, config)
            sub = await self.bus.js.pull_subscribe_bind(durable=spec.durable,
                                                        stream=spec.stream)
            self.bus.track_consumer(spec.stream, spec.durable)  # its backlog in /metrics
            for reason in (UNDECODABLE, SUBJECT_MISMATCH):
                self.bus.metrics.refused.labels(spec.durable, reason)
            self._subs.append((spec, sub))

    async def run(self) -> None:
        if not self._subs:
            await self.start()
        await asyncio.gather(*(self._follow(spec, sub) for spec, sub in self._subs))

    async def _follow(self, spec: IntakeSpec, sub: JetStreamContext.PullSubscription) -> None:
        delay = 0.2
        while True:
            try:
                await self.process_batch(spec, sub)
                delay = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # NATS restarting (the client reconnects) or a bug: either way, try again;
                # unacknowledged messages come back after ack_wait.
                log.warning("intake failed; retrying", consumer=spec.durable,
                            error=str(exc) or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def process_batch(self, spec: IntakeSpec,
                            sub: JetStreamContext.PullSubscription) -> int:
        try:
            msgs = await sub.fetch(self.batch, timeout=1.0)
        except nats.errors.TimeoutError:
            return 0
        items: list[store.Queued] = []
        kept: list[Msg] = []
        for msg in msgs:
            try:
                items.append(parse(msg.data, msg.subject))
            except SubjectMismatch as exc:
                log.warning("not the event its subject names; to dead letters",
                            subject=msg.subject, error=str(exc))
                await self._refuse(spec, msg, f"subject: {exc}", SUBJECT_MISMATCH)
                continue
            except ValueError as exc:
                log.warning("not an event; to dead letters", subject=msg.subject,
                            error=str(exc))
                await self._refuse(spec, msg, f"decode: {exc}", UNDECODABLE)
                continue
            kept.append(msg)
        added = await self._queue(items, kept)
        for msg in kept:
            await msg.ack()
        if added:
            self.metrics.queued.inc(added)
            self.on_queued()
        return len(msgs)

    async def _refuse(self, spec: IntakeSpec, msg: Msg, error: str, reason: str) -> None:
        await self.bus.dead_letter(spec.durable, msg, error)
        await msg.term()
        self.bus.metrics.refused.labels(spec.durable, reason).inc()

    async def _queue(self, items: list[store.Queued], msgs: list[Msg]) -> int:
        """Retried in place while PostgreSQL is down: the messages are told we are still
        at it, so NATS does not hand them to another replica meanwhile."""
        delay = 0.2
        while True:
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    return await store.intake(conn, items, self.first_delay)
            except DATABASE_DOWN as exc:
                log.warning("cannot queue deliveries; retrying", error=str(exc))
                with contextlib.suppress(Exception):
                    for msg in msgs:
                        await msg.in_progress()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
