"""Slices of the request and token counters of keys, environments and tenants
(RATELIMIT_SLICES): a request spends from what this gateway borrowed ahead and most requests
make no Redis call for these layers at all (the decisions are share.py's).

A request's counters are all its tenant's (one hash tag), so whatever it lacks is borrowed in
one BORROW_MANY, all or nothing: a counter with less left than the request needs grants
nothing anywhere and refuses the request, as ACQUIRE would. Tokens are reserved from the
share and settled back into it. What idles is handed back (GIVE_BACK_MANY, one run per
tenant), debts included; a share lapses with its window.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, Counter

from services.gateway.ratelimit import lua_slices
from services.gateway.ratelimit.global_lease import Run
from services.gateway.ratelimit.limits import (
    WINDOW_GRACE_MS,
    Check,
    Kind,
    Layer,
    Reservation,
    SlicedTokens,
    TokenWindow,
)
from services.gateway.ratelimit.share import IDLE_SECONDS, Share

_TRIES = 4
"""Borrows a request makes before it is refused: another request may spend what one brought
before this one takes it."""


@dataclass(frozen=True, slots=True)
class Taken:
    """The outcome of `CounterLeases.take`."""

    allowed: bool
    used: tuple[int, ...]
    """Per check, what the gateways were granted before this request (as far as known here:
    for the headers and the verdict)."""
    windows: tuple[int, ...] = ()
    """Per check, the window (its start) the request took from."""


class CounterLeaseMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.borrows = Counter("rate_limit_slice_borrows_total",
                               "Slices of request and token counters borrowed from Redis (one "
                               "script run each, for all the counters a request lacked)",
                               registry=registry)
        self.returns = Counter("rate_limit_slice_returns_total",
                               "Hand-backs of idle slices (one script run per tenant)",
                               registry=registry)


class CounterLeases:
    def __init__(self, run: Run, registry: CollectorRegistry, *,
                 slot: Callable[[str], int] = lambda key: 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._run = run
        self._slot = slot
        self._clock = clock
        self.shares: dict[str, Share] = {}
        self.metrics = CounterLeaseMetrics(registry)

    async def take(self, checks: Sequence[Check]) -> Taken | None:
        """Every check's amount from this gateway's shares, borrowing what is missing; None
        when Redis did not answer a borrow."""
        short: list[int] = []
        for _ in range(_TRIES):
            now = self._clock()
            short = self._take_all(checks, now)
            if not short:
                return Taken(True, self._used(checks), tuple(
                    self.shares[c.key].window for c in checks))
            # The others running low come along: one borrow tops up all of them.
            lacking = {checks[i].key for i in short}
            wanted = [c for c in checks if c.key in lacking or self._low(c)]
            borrowed = await self._borrow(wanted, lacking)
            if borrowed is None:
                return None
            if not borrowed[0]:
                # Refused by a counter this request lacked: as used as Redis says it is.
                known = {c.key: before for c, before in zip(wanted, borrowed[1], strict=True)
                         if c.key in lacking}
                return Taken(False, self._used(checks, known))
        # Others spent each slice borrowed for this one before it could: as good as spent.
        return Taken(False, self._used(checks, {checks[i].key: checks[i].limit or 0
                                                for i in short}))

    def put_back(self, checks: Sequence[Check]) -> None:
        """A request that took its amounts was refused at another layer."""
        now = self._clock()
        for c in checks:
            share = self.shares.get(c.key)
            if share is not None:
                share.put_back(now, c.amount)

    def settle(self, tokens: SlicedTokens, actual: int) -> None:
        """The tokens a request used, in place of what it reserved (once)."""
        if tokens.settled:
            return
        tokens.settled = True
        now = self._clock()
        for w in tokens.windows:
            share = self.shares.get(w.key)
            if share is not None:
                share.settle(now, w.start_ms, max(0, actual) - tokens.reserved)

    def _take_all(self, checks: Sequence[Check], now: float) -> list[int]:
        """Take every amount, or none: the indices of the checks whose share is short."""
        short = []
        for i, c in enumerate(checks):
            share = self.shares.get(c.key)
            if share is None:
                share = self.shares[c.key] = Share()
            if not share.take(now, c.amount):
                short.append(i)
        if short:
            for i, c in enumerate(checks):
                if i not in short:
                    self.shares[c.key].put_back(now, c.amount)
        return short

    def _used(self, checks: Sequence[Check], known: dict[str, int] | None = None
              ) -> tuple[int, ...]:
        known = known or {}
        out = []
        for c in checks:
            if c.key in known:
                out.append(known[c.key])
            else:
                limit = c.limit or 0
                out.append(max(0, limit - self.shares[c.key].remaining() - c.amount))
        return tuple(out)

    def _low(self, check: Check) -> bool:
        """Whether a share has less than a slice left: it comes along when another counter of
        the request is borrowed for (one script run instead of two later)."""
        share = self.shares[check.key]
        need = max(check.amount, 1)
        return check.limit is not None and share.left < share.want(check.limit, need, need)

    async def _borrow(self, checks: Sequence[Check], short: set[str]
                      ) -> tuple[bool, list[int]] | None:
        """Slices of `checks`' counters; those in `short` must cover the request waiting."""
        sent = self._clock()
        args: list[str | int] = [WINDOW_GRACE_MS]
        for c in checks:
            assert c.limit is not None
            share = self.shares[c.key]
            need = max(c.amount, 1)
            args += [c.limit, c.window_ms, share.want(c.limit, need, need),
                     max(1, need - share.left) if c.key in short else 0]
        done, reply = await self._run(lua_slices.BORROW_MANY, [c.key for c in checks], args)
        if not done:
            return None
        ok, now_ms, *rest = (int(x) for x in reply)
        self.metrics.borrows.inc()
        before = []
        for i, c in enumerate(checks):
            window, grant, ungranted, used = rest[4 * i:4 * i + 4]
            before.append(used)
            if ok:
                # Timed from before the call: the slice lapses no later than its window.
                ends = sent + (window + c.window_ms - now_ms) / 1000
                self.shares[c.key].granted(grant, window, ends, ungranted)
        return bool(ok), before

    async def give_back(self, everything: bool = False) -> int:
        """Hand back what idles (IDLE_SECONDS without a request), or `everything`
        (shutdown): one script run per tenant. Shares whose window ended are forgotten."""
        now = self._clock()
        by_slot: dict[int, list[tuple[str, int, int]]] = {}
        for key, share in list(self.shares.items()):
            if now >= share.valid_until and now - share.last_take >= IDLE_SECONDS:
                del self.shares[key]
                continue
            held = share.release(now) if everything else share.idle_leftover(now)
            if held:
                by_slot.setdefault(self._slot(key), []).append((key, share.window, held))
        back = 0
        for counters in by_slot.values():
            args: list[str | int] = []
            for _, window, held in counters:
                args += [window, held]
            done, reply = await self._run(lua_slices.GIVE_BACK_MANY,
                                          [k for k, _, _ in counters], args)
            if done:
                self.metrics.returns.inc()
                back += int(reply)
        return back

    async def keep(self) -> None:
        """Hand back idle holdings, until cancelled (then everything)."""
        try:
            while True:
                await asyncio.sleep(IDLE_SECONDS / 2)
                await self.give_back()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.give_back(everything=True))


def sliceable(check: Check) -> bool:
    """Counters spent from slices under RATELIMIT_SLICES: requests and tokens, every scope but
    the platform's (always sliced, global_lease.py)."""
    return check.kind in (Kind.REQUESTS, Kind.TOKENS) and check.layer is not Layer.GLOBAL_REQUESTS


def sliced_reservation(reservation: Reservation, checks: Sequence[Check],
                       taken: Taken) -> Reservation:
    """`reservation` (its lease and budgets, in Redis) with the tokens the request took from
    its slices (`checks`, `taken`), to settle into them."""
    windows = tuple(TokenWindow(c.key, window) for c, window in
                    zip(checks, taken.windows, strict=True) if c.kind is Kind.TOKENS)
    if not windows:
        return reservation
    reserved = next(c.amount for c in checks if c.kind is Kind.TOKENS)
    return replace(reservation, tokens=reserved, sliced=SlicedTokens(windows, reserved))
