"""A gateway's slots of a key's concurrency limit under RATELIMIT_SLICES. Pure: times come in
as arguments (monotonic seconds).

The key's lease set holds one member per slot taken, whoever took it: a request's lease (no
slices, or a budget to hold) or a slot a gateway borrowed (counter_leases.py). The gateway
admits a request while it holds a free slot, and borrows more when it has none; a slot lapses
in Redis `lease_ttl` after it was taken or renewed, so the gateway renews what it holds, and a
gateway that dies frees its slots within the TTL, as its requests' leases would. What idles
goes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.gateway.ratelimit.share import FAIR_DIVISOR, IDLE_SECONDS

HEADROOM = 4
"""Slots borrowed beyond the requests in flight and waiting, at most: a burst does not borrow
one slot at a time."""


@dataclass
class SlotShare:
    held: list[str] = field(default_factory=list)
    """The members this gateway holds in the key's lease set."""
    in_use: int = 0
    """Requests in flight on them."""
    valid_until: float = 0.0
    """When the held slots lapse in Redis unless renewed (conservatively early)."""
    ungranted: int | None = None
    """Slots nobody held at the last borrow (None: not borrowed yet)."""
    last_take: float = 0.0

    def take(self, now: float) -> bool:
        """A slot for one more request, if a held one is free; False: borrow first."""
        self.last_take = now
        if now >= self.valid_until:
            self.held.clear()  # lapsed in Redis: maybe someone else's by now
        if self.in_use < len(self.held):
            self.in_use += 1
            return True
        return False

    def release(self) -> None:
        """A request that held a slot ended (or was refused at another layer)."""
        self.in_use = max(0, self.in_use - 1)

    def want(self, limit: int) -> int:
        """Slots to borrow for a request that found none free: one, and some headroom for the
        ones in flight, no more than a fair part of what nobody holds."""
        fair = (limit if self.ungranted is None else self.ungranted) // FAIR_DIVISOR
        return max(1, min(1 + min(HEADROOM, self.in_use // 4 + 1), fair))

    def granted(self, members: list[str], valid_until: float, ungranted: int) -> None:
        if members:
            # Slots held already lapse at their own time (renewed together from now on).
            self.valid_until = (min(self.valid_until, valid_until) if self.held
                                else valid_until)
            self.held.extend(members)
        self.ungranted = ungranted

    def renewed(self, valid_until: float) -> None:
        self.valid_until = valid_until

    def surplus(self, now: float, everything: bool = False) -> list[str]:
        """Free slots to hand back: all of them once nothing was asked for IDLE_SECONDS (or
        `everything`, shutdown: every slot, in use or not)."""
        if not everything and (now - self.last_take < IDLE_SECONDS or now >= self.valid_until):
            return []
        keep = 0 if everything else self.in_use
        back, self.held = self.held[keep:], self.held[:keep]
        return back
