"""The recorder: events that arrive over NATS first (agents, gateways) go into the log once.

It reads a durable JetStream consumer, lets the owning service validate and turn each message
into the events to record (by default: the event itself), appends them in one transaction per
batch and acks after the commit. Idempotent on event id: redeliveries, replays and racing
replicas record each once.

The service decides inside the recording transaction (a `BatchTransform` gets its connection),
so what it reads of the log (the monitor: the node's events) cannot change before its decision
is committed, if it locks what it reads. The incoming events are recorded with origin 'bus'
(they are on NATS already: the outbox relay does not publish them again); events the service
derives from them (the monitor's ``node.accepted``) are not on NATS yet, so they are recorded
with origin 'log' and the relay publishes them. A message the service refuses is parked on the
dead-letter stream; the rest of its batch is recorded.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
import structlog
from prometheus_client import CollectorRegistry, Counter

from schemas.events import Event
from services.infra.bus import Bus
from services.infra.consumer import Consumer, ConsumerSpec, Delivery, TransientError
from services.infra.db import Connection
from services.infra.eventlog import EventLog
from services.infra.log_records import RecordedEvent

log = structlog.get_logger("recorder")

Transform = Callable[[Event], Awaitable[Sequence[Event]]]
"""Validate an incoming event and return what to record (empty: record nothing).
Raise ValueError for a message that must never be recorded: it goes to the dead letters."""


@dataclass(frozen=True)
class Refusal:
    """A message that must never be recorded: it goes to the dead letters, with `reason`."""

    reason: str


Verdict = Sequence[Event] | Refusal
BatchTransform = Callable[[Sequence[Event], Connection], Awaitable[Sequence[Verdict]]]
"""A whole batch at once, inside the recording transaction (`Connection`): one verdict per
incoming event, in order. For lookups made once per batch, and decisions that must hold until
the commit (lock what you read)."""
AfterCommit = Callable[[list[Event], frozenset[uuid.UUID]], Awaitable[None]]
"""Called once a batch is in the log, before its messages are acked: every event of the batch,
and the ids of those this call recorded (the others were in the log already)."""

DATABASE_DOWN: tuple[type[BaseException], ...] = (
    TransientError, OSError, TimeoutError, asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


async def record_as_is(event: Event) -> Sequence[Event]:
    return (event,)


def per_event(transform: Transform) -> BatchTransform:
    """A batch transform that runs `transform` on each event (ValueError: a refusal)."""

    async def batch(events: Sequence[Event], conn: Connection) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for event in events:
            try:
                verdicts.append(await transform(event))
            except ValueError as exc:
                verdicts.append(Refusal(str(exc)))
        return verdicts

    return batch


class Recorder:
    def __init__(self, eventlog: EventLog, bus: Bus, spec: ConsumerSpec, *,
                 transform: Transform = record_as_is,
                 batch_transform: BatchTransform | None = None,
                 on_committed: AfterCommit | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        """`transform` (one event at a time) or `batch_transform` (the whole batch)."""
        self.eventlog = eventlog
        self.bus = bus
        self.spec = dataclasses.replace(spec, transient_errors=DATABASE_DOWN)
        self.transform = batch_transform or per_event(transform)
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
        incoming: list[Event] = []
        derived: list[Event] = []
        recorded: list[RecordedEvent] = []
        async with self.eventlog.pool.acquire() as conn, conn.transaction():
            verdicts = await self.transform([d.event for d in deliveries], conn)
            for d, verdict in zip(deliveries, verdicts, strict=True):
                if isinstance(verdict, Refusal):
                    d.refuse(verdict.reason)
                    continue
                for e in verdict:
                    (incoming if e.id == d.event.id else derived).append(e)
            if incoming:
                recorded += await self.eventlog.record(incoming, origin="bus", conn=conn)
            if derived:
                recorded += await self.eventlog.record(derived, origin="log", conn=conn)
        events = incoming + derived
        if events:
            self.recorded.labels(self.spec.durable).inc(len(recorded))
            if self.on_committed is not None:
                # Every event of the batch, new or already in the log: a redelivered
                # message deserves the same follow-up (an agent waiting for its ack); which
                # are new tells a copy from news.
                await self.on_committed(events, frozenset(r.event_id for r in recorded))
