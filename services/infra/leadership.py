"""One active worker across replicas: a PostgreSQL session advisory lock, held on the worker's
own connection. The lock dies with the connection (crash, network cut), and a standby, trying
every `retry` seconds, takes over."""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Awaitable, Callable

import asyncpg
import structlog

from services.infra.aio import stop_task
from services.infra.db import connect

log = structlog.get_logger("leadership")


def lock_key(name: str) -> int:
    """A stable 63-bit advisory-lock key for a role name."""
    return zlib.crc32(name.encode()) | (0x4C45_4144 << 32)  # "LEAD" in the high bits


class Leadership:
    def __init__(self, dsn: str, role: str, *, retry: float = 2.0,
                 check_every: float = 2.0) -> None:
        self.dsn = dsn
        self.role = role
        self.key = lock_key(role)
        self.retry = retry
        self.check_every = check_every
        self.is_leader = False

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work` while leader; on losing the connection stop it and compete again.
        Until cancelled."""
        while True:
            conn: asyncpg.Connection[asyncpg.Record] | None = None
            task: asyncio.Task[None] | None = None
            try:
                conn = await connect(self.dsn)
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key):
                    self.is_leader = True
                    log.info("became leader", role=self.role)
                    task = asyncio.ensure_future(work())
                    # The lock lives as long as this connection: watch it while working.
                    while not task.done():
                        await asyncio.wait({task}, timeout=self.check_every)
                        if not task.done():
                            # Bounded: on a half-open connection an unbounded check would
                            # hang while the work went on, and the lock may be gone.
                            await conn.fetchval("SELECT 1", timeout=self.check_every)
                    task.result()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("leadership lost or not reachable", role=self.role, error=str(exc))
            except Exception:
                # A bug in the work: say so, step down, and let a fresh attempt try again.
                log.exception("leader's work failed", role=self.role)
            finally:
                if task is not None and not task.done():
                    await stop_task(task)  # a leader that cannot step down must not go on
                if self.is_leader:
                    log.info("stepped down", role=self.role)
                self.is_leader = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close())
            await asyncio.sleep(self.retry)
