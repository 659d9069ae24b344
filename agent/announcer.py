"""Announcing the node's lifecycle events (spot warning, draining, deregistered) in order,
each retried through a NATS outage until a deadline: the drain itself never waits on NATS."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import nats.errors
import structlog

from schemas.events import Event
from services.infra.backoff import Backoff
from services.infra.bus import Bus

log = structlog.get_logger("agent")


class Announcer:
    def __init__(self, drain_deadline: Callable[[], datetime | None]) -> None:
        self._drain_deadline = drain_deadline
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        """Lifecycle events for `run` to publish in order."""
        self.leave_by: datetime | None = None
        """Set once the drain is over: the last moment to publish what is still queued."""
        self.unannounced: list[str] = []
        """Types of the lifecycle events given up on (NATS unreachable until too late)."""

    def announce(self, event: Event) -> None:
        """Queue `event`; never waits (with NATS down the drain must still go on)."""
        self._queue.put_nowait(event)

    async def join(self) -> None:
        """Until every queued event has been published or given up."""
        await self._queue.join()

    def pending(self) -> int:
        return self._queue.qsize()

    async def run(self, bus: Bus) -> None:
        """Publish queued lifecycle events in order, each retried through a NATS outage until
        the drain deadline (or, once drained, `leave_by`); one that cannot make it is given
        up, and the next is tried."""
        while True:
            event = await self._queue.get()
            try:
                if not await self._publish_until(bus, event):
                    self.unannounced.append(event.type)
            finally:
                self._queue.task_done()

    async def _publish_until(self, bus: Bus, event: Event) -> bool:
        """Publish to JetStream, retrying through a NATS outage until the announcer's bound."""
        backoff = Backoff(initial=0.1, maximum=2.0)
        while True:
            try:
                await bus.publish(event, timeout=2.0)
                return True
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                by = self.leave_by or self._drain_deadline()
                if by is not None and datetime.now(UTC) >= by:
                    log.error("could not publish before the deadline", type=event.type,
                              error=str(exc) or type(exc).__name__)
                    return False
                await asyncio.sleep(backoff.next())
