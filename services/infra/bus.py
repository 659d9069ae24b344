"""The NATS bus: JetStream for what must not be lost, core NATS queue groups for observations.

- Streams (schemas.subjects.STREAMS) are created idempotently and updated in place.
- Every JetStream publish sets ``Nats-Msg-Id`` to the event id: a retried publish within the
  stream's duplicate window is stored once.
- Durable pull consumers ack explicitly. A message that does not decode, that is not what its
  subject says (schemas/arrival.py: a ``node.heartbeat.A`` carrying node B), that the handler
  refuses (`Delivery.refuse`), or that keeps failing (``max_deliver``), is parked on the
  dead-letter subject ``dlq.<consumer>.<subject>`` with the reason in its headers, then
  terminated; refusals are counted in ``nats_messages_refused_total{consumer, reason}``.
  Failures of the handler's own dependencies (Postgres down) are *transient*: the batch is
  retried in place, without spending delivery attempts, so an outage never sends good messages
  to the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas.arrival import mismatch
from schemas.events import Event, EventDecodeError, decode_event, encode_event
from schemas.subjects import STREAMS, StreamSpec, dlq_subject
from services.infra.natsauth.creds import Credentials

log = structlog.get_logger("bus")

MSG_ID = "Nats-Msg-Id"
ERROR_HEADER = "Crosslogic-Error"
SUBJECT_HEADER = "Crosslogic-Original-Subject"
DELIVERIES_HEADER = "Crosslogic-Deliveries"


class NatsAuthError(ConnectionError):
    """NATS refused the credential (missing, expired, revoked, or not this server's)."""


AUTH_REFUSALS = ("authorization violation", "authentication expired",
                 "authentication revoked", "credentials revoked", "authorization failed")
"""How the servers (and nats-py) word a refused credential: `'Authorization Violation'` at
CONNECT (none, forged, expired or revoked), `user authentication expired` / `… revoked` on a
live connection. Not "authentication timeout": that is a slow client on a busy machine, and
the next attempt passes. Nor "permissions violation": a refused subject, not a refused
identity."""

REFUSALS_BEFORE_GIVING_UP = 3
"""Refusals in a row (with no connection in between) after which `Bus.connect` gives up: not
one, because a server of a cluster can refuse for a moment while it catches up with an
account update (a re-issued account, a new signing key) that its peers already have."""


def auth_refusal(error: str) -> bool:
    """Whether `error` (a nats-py error's text) is the servers refusing the credential, rather
    than NATS being unreachable or restarting. Pure."""
    text = error.lower()
    return any(refusal in text for refusal in AUTH_REFUSALS)


@dataclass
class RefusalStreak:
    """Counts the servers' refusals of the credential since the last successful connection;
    other errors (connection refused, timeouts: NATS away) neither count nor reset it. Pure."""

    limit: int = REFUSALS_BEFORE_GIVING_UP
    count: int = 0

    def failed(self, error: str) -> bool:
        """Note an error; True once the credential has been refused `limit` times in a row."""
        if auth_refusal(error):
            self.count += 1
        return self.count >= self.limit

    def connected(self) -> None:
        self.count = 0


class TransientError(Exception):
    """Raise from a handler when a dependency is down: the batch is retried, not failed."""


class PermanentError(Exception):
    """Raise from a handler for a message that can never succeed: parked at once, not retried."""


UNDECODABLE = "undecodable"
SUBJECT_MISMATCH = "subject_mismatch"
REFUSED = "refused"
REFUSAL_REASONS = (UNDECODABLE, SUBJECT_MISMATCH, REFUSED)
"""`nats_messages_refused_total`'s reasons: not an event; an event its subject does not name;
an event the receiving service refused (its own metrics say why)."""


class BusMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.refused = Counter("nats_messages_refused_total",
                               "Messages a receiver refused: not an event, not the event its "
                               "subject names, or refused by the service",
                               ["consumer", "reason"], registry=registry)
        self.published = Counter("nats_published_total", "Messages published to NATS",
                                 ["stream"], registry=registry)
        self.consumed = Counter("nats_consumed_total", "Messages handled by a consumer",
                                ["consumer", "outcome"], registry=registry)
        self.pending = Gauge("nats_consumer_pending_messages",
                             "Messages a durable consumer has not settled: not yet delivered "
                             "(num_pending) plus delivered and not acknowledged "
                             "(num_ack_pending)", ["stream", "consumer"], registry=registry)


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
        credentials = Credentials.parse(creds) if creds else None
        # Names the identity, never the URL (it may carry a password) nor the credential.
        who = (f"{name} (anonymous)" if credentials is None else
               f"{name} (identity {credentials.name!r}, key {credentials.public_key})")

        said: dict[str, float] = {}
        streak = RefusalStreak(max(1, refusals))
        refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        giving_up: list[asyncio.Task[None]] = []
        abandoned = False
        bus: Bus | None = None
        nc = NATS()

        async def on_error(exc: Exception) -> None:
            # While NATS is away the client fails every 0.5 s: say each kind of error once a
            # minute, not twice a second from every process.
            error = str(exc) or type(exc).__name__
            now = time.monotonic()
            if now - said.get(error, -60.0) >= 60.0:
                said[error] = now
                log.warning("nats error", error=error)
            if not streak.failed(error):
                return
            if bus is None:
                # The first connection, which nats-py (max_reconnect_attempts=-1) would retry
                # for ever: Bus.connect stops it and raises.
                if not refused.done():
                    refused.set_result(error)
            elif not giving_up and not nc.is_closed:
                # Revoked or expired while disconnected: nats-py fires closed_cb only when
                # the -ERR reaches a live connection, and retries a refused reconnection for
                # ever. Close for good, from a task of our own: close() cancels the
                # reconnection task that is calling us.
                log.error("nats refused this credential on reconnection: closing for good",
                          identity=who, refusals=streak.count, error=error)
                giving_up.append(asyncio.create_task(nc.close(), name=f"nats-give-up-{name}"))

        async def on_disconnect() -> None:
            if abandoned:  # our own close of a first connection given up on
                return
            if bus is None or not bus.closing:
                log.warning("nats disconnected")

        async def on_reconnect() -> None:
            streak.connected()
            log.info("nats reconnected")

        closed = asyncio.Event()

        async def on_closed() -> None:
            # For good: the servers refused the credential (revoked, expired) on a live
            # connection or on every reconnection; otherwise only close() does this.
            closed.set()
            if bus is not None and not bus.closing:
                log.error("nats connection closed for good (credential refused?)",
                          identity=who)

        auth: dict[str, Any] = {}
        if credentials is not None:
            identity = credentials
            must_be_tls = urllib.parse.urlsplit(url).scheme == "tls"

            def user_jwt() -> bytearray:
                return bytearray(identity.jwt.encode())

            def signature(nonce: str) -> bytes:
                # nats-py moves to TLS only when the server asks for it: a tls:// URL answered
                # in plain text may be someone in the middle, and the nonce it hands us
                # signed would let it connect as us. Refuse to sign (the client retries).
                if must_be_tls and not nc._server_info.get("tls_required"):
                    raise NatsAuthError(f"{url} answered without TLS: not signing in")
                return identity.nonce_signature(nonce)

            auth = {"user_jwt_cb": user_jwt, "signature_cb": signature,
                    "inbox_prefix": credentials.inbox_prefix}

        async def abandon() -> None:
            nonlocal abandoned
            abandoned = True
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            # Whatever state the first connection was left in (a socket half open, or never
            # started): nothing of it may outlive this call.
            with contextlib.suppress(Exception):
                await nc.close()

        # A task, so that a refusal can stop it: nats-py never returns from a first
        # connection that keeps failing.
        connecting = asyncio.ensure_future(nc.connect(
            # reconnect_time_wait is typed int, but is any number of seconds
            servers=[url], name=name, connect_timeout=int(max(1, connect_timeout)),
            allow_reconnect=True, max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,  # type: ignore[arg-type]
            error_cb=on_error, disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect, closed_cb=on_closed, **auth))
        try:
            waits: set[asyncio.Future[Any]] = {connecting, refused}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled: a stop before NATS answered
            await abandon()
            raise
        if not connecting.done():
            await abandon()
            raise NatsAuthError(
                f"NATS refused the credential of {who} {streak.count} times "
                f"({refused.result()}): empty, expired or revoked? Set NATS_CREDS to this "
                "identity's .creds (see docs/security.md)")
        try:
            connecting.result()
        except nats.errors.Error as exc:
            if auth_refusal(str(exc)):
                raise NatsAuthError(f"NATS refused the credential of {who} ({exc}): set "
                                    "NATS_CREDS to this identity's .creds (see "
                                    "docs/security.md)") from None
            raise
        streak.connected()
        bus = cls(nc, registry=registry)
        bus.identity = credentials
        bus.closed = closed
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


class Consumer:
    """Fetches batches from a durable pull consumer and hands them to `handler`. Run it with
    `run()` (until cancelled) or drive it with `process_batch()` in tests."""

    def __init__(self, bus: Bus, spec: ConsumerSpec, sub: JetStreamContext.PullSubscription,
                 handler: BatchHandler) -> None:
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
