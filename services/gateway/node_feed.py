"""Feeding the node table from NATS: every node lifecycle event (replayed from the NODES
stream at start, then live) and every heartbeat (core NATS; each gateway needs all of them,
so no queue group)."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

from schemas.events import EventDecodeError, decode_event
from schemas.subjects import HEARTBEATS, NODES
from services.core.bus import Bus
from services.gateway.nodes import NodeTable

log = structlog.get_logger("node_feed")


class NodeFeed:
    def __init__(self, bus: Bus, table: NodeTable,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.table = table
        self.clock = clock
        self._subs: list[Subscription] = []
        self.received = 0

    async def start(self) -> None:
        # An ordered consumer replays the stream from the start, then follows it; the client
        # recreates it by itself after a NATS restart.
        self._subs.append(await self.bus.js.subscribe(
            "node.>", stream=NODES.name, ordered_consumer=True, cb=self._on_msg,
            deliver_policy=DeliverPolicy.ALL))
        self._subs.append(await self.bus.nc.subscribe(HEARTBEATS.subjects[0], cb=self._on_msg))

    async def _on_msg(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except EventDecodeError as exc:
            log.warning("ignoring undecodable node message", subject=msg.subject,
                        error=str(exc))
            return
        self.received += 1
        self.table.apply(event, self.clock())

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # closing connection: nothing left to unsubscribe from
                log.debug("unsubscribe failed", error=str(exc))
        self._subs.clear()
