"""A gateway's share of a counter it borrows slices of: the platform-wide request limit
(`global_requests`, always), and with RATELIMIT_SLICES the request and token counters of
keys, environments and tenants. Pure: times come in as arguments (monotonic seconds), amounts
in the counter's units (requests, or tokens).

Counting every request at one Redis key makes that key a hot spot (the platform-wide one is
every gateway's, and under Redis Cluster cannot share a slot with the request's other keys),
and every counter a request's script touches costs Redis CPU. Instead a gateway borrows a
slice of the window's budget (global_lease.py, counter_leases.py), spends it locally, and
hands back what it did not use:

- The key counts what was *granted*, never more than the limit: the gateways together admit
  at most the limit in a window, exactly as a per-request counter would.
- A slice lasts about `HORIZON_SECONDS` at this gateway's observed rate (an exponentially
  decayed amount), so a busy gateway touches the key a few times a second and a quiet one
  borrows `MIN_SLICE` requests' worth at a time (held a second at most: see below).
- A slice is at most `1 / FAIR_DIVISOR` of what is still ungranted, so near the limit slices
  shrink to one request and what gateways hold unused stays small: a request elsewhere is
  refused while slack sits here only in the last sliver of a window.
- Unused holdings go back after `IDLE_SECONDS` without a request, and at shutdown; a slice
  lapses with its window (the counter of the next window starts from nothing anyway).
- Tokens are settled here: what a request used less than it reserved goes back to the share,
  what it used more is owed, and paid from the next slice or when the share is handed back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HORIZON_SECONDS = 0.1
MIN_SLICE = 8
"""A quiet gateway's slice: a few requests, so that a trickle (a key sending a few requests a
second) costs a borrow every second or so, not every other request."""
FAIR_DIVISOR = 8
IDLE_SECONDS = 1.0
RATE_TIME_CONSTANT = 1.0
"""Seconds over which the observed rate forgets (the decay's time constant)."""


@dataclass
class Share:
    left: int = 0
    """What this gateway may still spend from what it borrowed (below 0: what it owes, a
    settle having used more than was reserved)."""
    window: int = -1
    """The window (its start, Redis's Unix ms) the slice was granted in."""
    valid_until: float = 0.0
    """When that window ends, on this process's monotonic clock (conservatively early)."""
    ungranted: int | None = None
    """Across the gateways, what was left to grant after the last borrow (None: not borrowed
    yet)."""
    last_take: float = 0.0
    _recent: float = 0.0
    """The amount asked for, decayed with RATE_TIME_CONSTANT."""
    _recent_at: float = 0.0

    @property
    def rate(self) -> float:
        """The amount asked for per second through this gateway, lately."""
        return self._recent / RATE_TIME_CONSTANT

    def take(self, now: float, amount: int = 1) -> bool:
        """`amount` of the share, if this gateway holds that much (room for one at least, as
        a counter asks); False: borrow first."""
        self._recent = (self._recent * math.exp((self._recent_at - now) / RATE_TIME_CONSTANT)
                        + amount)
        self._recent_at = self.last_take = now
        if now >= self.valid_until:
            self.left = 0  # its window ended: the slice lapsed with it
        if self.left >= max(amount, 1):
            self.left -= amount
            return True
        return False

    def put_back(self, now: float, amount: int = 1) -> None:
        """A request that took its share was refused at another layer: it did not use it."""
        if now < self.valid_until:
            self.left += amount

    def settle(self, now: float, window: int, delta: int) -> None:
        """A request used `delta` more than it took (less: negative) in `window`; dropped
        once that window has ended, as a late settle in Redis is."""
        if window == self.window and now < self.valid_until:
            self.left -= delta

    def want(self, limit: int, waiting: int, need: int = 1) -> int:
        """How much to borrow: what the observed rate spends in HORIZON_SECONDS (at least
        MIN_SLICE requests of `need` each, and what is waiting now, debts included), no more
        than a fair part of what is still ungranted."""
        by_rate = max(MIN_SLICE * need, math.ceil(self.rate * HORIZON_SECONDS))
        fair = (limit if self.ungranted is None else self.ungranted) // FAIR_DIVISOR
        return max(1, waiting - min(self.left, 0), min(by_rate, fair))

    def granted(self, grant: int, window: int, valid_until: float, ungranted: int) -> None:
        if window != self.window:
            self.left = 0  # what was left of an earlier window lapsed with it
            self.window = window
        self.left += grant
        self.valid_until = valid_until
        self.ungranted = ungranted

    def remaining(self) -> int:
        """What the gateways may still spend in this window, as far as this one knows: its
        own holdings and what was ungranted at its last borrow."""
        return max(0, self.left + (self.ungranted or 0))

    def idle_leftover(self, now: float) -> int:
        """What to hand back: everything held, once nothing was asked for IDLE_SECONDS (and
        the window is still on: a lapsed slice is nobody's)."""
        if now - self.last_take < IDLE_SECONDS:
            return 0
        return self.release(now)

    def release(self, now: float) -> int:
        """Everything held (shutdown), to hand back (below 0: a debt to record); 0 once its
        window ended."""
        held, self.left = self.left, 0
        return held if now < self.valid_until else 0
