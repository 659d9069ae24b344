"""Feeding the node table from NATS: every node lifecycle event (replayed from the NODES
stream at start, then live) and every heartbeat (core NATS; each gateway needs all of them,
so no queue group).

`start` returns once the table holds what NATS knew when it was called: the lifecycle
replayed and the latest stored heartbeat of each node. A worker that listened before that
would answer 503 for a whole heartbeat interval after a restart or a scale-out.

What is not an event, or not the event its subject names (a ``node.heartbeat.A`` carrying node
B), is dropped and counted in ``nats_messages_refused_total{consumer="gateway-nodes"}``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

from schemas.arrival import mismatch
from schemas.events import EventDecodeError, decode_event
from schemas.subjects import HEARTBEATS, NODES_VIEW, StreamSpec
from services.gateway.nodes import NodeTable
from services.infra.bus import Bus
from services.infra.bus_metrics import SUBJECT_MISMATCH, UNDECODABLE

log = structlog.get_logger("node_feed")

CONSUMER = "gateway-nodes"
"""The feed's name in `nats_messages_refused_total`."""


class NodeFeed:
    def __init__(self, bus: Bus, table: NodeTable,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.bus = bus
        self.table = table
        self.clock = clock
        self.wall_clock = wall_clock
        self._subs: list[Subscription] = []
        self.received = 0
        self._refused = bus.metrics.refused
        for reason in (UNDECODABLE, SUBJECT_MISMATCH):
            self._refused.labels(CONSUMER, reason)

    async def start(self, warm_timeout: float = 5.0) -> None:
        """Follow the fleet; wait (up to `warm_timeout`) until what is stored has been read."""
        self._subs.append(await self.bus.nc.subscribe(HEARTBEATS.subjects[0], cb=self._on_msg))
        # An ordered consumer replays the stream from the start, then follows it; the client
        # recreates it by itself after a NATS restart.
        lifecycle = asyncio.Event()
        began = time.monotonic()
        await self._mirror_caught_up(NODES_VIEW, warm_timeout)
        warm_timeout = max(0.0, warm_timeout - (time.monotonic() - began))
        self._subs.append(await self._replay(NODES_VIEW.name, "node.>", DeliverPolicy.ALL,
                                             lifecycle, self._on_msg))
        beats = asyncio.Event()
        # Only the latest heartbeat per node, once: the live subscription above does the rest.
        replay = await self._replay(HEARTBEATS.name, HEARTBEATS.subjects[0],
                                    DeliverPolicy.LAST_PER_SUBJECT, beats,
                                    self._on_stored_heartbeat)
        try:
            async with asyncio.timeout(warm_timeout):
                await asyncio.gather(lifecycle.wait(), beats.wait())
        except TimeoutError:
            log.warning("node table not caught up with NATS in time; serving anyway",
                        lifecycle=lifecycle.is_set(), heartbeats=beats.is_set(),
                        timeout=warm_timeout)
        finally:
            await _unsubscribe(replay)
        log.info("node table warm", nodes=len(self.table.nodes))

    async def _mirror_caught_up(self, view: StreamSpec, timeout: float) -> None:
        """Wait (up to `timeout`) until the mirror holds what its stream held when asked: a
        mirror follows its stream a moment behind, and "warm" means what NATS knew now."""
        target = (await self.bus.js.stream_info(view.mirror)).state.last_seq
        try:
            async with asyncio.timeout(timeout):
                while True:  # a stream offers nothing to wait on but its info
                    if (await self.bus.js.stream_info(view.name)).state.last_seq >= target:
                        return
                    await asyncio.sleep(0.02)
        except TimeoutError:
            log.warning("the mirror is behind its stream; replaying what it has",
                        stream=view.name, waited=timeout)

    async def _replay(self, stream: str, subject: str, policy: DeliverPolicy,
                      caught_up: asyncio.Event,
                      handler: Callable[[Msg], Awaitable[None]]) -> Subscription:
        async def on_msg(msg: Msg) -> None:
            await handler(msg)
            if msg.metadata.num_pending == 0:
                caught_up.set()

        info = await self.bus.js.stream_info(stream)
        if not info.state.messages:
            caught_up.set()
        return await self.bus.js.subscribe(subject, stream=stream, ordered_consumer=True,
                                           cb=on_msg, deliver_policy=policy)

    async def _on_msg(self, msg: Msg, *, age: float = 0.0) -> None:
        try:
            event = decode_event(msg.data)
        except EventDecodeError as exc:
            log.warning("ignoring undecodable node message", subject=msg.subject,
                        error=str(exc))
            self._refused.labels(CONSUMER, UNDECODABLE).inc()
            return
        wrong = mismatch(event, msg.subject)
        if wrong is not None:
            log.warning("ignoring a node message its subject does not name",
                        subject=msg.subject, error=wrong)
            self._refused.labels(CONSUMER, SUBJECT_MISMATCH).inc()
            return
        self.received += 1
        self.table.apply(event, self.clock() - age)

    async def _on_stored_heartbeat(self, msg: Msg) -> None:
        # Dated by when NATS stored it, so an old beat does not make a dead node look alive.
        stored = msg.metadata.timestamp.timestamp()
        await self._on_msg(msg, age=max(0.0, self.wall_clock() - stored))

    async def stop(self) -> None:
        for sub in self._subs:
            await _unsubscribe(sub)
        self._subs.clear()


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as exc:  # closing connection: nothing left to unsubscribe from
        log.debug("unsubscribe failed", error=str(exc))
