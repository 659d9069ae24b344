"""The node agent: runs beside vLLM on a GPU node.

It registers the node (and publishes again until the control plane acknowledges on
``node.ack.<id>``), sends a heartbeat every interval (vLLM health, load from vLLM's /metrics,
GPU utilisation, a health score), watches the cloud's metadata service for a spot notice, and
answers drain commands on ``node.command.<id>``. SIGTERM, a spot notice or a drain command all
end the same way: announce draining, let in-flight requests finish (bounded), deregister,
exit 0. NATS or vLLM being down never stops it: it keeps retrying and says what it sees.

This module holds the lifecycle (connect, drain, leave) and ties the parts together; beside it
are agent/heartbeat.py (what a heartbeat observes and reports), agent/registration.py,
agent/spot_watch.py, agent/commands.py and agent/announcer.py (lifecycle events through outages).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import nats.errors
import structlog
from nats.aio.msg import Msg

from agent.announcer import Announcer
from agent.commands import answer_command
from agent.heartbeat import NodeObserver, Observation, heartbeat_event
from agent.kv_events import KvEventRelay
from agent.registration import ask_to_record, registration_event, wait_for_ack
from agent.settings import AgentSettings
from agent.spot import SpotNotice
from agent.spot_watch import watch_spot
from schemas.events import NodeDeregistered, NodeDraining, NodeHeartbeat, NodeSpotWarning
from schemas.subjects import node_ack_subject, node_command_subject
from services.infra.aio import stop_task, stop_tasks, within
from services.infra.backoff import Backoff
from services.infra.bus import Bus
from services.infra.nats_connection import NatsAuthError

log = structlog.get_logger("agent")

EXIT_DRAINED = 0
EXIT_REJECTED = 3
EXIT_REFUSED = 4
"""NATS refused or dropped this node's credential (revoked when the node ended, or expired):
nothing it says can be heard any more."""


@dataclass(frozen=True)
class DrainRequest:
    reason: str


async def supervise(name: str, run: Callable[[], Awaitable[None]], *,
                    backoff: Backoff | None = None) -> None:
    """Run `run()` until it returns. If it raises, log why and run it again after a backoff:
    a background task of the agent (heartbeats, spot watching, …) must never end silently."""
    backoff = backoff or Backoff(initial=1.0, maximum=30.0)
    while True:
        try:
            await run()
            return
        except Exception:
            delay = backoff.next()
            log.exception("background task failed; restarting it", task=name,
                          retry_in=round(delay, 2))
            await asyncio.sleep(delay)


class NodeAgent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.bus: Bus | None = None
        self.registered = asyncio.Event()
        self.draining = False
        self.sequence = 0
        self.exit_code = EXIT_DRAINED
        self.connecting = False
        """True while waiting for NATS to answer the first time."""
        self._drain: asyncio.Future[DrainRequest] | None = None
        self._announcer = Announcer(lambda: self.drain_deadline)
        """Lifecycle events (spot warning, draining, deregistered), published in order; the
        drain itself never waits on NATS."""
        self.drain_deadline: datetime | None = None
        """When the drain ends whatever is in flight: set by the first request, and only ever
        brought earlier by later ones (a spot notice during an operator's drain)."""
        self.leave_grace = 5.0
        """After the drain, how long the agent keeps trying to tell the control plane."""
        self._registration = registration_event(settings)
        """Built once: every publish of it, even from a restarted task, is the same event."""
        self._session: aiohttp.ClientSession | None = None
        self._observer: NodeObserver | None = None

    @property
    def unannounced(self) -> list[str]:
        """Types of the lifecycle events given up on (NATS unreachable until too late)."""
        return self._announcer.unannounced

    # ------------------------------------------------------------------ lifecycle

    def request_drain(self, reason: str, deadline: datetime | None = None, *,
                      timeout: float | None = None) -> bool:
        """Start a graceful drain that ends by `deadline` or after `timeout` seconds
        (DRAIN_TIMEOUT by default), whichever comes first. The first request starts it (True);
        a later one (False) can still bring the deadline earlier, never later."""
        if self._drain is None:
            return False
        limit = datetime.now(UTC) + timedelta(
            seconds=self.settings.drain_timeout if timeout is None else timeout)
        wanted = min(limit, deadline) if deadline is not None else limit
        if not self._drain.done():
            self.drain_deadline = wanted
            self._drain.set_result(DrainRequest(reason))
            return True
        if self.drain_deadline is not None and wanted < self.drain_deadline:
            log.warning("drain deadline brought forward", reason=reason,
                        deadline=wanted.isoformat())
            self.drain_deadline = wanted
        return False

    async def run(self) -> int:
        structlog.contextvars.bind_contextvars(node_id=str(self.node_id))
        loop = asyncio.get_running_loop()
        self._drain = loop.create_future()
        self._install_signal_handlers(loop)
        timeout = aiohttp.ClientTimeout(total=self.settings.http_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._session = session
            self._observer = NodeObserver(self.settings, session)
            try:
                bus = await self._connect_unless_stopped()
            except NatsAuthError as exc:
                self._remove_signal_handlers(loop)
                log.error("nats refused this node's credential", error=str(exc))
                return EXIT_REFUSED
            if bus is None:
                self._remove_signal_handlers(loop)
                log.info("stopped before nats answered: nothing registered, nothing to drain")
                return self.exit_code
            self.bus = bus
            tasks = [asyncio.create_task(supervise(name, run), name=name) for name, run in (
                ("heartbeats", self._heartbeats), ("register", self._register),
                ("spot", self._watch_spot), ("announcer", self._announce),
                ("credential", self._watch_credential), *self._kv_relay())]
            await self.bus.nc.subscribe(node_command_subject(self.node_id), cb=self._on_command)
            try:
                request = await self._drain
                if self.exit_code == EXIT_DRAINED:
                    await self._drain_and_leave(request)
            finally:
                await stop_tasks(tasks)
                try:
                    await self.bus.close()
                except (OSError, nats.errors.Error) as exc:
                    # nats-py's close while it is reconnecting can fail on the dead socket;
                    # there is nothing left to flush then, and the exit code must stand.
                    log.warning("nats close failed", error=str(exc) or type(exc).__name__)
                self._remove_signal_handlers(loop)
        log.info("agent stopped", exit_code=self.exit_code)
        return self.exit_code

    def _kv_relay(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        endpoint = self.settings.vllm_kv_events_endpoint
        if not endpoint:
            return []
        bus = self.bus
        assert bus is not None

        async def publish(subject: str, payload: bytes, headers: dict[str, str]) -> None:
            await bus.nc.publish(subject, payload, headers=headers)

        relay = KvEventRelay(endpoint, self.settings.vllm_kv_events_topic, self.node_id,
                             publish)
        return [("kv_events", relay.run)]

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        signalled: list[signal.Signals] = []

        def on_signal(sig: signal.Signals) -> None:
            if signalled:
                log.warning("second signal while draining: leaving now", signal=sig.name)
                raise SystemExit(1)
            signalled.append(sig)
            # During a drain already on (an operator's), this only brings its deadline in.
            self.request_drain(f"signal {sig.name}", timeout=self.settings.sigterm_drain_timeout)

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal, sig)

    @staticmethod
    def _remove_signal_handlers(loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

    async def _connect_unless_stopped(self) -> Bus | None:
        """The bus, or None when a stop comes first: a node being reclaimed or scaled down
        while NATS is unreachable must still exit in time. Only SIGTERM or SIGINT can stop it
        here; spot watching and drain commands start once connected."""
        assert self._drain is not None
        connecting = asyncio.create_task(self._connect(), name="connect")
        waits: set[asyncio.Future[Any]] = {connecting, self._drain}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if connecting.done():
            return connecting.result()
        await stop_task(connecting)
        return None

    async def _connect(self) -> Bus:
        """Returns once NATS answers, however long that takes. Bus.connect does the waiting:
        nats-py retries even the first connection for ever (max_reconnect_attempts=-1), every
        0.5 s, logging each failure as "nats error"; it does not raise for an unreachable
        server, so there is nothing to retry here. It raises NatsAuthError when the servers
        refuse the credential a few times in a row (revoked before the node came up,
        expired, none): no retry would change that, and `run` exits EXIT_REFUSED."""
        s = self.settings
        self.connecting = True
        try:
            bus = await Bus.connect(s.nats_url.reveal(), name=f"agent-{self.node_id}",
                                    creds=s.nats_creds.reveal())
        finally:
            self.connecting = False
        log.info("connected to nats")
        return bus

    async def _watch_credential(self) -> None:
        """NATS closes a connection for good when its credential is revoked (the control plane
        ended this node) or expires, and Bus.connect closes it when the servers refuse every
        reconnection (revoked while the node was cut off: a network blip, a NATS restart):
        the node can no longer be heard, so it leaves."""
        assert self.bus is not None
        await self.bus.closed.wait()
        if self.bus.closing:
            return
        log.error("nats closed this node's connection: its credential was revoked or expired")
        self.exit_code = EXIT_REFUSED
        self.request_drain("NATS credential revoked or expired",
                           timeout=self.settings.sigterm_drain_timeout)

    # ------------------------------------------------------------------ registration

    async def _register(self) -> None:
        assert self.bus is not None
        event = self._registration
        acks = await self.bus.nc.subscribe(node_ack_subject(self.node_id))
        backoff = Backoff(initial=0.5, maximum=30.0)
        attempt = 0
        try:
            while True:
                if self.draining:  # leaving anyway: asking to be served makes no sense now
                    log.info("draining before the registration was acknowledged")
                    return
                attempt += 1
                try:
                    await ask_to_record(self.bus, event, attempt)
                    ack = await wait_for_ack(acks, event, self.settings.registration_timeout)
                except (nats.errors.Error, TimeoutError, OSError) as exc:
                    delay = backoff.next()
                    log.warning("registration not acknowledged; retrying", attempt=attempt,
                                error=str(exc) or type(exc).__name__, retry_in=round(delay, 2))
                    await asyncio.sleep(delay)
                    continue
                if not ack.accepted:
                    log.error("registration rejected by the control plane", reason=ack.reason)
                    self.exit_code = EXIT_REJECTED
                    self.request_drain(f"registration rejected: {ack.reason}")
                    return
                self.registered.set()
                log.info("registered", attempts=attempt, event_id=str(event.id))
                return
        finally:
            with contextlib.suppress(Exception):
                await acks.unsubscribe()

    # ------------------------------------------------------------------ heartbeats

    async def observe(self) -> Observation:
        """Look at vLLM and the GPU. Never raises: what cannot be seen lowers the score."""
        assert self._observer is not None
        return await self._observer.observe()

    def heartbeat_event(self, o: Observation) -> NodeHeartbeat:
        self.sequence += 1
        return heartbeat_event(self.settings, self.sequence, o, draining=self.draining)

    async def send_heartbeat(self) -> None:
        assert self.bus is not None
        event = self.heartbeat_event(await self.observe())
        if not self.bus.connected:
            # Not buffered: a heartbeat is only worth its freshness.
            log.warning("nats down; heartbeat skipped", sequence=event.sequence)
            return
        try:
            await self.bus.publish_observation(event)
        except (nats.errors.Error, OSError) as exc:
            log.warning("heartbeat not sent", error=str(exc) or type(exc).__name__)

    async def _heartbeats(self) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            started = time.monotonic()
            try:
                await self.send_heartbeat()
            except Exception:  # one lost beat; the next interval tries again
                log.exception("heartbeat failed", sequence=self.sequence)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    # ------------------------------------------------------------------ spot and commands

    async def _watch_spot(self) -> None:
        assert self._session is not None
        await watch_spot(self.settings, self._session, self._on_spot_notice)

    async def _on_spot_notice(self, notice: SpotNotice) -> None:
        log.warning("spot termination notice", provider=notice.provider, action=notice.action,
                    deadline=notice.deadline.isoformat() if notice.deadline else None)
        # Queued, not awaited: with NATS down the drain must still start now. The announcer
        # publishes it before the NodeDraining the drain queues next.
        self._announcer.announce(NodeSpotWarning(
            node_id=self.node_id, provider=notice.provider, action=notice.action,
            deadline=notice.deadline))
        self.request_drain(f"spot {notice.action}", notice.deadline)

    async def _on_command(self, msg: Msg) -> None:
        await answer_command(msg, self.request_drain)

    # ------------------------------------------------------------------ drain

    async def _announce(self) -> None:
        assert self.bus is not None
        await self._announcer.run(self.bus)

    def _drain_time_left(self) -> float:
        assert self.drain_deadline is not None
        return (self.drain_deadline - datetime.now(UTC)).total_seconds()

    async def _drain_and_leave(self, request: DrainRequest) -> None:
        s = self.settings
        assert self.drain_deadline is not None
        assert self._observer is not None
        self.draining = True
        log.info("draining", reason=request.reason, deadline=self.drain_deadline.isoformat())
        self._announcer.announce(NodeDraining(
            node_id=self.node_id, reason=request.reason, deadline=self.drain_deadline))
        await self.send_heartbeat()  # the load balancers see draining=True at once
        await asyncio.sleep(min(s.drain_grace, max(0.0, self._drain_time_left())))
        # The deadline is read afresh each round: a spot notice may have brought it earlier.
        while (left := self._drain_time_left()) > 0:
            load = await self._observer.vllm_load()
            if load is None or load.running + load.waiting == 0:
                break
            log.info("waiting for in-flight requests", running=load.running,
                     waiting=load.waiting)
            await asyncio.sleep(min(s.drain_poll_interval, left))
        else:
            log.warning("drain deadline passed with requests in flight")
        # What is still queued (NATS down) gets a last few seconds, in order, then we go.
        self._announcer.leave_by = datetime.now(UTC) + timedelta(seconds=self.leave_grace)
        self._announcer.announce(NodeDeregistered(node_id=self.node_id, reason=request.reason))
        with contextlib.suppress(TimeoutError):
            await within(self._announcer.join(), self.leave_grace + 2.5)
        if self._announcer.pending() == 0 and not self.unannounced:
            log.info("deregistered")
        else:
            log.error("leaving without telling the control plane all of it: nats unreachable",
                      given_up=self.unannounced,
                      still_queued=self._announcer.pending())
