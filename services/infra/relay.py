"""The outbox relay: publishes events appended to the log to NATS, in log order, once each.

One relay is active across all replicas: leadership is a session advisory lock held on the
relay's own connection, so it dies with that connection (crash, network cut) and a standby,
polling for it, takes over. The checkpoint moves only over acknowledged publishes; a relay
killed between a publish and its checkpoint republishes that event on takeover, and JetStream
drops the copy (``Nats-Msg-Id`` = event id, inside the duplicate window).
Events that arrived over NATS first (origin 'bus') are skipped: they are already there.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas.events import subject_for
from services.infra.aio import stop_task
from services.infra.bus import Bus
from services.infra.db import Connection, connect
from services.infra.eventlog import EventLog
from services.infra.http import BUS, REGISTRY, WAKER, Needs, background, create_app
from services.infra.log_records import START, EventFilter, LogPosition
from services.infra.log_waker import LogWaker
from services.infra.settings import CoreSettings

log = structlog.get_logger("relay")

RELAY_LOCK_KEY = 0x72656C61_79303031  # "relay001"
CHECKPOINT = "outbox-relay"


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.published = Counter("outbox_relay_published_total",
                                 "Events published to NATS by the outbox relay",
                                 registry=registry)
        self.leader = Gauge("outbox_relay_leader", "1 while this process is the active relay",
                            registry=registry)
        self.errors = Counter("outbox_relay_errors_total", "Relay publish or database errors",
                              ["kind"], registry=registry)
        self.lag = Gauge("outbox_relay_lag_events",
                         "Events appended to the log (origin 'log') after the relay's "
                         "checkpoint: not yet published to NATS", registry=registry)


class OutboxRelay:
    def __init__(self, dsn: str, bus: Bus, *, waker: LogWaker | None = None,
                 batch_size: int = 500, leader_retry: float = 2.0, lag_interval: float = 5.0,
                 registry: CollectorRegistry | None = None) -> None:
        self.dsn = dsn
        self.bus = bus
        self.waker = waker
        self.batch_size = batch_size
        self.leader_retry = leader_retry
        self.lag_interval = lag_interval
        self.metrics = RelayMetrics(registry)
        self.is_leader = False
        self.filter = EventFilter(origin="log")

    async def run(self) -> None:
        """Compete for leadership, relay while leader; until cancelled. Every replica reports
        the lag, leader or not: with no leader at all it still grows, and alerts."""
        lag = asyncio.create_task(self._track_lag(), name="outbox-relay-lag")
        try:
            await self._lead()
        finally:
            await stop_task(lag)

    async def _lead(self) -> None:
        while True:
            conn: Connection | None = None
            try:
                conn = await connect(self.dsn)
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK_KEY):
                    self.is_leader = True
                    self.metrics.leader.set(1)
                    log.info("outbox relay is leader")
                    await self._relay(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self.metrics.errors.labels("database").inc()
                log.warning("relay lost its database connection", error=str(exc))
            finally:
                if self.is_leader:
                    log.info("outbox relay stepped down")
                self.is_leader = False
                self.metrics.leader.set(0)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close())
            await asyncio.sleep(self.leader_retry)

    async def _relay(self, conn: Connection) -> None:
        eventlog = EventLog(conn)
        await conn.execute("INSERT INTO checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING",
                           CHECKPOINT)
        row = await conn.fetchrow(
            "SELECT transaction_id, position FROM checkpoints WHERE name = $1", CHECKPOINT)
        checkpoint = LogPosition(row["transaction_id"], row["position"]) if row else START
        while True:
            generation = self.waker.generation if self.waker else 0
            page = await eventlog.read_all(checkpoint, self.batch_size, self.filter)
            for recorded in page.events:
                subject = subject_for(recorded.type, recorded.stream, recorded.data)
                await self._publish(subject, recorded.wire(), str(recorded.event_id))
                checkpoint = recorded.checkpoint
                await self._save(conn, checkpoint)
            if page.next != checkpoint:
                checkpoint = page.next  # past events that need no publishing
                await self._save(conn, checkpoint)
            if page.caught_up:
                if self.waker is not None:
                    await self.waker.wait(generation)
                else:
                    await asyncio.sleep(0.5)

    async def _publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        delay = 0.1
        while True:
            try:
                await self.bus.publish_raw(subject, payload, msg_id)
                self.metrics.published.inc()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # NATS down: keep the order by retrying this very event until it is stored.
                self.metrics.errors.labels("publish").inc()
                log.warning("relay publish failed; retrying", subject=subject,
                            error=str(exc) or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def lag(self, conn: Connection) -> int:
        row = await conn.fetchrow(
            "SELECT transaction_id, position FROM checkpoints WHERE name = $1", CHECKPOINT)
        after = LogPosition(row["transaction_id"], row["position"]) if row else START
        return await EventLog(conn).count_after(after, origin="log")

    async def _track_lag(self) -> None:
        conn: Connection | None = None
        try:
            while True:
                try:
                    if conn is None or conn.is_closed():
                        conn = await connect(self.dsn)
                    self.metrics.lag.set(await self.lag(conn))
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.debug("relay lag unknown", error=str(exc) or type(exc).__name__)
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.close()
                    conn = None
                await asyncio.sleep(self.lag_interval)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.close())

    @staticmethod
    async def _save(conn: Connection, checkpoint: LogPosition) -> None:
        await conn.execute(
            """UPDATE checkpoints SET transaction_id = $2, position = $3, updated_at = now()
               WHERE name = $1""", CHECKPOINT, checkpoint.transaction_id, checkpoint.position)


# --------------------------------------------------------------------------- as a service


class RelaySettings(CoreSettings, kw_only=True, frozen=True):
    service_name: str = "relay"
    http_port: int = 8079
    relay_batch_size: int = 500
    relay_leader_retry: float = 2.0
    relay_lag_interval: float = 5.0


RELAY_SETTINGS = web.AppKey("relay_settings", RelaySettings)


async def _run_relay(app: web.Application) -> None:
    settings = app[RELAY_SETTINGS]
    relay = OutboxRelay(settings.database_url.reveal(), app[BUS], waker=app[WAKER],
                        batch_size=settings.relay_batch_size,
                        leader_retry=settings.relay_leader_retry,
                        lag_interval=settings.relay_lag_interval, registry=app[REGISTRY])
    await relay.run()


def relay_app(settings: RelaySettings) -> web.Application:
    """`crosslogic relay`: the outbox relay with the service shell; run several, one leads."""
    app = create_app(settings, needs=Needs(postgres=True, redis=False, nats=True))
    app[RELAY_SETTINGS] = settings
    app.cleanup_ctx.append(background("outbox-relay", _run_relay))
    return app
