"""The NATS bus: JetStream for what must not be lost, core NATS queue groups for observations.

- Streams (schemas.subjects.STREAMS) are created idempotently and updated in place.
- Every JetStream publish sets ``Nats-Msg-Id`` to the event id: a retried publish within the
  stream's duplicate window is stored once.
- Durable pull consumers (services/infra/consumer.py) ack explicitly; what they cannot take is
  parked on the dead-letter subject ``dlq.<consumer>.<subject>`` with the reason in its headers
  (`Bus.dead_letter`, `dlq_headers`).
- Connecting as an identity, and giving up on a refused credential:
  services/infra/nats_connection.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from prometheus_client import CollectorRegistry

from schemas.arrival import mismatch
from schemas.events import Event, EventDecodeError, decode_event, encode_event
from schemas.subjects import STREAMS, StreamSpec, dlq_subject
from services.infra.bus_metrics import SUBJECT_MISMATCH, UNDECODABLE, BusMetrics
from services.infra.consumer import BatchHandler, Consumer, ConsumerSpec
from services.infra.nats_connection import REFUSALS_BEFORE_GIVING_UP, connect_nats
from services.infra.natsauth.creds import Credentials

log = structlog.get_logger("bus")

MSG_ID = "Nats-Msg-Id"
ERROR_HEADER = "Crosslogic-Error"
SUBJECT_HEADER = "Crosslogic-Original-Subject"
DELIVERIES_HEADER = "Crosslogic-Deliveries"

EventHandler = Callable[[Event], Awaitable[None]]


class Bus:
    def __init__(self, nc: NATS, *, registry: CollectorRegistry | None = None,
                 pending_interval: float = 5.0) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.metrics = BusMetrics(registry)
        self.closing = False
        self.pending_interval = pending_interval
        """Seconds between refreshes of `nats_consumer_pending_messages`."""
        self._tracked: set[tuple[str, str]] = set()
        self._pending_task: asyncio.Task[None] | None = None
        self.identity: Credentials | None = None
        """Who this connection is (None: anonymous)."""
        self.closed = asyncio.Event()
        """Set when the connection is closed for good."""

    @classmethod
    async def connect(cls, url: str, *, name: str, creds: str = "",
                      registry: CollectorRegistry | None = None,
                      connect_timeout: float = 2.0,
                      refusals: int = REFUSALS_BEFORE_GIVING_UP) -> Bus:
        """Connect as the identity of `creds` (a `.creds` text; empty: anonymous, which only
        a server without authentication takes), and keep reconnecting for ever once
        connected (NATS restarts are normal). Replies come to the identity's own inbox.

        An unreachable NATS is waited for, however long. A credential the servers refuse
        `refusals` times in a row (empty, expired, revoked) is given up on: during the first
        connection this raises NatsAuthError; later (revoked while disconnected) the client
        is closed for good, which sets `closed`."""
        bus: Bus | None = None

        def closing() -> bool:
            return bus is not None and bus.closing

        connection = await connect_nats(url, name=name, creds=creds,
                                        connect_timeout=connect_timeout, refusals=refusals,
                                        closing=closing)
        bus = cls(connection.nc, registry=registry)
        bus.identity = connection.identity
        bus.closed = connection.closed
        return bus

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def close(self) -> None:
        """Flush what we published, then close. Not drain(): nats-py's drain of a pull
        subscription waits out its whole 30 s timeout, and unacknowledged messages are
        redelivered to the next consumer anyway."""
        self.closing = True
        if self._pending_task is not None:
            self._pending_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pending_task
            self._pending_task = None
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=1)
        if not self.nc.is_closed:
            try:
                await self.nc.close()
            except (OSError, nats.errors.Error) as exc:  # closing in the middle of a reconnect
                log.debug("nats close failed", error=str(exc) or type(exc).__name__)

    # ------------------------------------------------------------------ streams

    async def wait_for_streams(self, specs: Sequence[StreamSpec] = STREAMS, *,
                               say_every: float = 10.0) -> None:
        """Return once every stream of `specs` exists. Services do not create streams (their
        identities may not): `crosslogic nats setup` does, as `migrate` does the tables."""
        missing = [s.name for s in specs]
        said = -say_every
        began = time.monotonic()
        while True:
            still: list[str] = []
            for name in missing:
                try:
                    await self.js.stream_info(name)
                except nats.js.errors.NotFoundError:
                    still.append(name)
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    still.append(name)  # JetStream not ready yet (a server starting)
            if not still:
                return
            missing = still
            now = time.monotonic()
            if now - said >= say_every:
                said = now
                log.warning("waiting for JetStream streams: run `crosslogic nats setup`",
                            missing=missing, waited=round(now - began, 1))
            await asyncio.sleep(0.5)

    async def ensure_streams(self, specs: Sequence[StreamSpec] = STREAMS, *,
                             replicas: int = 1) -> None:
        """Create the streams, or bring them up to date; `replicas` > 1 on a NATS cluster
        keeps each stream on that many servers (production: 3)."""
        for spec in specs:
            config = api.StreamConfig(
                name=spec.name,
                description=spec.description,
                subjects=list(spec.subjects) or None,
                mirror=api.StreamSource(name=spec.mirror) if spec.mirror else None,
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=spec.max_age_seconds or None,
                duplicate_window=0 if spec.mirror else spec.duplicate_window_seconds,
                discard=api.DiscardPolicy.OLD,
                num_replicas=replicas,
            )
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                # 10058: a stream by that name exists with another config; bring it up to date.
                if exc.err_code != 10058:
                    raise
                await self.js.update_stream(config)

    # ------------------------------------------------------------------ publishing

    async def publish(self, event: Event, *, timeout: float = 5.0) -> api.PubAck:
        """Store an event in JetStream; returns once the stream acknowledged it."""
        return await self.publish_raw(event.subject, encode_event(event), str(event.id),
                                      timeout=timeout)

    async def publish_raw(self, subject: str, payload: bytes, msg_id: str, *,
                          timeout: float = 5.0,
                          headers: dict[str, str] | None = None) -> api.PubAck:
        ack = await self.js.publish(subject, payload, timeout=timeout,
                                    headers={MSG_ID: msg_id, **(headers or {})})
        self.metrics.published.labels(ack.stream).inc()
        return ack

    async def publish_observation(self, event: Event) -> None:
        """Fire-and-forget on core NATS (heartbeats): no ack round trip. A stream holding the
        subject still stores it, deduplicated on the id."""
        await self.nc.publish(event.subject, encode_event(event), headers={MSG_ID: str(event.id)})

    async def subscribe_observations(self, subject: str, queue: str,
                                     handler: EventHandler, *,
                                     dead_letters: str | None = None) -> Subscription:
        """Core NATS queue group: each message goes to one member of `queue`. What is not
        an event, or not the event its subject names, is dropped and counted under `queue`;
        with `dead_letters`, parked on ``dlq.<dead_letters>.<subject>`` too (at a bounded
        rate: a flood of bad observations must not fill the dead-letter stream)."""
        for reason in (UNDECODABLE, SUBJECT_MISMATCH):
            self.metrics.refused.labels(queue, reason)
        budget = ParkBudget()

        async def refuse(msg: Msg, reason: str, error: str) -> None:
            self.metrics.refused.labels(queue, reason).inc()
            if dead_letters is not None and budget.take(time.monotonic()):
                await self.park_observation(dead_letters, msg, error)

        async def on_msg(msg: Msg) -> None:
            try:
                event = decode_event(msg.data)
            except EventDecodeError as exc:
                log.warning("dropping undecodable observation", subject=msg.subject,
                            error=str(exc))
                await refuse(msg, UNDECODABLE, f"decode: {exc}")
                return
            wrong = mismatch(event, msg.subject)
            if wrong is not None:
                log.warning("dropping an observation its subject does not name",
                            subject=msg.subject, error=wrong)
                await refuse(msg, SUBJECT_MISMATCH, f"subject: {wrong}")
                return
            try:
                await handler(event)
            except Exception:
                log.exception("observation handler failed", subject=msg.subject)

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    # ------------------------------------------------------------------ consuming

    async def consumer(self, spec: ConsumerSpec, handler: BatchHandler) -> Consumer:
        config = api.ConsumerConfig(
            durable_name=spec.durable,
            name=spec.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            max_deliver=spec.max_deliver,
            ack_wait=spec.ack_wait,
            max_ack_pending=spec.max_ack_pending,
            filter_subjects=list(spec.subjects) if len(spec.subjects) > 1 else None,
            filter_subject=spec.subjects[0] if len(spec.subjects) == 1 else None,
        )
        await self.js.add_consumer(spec.stream, config)
        sub = await self.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
        self.track_consumer(spec.stream, spec.durable)
        return Consumer(self, spec, sub, handler)

    def track_consumer(self, stream: str, durable: str) -> None:
        """Report this durable consumer's backlog in `nats_consumer_pending_messages`, asked
        of the server every `pending_interval` seconds. `consumer()` does it for its own;
        code that binds a durable consumer itself calls this."""
        self._tracked.add((stream, durable))
        if self._pending_task is None and not self.closing:
            self._pending_task = asyncio.create_task(self._watch_pending(),
                                                     name="nats-consumer-pending")

    async def refresh_pending(self) -> None:
        """Ask the server for each tracked consumer's backlog once."""
        for stream, durable in sorted(self._tracked):
            try:
                info = await self.js.consumer_info(stream, durable, timeout=2)
            except nats.js.errors.NotFoundError:
                # Deleted (or its stream was): no backlog to report, no stale figure left.
                with contextlib.suppress(KeyError):
                    self.metrics.pending.remove(stream, durable)
                continue
            except Exception as exc:
                # NATS away: keep the last figure; the client reconnects by itself.
                log.debug("consumer info unavailable", stream=stream, consumer=durable,
                          error=str(exc) or type(exc).__name__)
                continue
            self.metrics.pending.labels(stream, durable).set(
                (info.num_pending or 0) + (info.num_ack_pending or 0))

    async def _watch_pending(self) -> None:
        while True:
            await self.refresh_pending()
            await asyncio.sleep(self.pending_interval)

    async def park_observation(self, name: str, msg: Msg, reason: str) -> None:
        """`dead_letter` for a core NATS message: fire and forget (a subscription's callback
        must not wait for JetStream), deduplicated on the original's message id if it had
        one."""
        headers = {ERROR_HEADER: reason[:1000], SUBJECT_HEADER: msg.subject,
                   DELIVERIES_HEADER: "1"}
        original = (msg.headers or {}).get(MSG_ID)
        if original:
            # The sender chose `original`: under dead_letter's own "dlq:" prefix a forged
            # "<consumer>:<stream>:<seq>" would take a genuine dead letter's id, and the
            # stream would drop that one as a duplicate.
            headers[MSG_ID] = f"dlq-observation:{name}:{original}"[:200]
        try:
            await self.nc.publish(dlq_subject(name, msg.subject), msg.data, headers=headers)
        except nats.errors.Error as exc:  # NATS away: the counter still says it
            log.debug("could not park an observation", error=str(exc) or type(exc).__name__)

    async def dead_letter(self, consumer: str, msg: Msg, reason: str) -> None:
        meta = msg.metadata
        headers = {
            ERROR_HEADER: reason[:1000],
            SUBJECT_HEADER: msg.subject,
            DELIVERIES_HEADER: str(meta.num_delivered),
        }
        # The consumer and the original stream position make parking the same message twice
        # a no-op, and two consumers parking it two letters.
        await self.publish_raw(dlq_subject(consumer, msg.subject), msg.data,
                               f"dlq:{consumer}:{meta.stream}:{meta.sequence.stream}",
                               headers=headers)


class ParkBudget:
    """A token bucket for parking refused observations: `rate` a second, bursts of `burst`.
    Pure (the caller passes the time)."""

    def __init__(self, rate: float = 20.0, burst: float = 100.0) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at: float | None = None

    def take(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def dlq_headers(msg: Msg) -> dict[str, Any]:
    """What a parked message says about itself (for tools and tests)."""
    h = msg.headers or {}
    return {"error": h.get(ERROR_HEADER), "subject": h.get(SUBJECT_HEADER),
            "deliveries": int(h.get(DELIVERIES_HEADER, "0"))}
