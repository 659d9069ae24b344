"""Slices of the request and token counters of keys, environments and tenants, and of keys'
concurrency limits (RATELIMIT_SLICES): a request spends from what this gateway borrowed ahead
and most requests make no Redis call at all (the decisions are share.py's and
slot_share.py's).

A request's counters are all its tenant's (one hash tag), so whatever it lacks is borrowed in
one BORROW_MANY, all or nothing: a counter with less left than the request needs grants
nothing anywhere and refuses the request, as ACQUIRE would. Tokens are reserved from the
share and settled back into it; a concurrency slot is held while the request runs. What
idles is handed back (GIVE_BACK_MANY, one run per tenant; GIVE_BACK_SLOTS), debts included;
a share lapses with its window, slots with the lease TTL unless renewed (RENEW_SLOTS).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
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
    Reservation,
    SlicedTokens,
    TokenWindow,
)
from services.gateway.ratelimit.share import IDLE_SECONDS, Share
from services.gateway.ratelimit.slot_share import SlotShare

_TRIES = 8
"""Borrows a request makes before it is refused: other requests here may spend what one
brought before this one takes it."""


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
    def __init__(self, run: Run, registry: CollectorRegistry, *, lease_ttl_ms: int = 120_000,
                 slot: Callable[[str], int] = lambda key: 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._run = run
        self._slot = slot
        self._clock = clock
        self._lease_ttl_ms = lease_ttl_ms
        self.shares: dict[str, Share] = {}
        self.slots: dict[str, SlotShare] = {}
        self.metrics = CounterLeaseMetrics(registry)
        # Slot members only need to be unique across gateways, not secret.
        self._me = f"{random.getrandbits(64):016x}"
        self._borrowed = 0

    async def take(self, checks: Sequence[Check]) -> Taken | None:
        """Every check's amount from this gateway's shares, borrowing what is missing; None
        when Redis did not answer a borrow."""
        short: list[int] = []
        for _ in range(_TRIES):
            now = self._clock()
            short = self._take_all(checks, now)
            if not short:
                return Taken(True, self._used(checks), self._windows(checks))
            # The others running low come along: one borrow tops up all of them.
            lacking = {checks[i].key for i in short}
            wanted = [c for c in checks if c.key in lacking or self._low(c)]
            borrowed = await self._borrow(wanted, lacking)
            if borrowed is None:
                return None
            ok, before, spent = borrowed
            if not ok:
                # Some counter has too little left to grant; but borrows of other requests
                # here may have brought what this one lacks meanwhile: those come first.
                short = self._take_all(checks, self._clock())
                if not short:
                    return Taken(True, self._used(checks), self._windows(checks))
                if any(checks[i].key in spent for i in short):
                    # Refused by a counter spent in Redis: as used as Redis says it is.
                    known = {c.key: used for c, used in zip(wanted, before, strict=True)
                             if c.key in spent}
                    return Taken(False, self._used(checks, known))
                # Short only where Redis has room (the spent counter is held here): again.
        # Others spent each slice borrowed for this one before it could: as good as spent.
        return Taken(False, self._used(checks, {checks[i].key: checks[i].limit or 0
                                                for i in short}))

    def _windows(self, checks: Sequence[Check]) -> tuple[int, ...]:
        return tuple(0 if c.kind is Kind.CONCURRENCY else self.shares[c.key].window
                     for c in checks)

    def put_back(self, checks: Sequence[Check]) -> None:
        """A request that took its amounts was refused at another layer."""
        now = self._clock()
        for c in checks:
            if c.kind is Kind.CONCURRENCY:
                slots = self.slots.get(c.key)
                if slots is not None:
                    slots.release()
                continue
            share = self.shares.get(c.key)
            if share is not None:
                share.put_back(now, c.amount)

    def settle(self, hold: SlicedTokens, actual: int) -> None:
        """The tokens a request used, in place of what it reserved, and its slot free
        (once)."""
        if hold.settled:
            return
        hold.settled = True
        now = self._clock()
        for w in hold.windows:
            share = self.shares.get(w.key)
            if share is not None:
                share.settle(now, w.start_ms, max(0, actual) - hold.reserved)
        if hold.slot is not None and (slots := self.slots.get(hold.slot)) is not None:
            slots.release()

    def _take_all(self, checks: Sequence[Check], now: float) -> list[int]:
        """Take every amount, or none: the indices of the checks whose share is short."""
        short = []
        for i, c in enumerate(checks):
            if c.kind is Kind.CONCURRENCY:
                slots = self.slots.get(c.key)
                if slots is None:
                    slots = self.slots[c.key] = SlotShare()
                taken = slots.take(now)
            else:
                share = self.shares.get(c.key)
                if share is None:
                    share = self.shares[c.key] = Share()
                taken = share.take(now, c.amount)
            if not taken:
                short.append(i)
        if short:
            self.put_back([c for i, c in enumerate(checks) if i not in short])
        return short

    def _used(self, checks: Sequence[Check], known: dict[str, int] | None = None
              ) -> tuple[int, ...]:
        known = known or {}
        out = []
        for c in checks:
            limit = c.limit or 0
            if c.key in known:
                out.append(known[c.key])
            elif c.kind is Kind.CONCURRENCY:
                slots = self.slots[c.key]
                free = (slots.ungranted or 0) + len(slots.held) - slots.in_use
                out.append(max(0, limit - free - 1))
            else:
                out.append(max(0, limit - self.shares[c.key].remaining() - c.amount))
        return tuple(out)

    def _low(self, check: Check) -> bool:
        """Whether a share has less than a slice left: it comes along when another counter of
        the request is borrowed for (one script run instead of two later)."""
        if check.kind is Kind.CONCURRENCY:
            return False  # borrowed when none is free: a held slot is a request's promise
        share = self.shares[check.key]
        need = max(check.amount, 1)
        return check.limit is not None and share.left < share.want(check.limit, need, need)

    async def _borrow(self, checks: Sequence[Check], short: set[str]
                      ) -> tuple[bool, list[int], set[str]] | None:
        """Slices of `checks`' counters; those in `short` must cover the request waiting.
        (granted, what each had granted before, the counters too spent to cover it)."""
        sent = self._clock()
        args: list[str | int] = [WINDOW_GRACE_MS]
        prefixes: list[str] = []
        needs: list[int] = []
        for c in checks:
            assert c.limit is not None
            if c.kind is Kind.CONCURRENCY:
                self._borrowed += 1
                prefixes.append(f"{self._me}:{self._borrowed}:")
                needs.append(1)
                args += ["s", c.limit, self._lease_ttl_ms,
                         self.slots[c.key].want(c.limit), 1, prefixes[-1]]
                continue
            prefixes.append("")
            share = self.shares[c.key]
            need = max(c.amount, 1)
            needs.append(max(1, need - share.left) if c.key in short else 0)
            args += ["w", c.limit, c.window_ms, share.want(c.limit, need, need), needs[-1], ""]
        done, reply = await self._run(lua_slices.BORROW_MANY, [c.key for c in checks], args)
        if not done:
            return None
        ok, now_ms, *rest = (int(x) for x in reply)
        self.metrics.borrows.inc()
        before = []
        spent = set()
        for i, c in enumerate(checks):
            window, grant, ungranted, used = rest[4 * i:4 * i + 4]
            before.append(used)
            if (c.limit or 0) - used < needs[i]:
                spent.add(c.key)
            if not ok:
                continue
            if c.kind is Kind.CONCURRENCY:
                # Timed from before the call: the slots lapse no later than in Redis.
                self.slots[c.key].granted(
                    [f"{prefixes[i]}{j}" for j in range(1, grant + 1)],
                    sent + self._lease_ttl_ms / 1000, ungranted)
            else:
                ends = sent + (window + c.window_ms - now_ms) / 1000
                self.shares[c.key].granted(grant, window, ends, ungranted)
        return bool(ok), before, spent

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
        for key, slots in list(self.slots.items()):
            members = slots.surplus(now, everything)
            if members:
                done, reply = await self._run(lua_slices.GIVE_BACK_SLOTS, [key], members)
                if done:
                    self.metrics.returns.inc()
                    back += int(reply)
            if not slots.held and not slots.in_use and now - slots.last_take >= IDLE_SECONDS:
                del self.slots[key]
        return back

    async def renew(self) -> None:
        """Renew the slots held, a third of the lease TTL before they would lapse; slots
        Redis no longer had (renewed too late) are given up."""
        ttl = self._lease_ttl_ms / 1000
        for key, slots in list(self.slots.items()):
            now = self._clock()
            if not slots.held or slots.valid_until - now > ttl * 2 / 3:
                continue
            held = list(slots.held)
            done, renewed = await self._run(lua_slices.RENEW_SLOTS, [key],
                                            [self._lease_ttl_ms, *held])
            if not done:
                continue  # they lapse, and requests borrow again: tighter, never looser
            if int(renewed) == len(held):
                slots.renewed(now + ttl)
            else:
                slots.held = [m for m in slots.held if m not in held]
                await self._run(lua_slices.GIVE_BACK_SLOTS, [key], held)

    async def keep(self) -> None:
        """Hand back idle holdings and renew held slots, until cancelled (then hand back
        everything)."""
        try:
            while True:
                await asyncio.sleep(IDLE_SECONDS / 2)
                await self.give_back()
                await self.renew()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.give_back(everything=True))




def sliced_reservation(reservation: Reservation, checks: Sequence[Check],
                       taken: Taken) -> Reservation:
    """`reservation` (its lease and budgets, in Redis) with the tokens the request took from
    its slices (`checks`, `taken`), to settle into them."""
    windows = tuple(TokenWindow(c.key, window) for c, window in
                    zip(checks, taken.windows, strict=True) if c.kind is Kind.TOKENS)
    slot = next((c.key for c in checks if c.kind is Kind.CONCURRENCY), None)
    if not windows and slot is None:
        return reservation
    reserved = next((c.amount for c in checks if c.kind is Kind.TOKENS), 0)
    return replace(reservation, tokens=reserved,
                   sliced=SlicedTokens(windows, reserved, slot=slot))
