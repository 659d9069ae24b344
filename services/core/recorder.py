"""The recorder: events that arrive over NATS first (agents, gateways) go into the log once.

It reads a durable JetStream consumer, lets the owning service validate and turn each message
into the events to record (by default: the event itself), appends them in one transaction per
batch with origin 'bus' (so the outbox relay does not publish them again) and acks after the
commit. Idempotent on event id: redeliveries, replays and racing replicas record each once.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import structlog
from prometheus_client import CollectorRegistry, Counter

from schemas.events import Event
from services.core.bus import Bus, Consumer, ConsumerSpec, Delivery, PermanentError, TransientError
from services.core.eventlog import EventLog

log = structlog.get_logger("recorder")

Transform = Callable[[Event], Awaitable[Sequence[Event]]]
AfterCommit = Callable[[list[Event], frozenset[uuid.UUID]], Awaitable[None]]
"""Called once a batch is in the log, before its messages are acked: every event of the batch,
and the ids of those this call recorded (the others were in the log already)."""
"""Validate an incoming event and return what to record (empty: record nothing).
Raise ValueError for a message that must never be recorded: it goes to the dead letters."""

DATABASE_DOWN: tuple[type[BaseException], ...] = (
    TransientError, OSError, TimeoutError, asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


async def record_as_is(event: Event) -> Sequence[Event]:
    return (event,)


class Recorder:
    def __init__(self, eventlog: EventLog, bus: Bus, spec: ConsumerSpec, *,
                 transform: Transform = record_as_is,
                 on_committed: AfterCommit | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.eventlog = eventlog
        self.bus = bus
        self.spec = dataclasses.replace(spec, transient_errors=DATABASE_DOWN)
        self.transform = transform
        self.on_committed = on_committed
        self.recorded = Counter("recorder_events_recorded_total",
                                "Events recorded into the log from NATS", ["consumer"],
                                registry=registry)
        self.consumer: Consumer | None = None

    async def start(self) -> Consumer:
        self.consumer = await self.bus.consumer(self.spec, self.handle)
        return self.consumer

    async def run(self) -> None:
        consumer = self.consumer or await self.start()
        await consumer.run()

    async def handle(self, deliveries: list[Delivery]) -> None:
        events: list[Event] = []
        for d in deliveries:
            try:
                events.extend(await self.transform(d.event))
            except ValueError as exc:
                raise PermanentError(str(exc)) from exc
        if events:
            recorded = await self.eventlog.record(events, origin="bus")
            self.recorded.labels(self.spec.durable).inc(len(recorded))
            if self.on_committed is not None:
                # Every event of the batch, new or already in the log: a redelivered
                # message deserves the same follow-up (an agent waiting for its ack); which
                # are new tells a copy from news.
                await self.on_committed(events, frozenset(r.event_id for r in recorded))
