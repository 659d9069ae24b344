"""Borrowing and handing back this gateway's slices of the platform-wide request limit (the
decisions are share.py's): one BORROW_MANY script run per slice, not a write to the global
key per request.

Concurrent requests that find the share empty wait on one borrow (sized for all of them); a
borrow that Redis does not answer says so (None) and the limiter falls back to its outage
policy, as for any other call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from services.gateway.ratelimit import lua, lua_slices
from services.gateway.ratelimit.limits import WINDOW_GRACE_MS, Check
from services.gateway.ratelimit.share import IDLE_SECONDS, Share

Run = Callable[[lua.Script, Sequence[str], Sequence[str | int]], Awaitable[tuple[bool, Any]]]
"""The limiter's Redis call with its outage bookkeeping: (done, reply)."""

_TRIES = 4
"""Borrows one request waits through before it is refused: each is sized for every request
waiting, so a second is needed only when more arrived meanwhile."""


class GlobalLeaseMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.borrows = Counter("rate_limit_global_borrows_total",
                               "Slices of the platform-wide request limit borrowed from Redis",
                               registry=registry)
        self.borrowed = Counter("rate_limit_global_borrowed_requests_total",
                                "Requests of the platform-wide limit granted to this gateway",
                                registry=registry)
        self.returned = Counter("rate_limit_global_returned_requests_total",
                                "Requests of the platform-wide limit this gateway handed back "
                                "unused (idle, or shutting down)", registry=registry)


class GlobalLease:
    def __init__(self, run: Run, registry: CollectorRegistry, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._run = run
        self._clock = clock
        self.share = Share()
        self.metrics = GlobalLeaseMetrics(registry)
        self._key = ""
        self._borrowing: asyncio.Future[int | None] | None = None
        self._waiting = 0

    async def take(self, check: Check) -> bool | None:
        """True: this request has its share of the platform-wide limit; False: the limit is
        spent for this window; None: Redis did not answer the borrow."""
        assert check.limit is not None
        for _ in range(_TRIES):
            if self.share.take(self._clock()):
                return True
            grant = await self._borrow(check)
            if not grant:
                return grant if grant is None else False
        return False

    def put_back(self) -> None:
        self.share.put_back(self._clock())

    async def _borrow(self, check: Check) -> int | None:
        borrowing = self._borrowing
        if borrowing is None or borrowing.done():
            # (A done one whose callback has not run yet is spent: never waited on again.)
            borrowing = self._borrowing = asyncio.ensure_future(self._borrow_once(check))
            borrowing.add_done_callback(self._borrowed)
        self._waiting += 1
        try:
            return await asyncio.shield(borrowing)
        finally:
            self._waiting -= 1

    def _borrowed(self, done: asyncio.Future[int | None]) -> None:
        if self._borrowing is done:
            self._borrowing = None

    async def _borrow_once(self, check: Check) -> int | None:
        await asyncio.sleep(0)  # the requests arriving together wait too: one slice for all
        assert check.limit is not None
        sent = self._clock()
        want = self.share.want(check.limit, self._waiting)
        # A slice of one counter, needing nothing: whatever is left, up to `want`.
        done, reply = await self._run(lua_slices.BORROW_MANY, (check.key,), (
            WINDOW_GRACE_MS, "w", check.limit, check.window_ms, want, 0, ""))
        if not done:
            return None
        _, now_ms, window, grant, ungranted, _ = (int(x) for x in reply)
        # Timed from before the call: the slice lapses no later than its window in Redis.
        ends = sent + (window + check.window_ms - now_ms) / 1000
        self._key = check.key
        self.share.granted(grant, window, ends, ungranted)
        self.metrics.borrows.inc()
        self.metrics.borrowed.inc(grant)
        return grant

    async def give_back(self, everything: bool = False) -> int:
        """Hand back what is held: once idle for IDLE_SECONDS, or `everything` (shutdown).
        Returns the requests handed back."""
        now = self._clock()
        held = self.share.release(now) if everything else self.share.idle_leftover(now)
        if not held:
            return 0
        done, back = await self._run(lua_slices.GIVE_BACK_MANY, (self._key,),
                                     (self.share.window, held))
        if not done:
            return 0  # lost with the window at worst: limits tighter, never looser
        self.metrics.returned.inc(int(back))
        return int(back)

    async def keep(self) -> None:
        """Hand back idle holdings, until cancelled (then everything)."""
        try:
            while True:
                await asyncio.sleep(IDLE_SECONDS / 2)
                await self.give_back()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.give_back(everything=True))
