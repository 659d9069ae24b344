"""Waking event-log readers when the log grows: LISTEN/NOTIFY, with polling as the fallback."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import asyncpg
import structlog

from services.infra.aio import wait_event
from services.infra.db import Connection, connect

log = structlog.get_logger("eventlog")

NOTIFY_CHANNEL: Final = "crosslogic_events"


# Connecting and LISTENing can fail these ways (InterfaceError: the connection closed under
# the listener, e.g. PostgreSQL restarting); the loop must outlive them all.
_LISTEN_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError,
                                                   asyncpg.PostgresError, asyncpg.InterfaceError)


class LogWaker:
    """Wakes readers when the log grows: LISTEN on a dedicated connection, with polling as the
    fallback (a missed or late notification, or the listener connection being down, costs at
    most `poll_interval`)."""

    def __init__(self, dsn: str, *, poll_interval: float = 1.0) -> None:
        self.dsn = dsn
        self.poll_interval = poll_interval
        self.generation = 0
        self._changed = asyncio.Event()
        self._conn: Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def listening(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        with contextlib.suppress(*_LISTEN_ERRORS):
            await self._listen()
        self._task = asyncio.create_task(self._keep_listening(), name="log-waker")

    async def _listen(self) -> None:
        conn = await connect(self.dsn)
        try:
            await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        self._conn = conn
        self._wake()  # events may have landed while we were not listening

    async def _keep_listening(self) -> None:
        delay = 0.2
        while not self._closed:
            await asyncio.sleep(delay)
            if self.listening:
                delay = 1.0
                continue
            try:
                await self._listen()
                log.info("listening for log notifications again")
                delay = 1.0
            except _LISTEN_ERRORS as exc:
                log.warning("log listener down; polling", error=str(exc) or type(exc).__name__)
                delay = min(delay * 2, 5.0)

    def _on_notify(self, *_: object) -> None:
        self._wake()

    def _wake(self) -> None:
        self.generation += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, seen_generation: int, timeout: float | None = None) -> None:
        """Return when the log may have grown since `seen_generation` was read, or after the
        poll interval (or `timeout`), whichever is first."""
        if self.generation != seen_generation:
            return
        changed = self._changed
        await wait_event(changed, timeout or self.poll_interval)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
