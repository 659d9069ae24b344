"""How many of one kind of work a process runs at once, capped. Pure: no I/O, no clock.

Used for GET /v1/usage: its per-key budget (`usage_plan`) bounds how often each key asks, not
how many reports run together, and each report holds a connection of the small PostgreSQL pool
that key lookups need for as long as its aggregate runs. A few at a time per process keep the
rest of the pool for authentication.
"""

from __future__ import annotations

from services.gateway.ratelimit.limits import Decision, Layer
from services.gateway.ratelimit.verdicts import retry_after_header

__all__ = ["InFlight"]


class InFlight:
    """At most `limit` at once (0: no cap). `enter()` says whether one more may start; each
    `enter()` that returned True is matched by one `leave()`."""

    def __init__(self, limit: int, layer: Layer, retry_after: float = 1.0) -> None:
        if limit < 0 or retry_after <= 0:
            raise ValueError("limit must be >= 0 and retry_after > 0")
        self.limit = limit
        self.layer = layer
        self.retry_after = retry_after
        """What a refused caller is told to wait: the work is short (seconds at most, under
        its statement timeout), so soon is right; a precise time is not knowable."""
        self.running = 0

    def enter(self) -> bool:
        if self.limit and self.running >= self.limit:
            return False
        self.running += 1
        return True

    def leave(self) -> None:
        if self.running <= 0:
            raise RuntimeError("leave() without a matching enter()")
        self.running -= 1

    def refusal(self) -> Decision:
        """The 429 of a caller `enter()` turned away, in the rate limiter's terms."""
        return Decision(allowed=False, layer=self.layer, retry_after=self.retry_after,
                        headers={"Retry-After": retry_after_header(self.retry_after),
                                 "x-ratelimit-scope": str(self.layer)},
                        reservation=None, degraded=False)
