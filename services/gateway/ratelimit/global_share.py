"""This gateway's share of the platform-wide request limit (`global_requests`). Pure: times
come in as arguments (monotonic seconds).

Every request of the platform counts against one limit, so counting each at one Redis key
makes that key every gateway's hot spot, and under Redis Cluster it cannot share a slot with
the request's other keys. Instead each gateway borrows a slice of the window's budget from
that key (global_lease.py), spends it locally, and hands back what it did not use:

- The key counts what was *granted*, never more than the limit: the gateways together admit
  at most the limit in a window, exactly as a per-request counter would.
- A slice lasts about `HORIZON_SECONDS` at this gateway's observed rate (an exponentially
  decayed count), so a busy gateway touches the key a few times a second and a quiet one
  borrows `MIN_SLICE` requests at a time (held a second at most: see below).
- A slice is at most `1 / FAIR_DIVISOR` of what is still ungranted, so near the limit slices
  shrink to one request and what gateways hold unused stays small: a request elsewhere is
  refused while slack sits here only in the last sliver of a window.
- Unused holdings go back after `IDLE_SECONDS` without a request, and at shutdown; a slice
  lapses with its window (the counter of the next window starts from nothing anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HORIZON_SECONDS = 0.1
MIN_SLICE = 4
"""A quiet gateway's slice: a few requests, so that a trickle does not cost two round trips
each (the borrow and the request's own script)."""
FAIR_DIVISOR = 8
IDLE_SECONDS = 1.0
RATE_TIME_CONSTANT = 1.0
"""Seconds over which the observed rate forgets (the decay's time constant)."""


@dataclass
class GlobalShare:
    left: int = 0
    """Requests this gateway may still admit from what it borrowed."""
    window: int = -1
    """The window (its start, Redis's Unix ms) the slice was granted in."""
    valid_until: float = 0.0
    """When that window ends, on this process's monotonic clock (conservatively early)."""
    ungranted: int | None = None
    """Platform-wide, what was left to grant after the last borrow (None: not borrowed yet)."""
    last_take: float = 0.0
    _recent: float = 0.0
    """Requests seen, decayed with RATE_TIME_CONSTANT."""
    _recent_at: float = 0.0

    @property
    def rate(self) -> float:
        """Requests per second through this gateway, lately."""
        return self._recent / RATE_TIME_CONSTANT

    def take(self, now: float) -> bool:
        """One request's share, if this gateway holds any; False: borrow first."""
        self._recent = self._recent * math.exp((self._recent_at - now) / RATE_TIME_CONSTANT) + 1
        self._recent_at = self.last_take = now
        if now >= self.valid_until:
            self.left = 0  # its window ended: the slice lapsed with it
        if self.left > 0:
            self.left -= 1
            return True
        return False

    def put_back(self, now: float) -> None:
        """A request that took its share was refused at another layer: it did not use it."""
        if now < self.valid_until:
            self.left += 1

    def want(self, limit: int, waiting: int) -> int:
        """How many requests to borrow: what the observed rate spends in HORIZON_SECONDS (at
        least what is waiting now), no more than a fair part of what is still ungranted."""
        by_rate = max(MIN_SLICE, math.ceil(self.rate * HORIZON_SECONDS))
        fair = (limit if self.ungranted is None else self.ungranted) // FAIR_DIVISOR
        return max(1, waiting, min(by_rate, fair))

    def granted(self, grant: int, window: int, valid_until: float, ungranted: int) -> None:
        if window != self.window:
            self.left = 0  # what was left of an earlier window lapsed with it
            self.window = window
        self.left += grant
        self.valid_until = valid_until
        self.ungranted = ungranted

    def remaining(self) -> int:
        """Platform-wide requests still admissible in this window, as far as this gateway
        knows: its own holdings and what was ungranted at its last borrow."""
        return self.left + (self.ungranted or 0)

    def idle_leftover(self, now: float) -> int:
        """What to hand back: everything held, once nothing was asked for IDLE_SECONDS (and
        the window is still on: a lapsed slice is nobody's)."""
        if now - self.last_take < IDLE_SECONDS:
            return 0
        return self.release(now)

    def release(self, now: float) -> int:
        """Everything held (shutdown), to hand back; 0 once its window ended."""
        held, self.left = self.left, 0
        return held if now < self.valid_until else 0
