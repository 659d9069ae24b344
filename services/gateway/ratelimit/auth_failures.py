"""Failed authentications per client network, and which networks are refused for a while.

After `FailureLimit.failures` failed authentications from one client network within a window
(fixed, opened by the first failure), further requests from it are answered 429 until the
window ends without a PostgreSQL lookup: guessing keys or replaying dead ones from one place
cannot load PostgreSQL. Except for keys already known to be good: a key whose shared cache
entry (Redis `api_key:{hash}`) is a principal passes, on every gateway (`judge_lookup`), so a
tenant behind a NAT is not locked out by a bad neighbour. Which failures count is
`counts_as_failure`'s: not a request without any credential.

Every gateway process counts here, in memory, and all of them together in Redis (the
authenticator does that I/O); a network is refused when either count is over the limit, so a
Redis outage leaves each process its own limit. Pure: time comes in as seconds from any
monotonic clock.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

__all__ = ["Cached", "FailureLedger", "FailureLimit", "FailureVerdict", "LookupVerdict",
           "counts_as_failure", "judge", "judge_lookup", "network_of", "redis_key"]

_V = TypeVar("_V")


@dataclass(frozen=True, slots=True)
class FailureLimit:
    failures: int = 20
    """Failed authentications a client network may make per window; 0 turns throttling off."""
    window: float = 60.0
    """Seconds from a network's first failure to the end of its window."""

    def __post_init__(self) -> None:
        if self.failures < 0 or self.window <= 0:
            raise ValueError("failures must be >= 0 and window > 0")

    @property
    def enabled(self) -> bool:
        return self.failures > 0

    @property
    def window_ms(self) -> int:
        return max(1, round(self.window * 1000))


def network_of(ip: str) -> str:
    """What failures are counted against: an IPv4 address itself, an IPv6 address's /64 (one
    host is routinely given a whole /64, and would otherwise get 2^64 fresh budgets)."""
    if ":" not in ip:
        return ip
    try:
        address = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


def redis_key(network: str) -> str:
    return f"authfail:{network}"


@dataclass(frozen=True, slots=True)
class FailureVerdict:
    throttled: bool
    """Answer this request 429 rather than with its own authentication error."""
    block_for: float
    """Seconds to refuse the network from now without looking at anything (0: do not)."""


def judge(count: int, seconds_left: float, limit: FailureLimit) -> FailureVerdict:
    """A failure was just counted, making `count` in a window with `seconds_left` to run.

    The first `failures` failures are answered with their own error (401); the one reaching
    the limit starts the block, and every later one is answered 429."""
    if not limit.enabled or count < limit.failures:
        return FailureVerdict(throttled=False, block_for=0.0)
    return FailureVerdict(throttled=count > limit.failures, block_for=max(0.0, seconds_left))


def counts_as_failure(status: int, reason: str) -> bool:
    """Whether a failed authentication counts against its client's network: a 401 (a wrong,
    malformed, revoked or expired credential: what guessing and replaying look like), but not
    one without any credential at all (`missing`: a misconfigured client, which guesses
    nothing and costs no lookup), nor a 403 (a real key of a suspended tenant)."""
    return status == 401 and reason != "missing"


class Cached(Enum):
    """What the shared key cache (Redis `api_key:{hash}`) holds for a key, as the throttle
    sees it."""

    NOTHING = "nothing"
    """No entry (never looked up, expired), or Redis did not answer."""
    UNKNOWN = "unknown"
    """PostgreSQL does not know the key."""
    CHANGING = "changing"
    """A tombstone: the key was just created, revoked or changed."""
    PRINCIPAL = "principal"
    """A key PostgreSQL knows, looked up by some gateway within the cache's time."""


@dataclass(frozen=True, slots=True)
class LookupVerdict:
    refuse_for: float
    """Answer 429 with this Retry-After instead of looking the key up (0: look it up)."""
    block_for: float
    """Seconds the shared count refuses the network from now (0: it does not): for this
    process's ledger, so its next failures from there need no Redis call."""


def judge_lookup(cached: Cached, shared_failures: int, shared_left: float,
                 local_left: float, limit: FailureLimit) -> LookupVerdict:
    """May a key be looked up for a client network whose failures are `shared_failures` in a
    window with `shared_left` seconds left (Redis; a negative or zero `shared_left` means the
    window has no end yet: a whole window), and which this process refuses for `local_left`?

    A key cached as a principal passes whatever the counts say: finding it costs no query,
    a guess is never one, and its owner may share a NAT with whoever failed — on any gateway,
    not only one that saw it succeed. (A cached principal of a revoked or expired key still
    fails its check; that failure then counts and is answered 429 like the others.) Any other
    key waits while either count refuses the network."""
    if not limit.enabled:
        return LookupVerdict(refuse_for=0.0, block_for=0.0)
    block = 0.0
    if shared_failures >= limit.failures:
        block = shared_left if shared_left > 0 else limit.window
    refuse = 0.0 if cached is Cached.PRINCIPAL else max(block, local_left, 0.0)
    return LookupVerdict(refuse_for=refuse, block_for=block)


class FailureLedger:
    """This process's counts and blocks, bounded to `capacity` networks each (the oldest go
    first: the shared count in Redis still holds them)."""

    def __init__(self, limit: FailureLimit, capacity: int = 100_000) -> None:
        self.limit = limit
        self.capacity = capacity
        self._counts: OrderedDict[str, tuple[float, int]] = OrderedDict()
        """network → (end of its window, failures in it)."""
        self._blocked: OrderedDict[str, float] = OrderedDict()
        """network → refused until."""

    def blocked_for(self, network: str, now: float) -> float:
        """Seconds `network` is still refused; 0 when it is not."""
        until = self._blocked.get(network)
        if until is None:
            return 0.0
        if until <= now:
            del self._blocked[network]
            return 0.0
        return until - now

    def block(self, network: str, seconds: float, now: float) -> None:
        if seconds <= 0:
            return
        until = now + seconds
        if self._blocked.get(network, 0.0) >= until:
            return
        self._blocked[network] = until
        self._blocked.move_to_end(network)
        self._bound(self._blocked, now, lambda v: v)

    def fail(self, network: str, now: float) -> tuple[int, float]:
        """Count a failure: (failures in the network's window, seconds left in it)."""
        held = self._counts.get(network)
        if held is None or held[0] <= now:
            end, count = now + self.limit.window, 1
        else:
            end, count = held[0], held[1] + 1
        self._counts[network] = (end, count)
        self._counts.move_to_end(network)
        self._bound(self._counts, now, lambda v: v[0])
        return count, end - now

    def _bound(self, table: OrderedDict[str, _V], now: float,
               expiry: Callable[[_V], float]) -> None:
        if len(table) <= self.capacity:
            return
        for network in [n for n, v in table.items() if expiry(v) <= now]:
            del table[network]
        while len(table) > self.capacity:
            table.popitem(last=False)

    def __len__(self) -> int:
        return len(self._counts) + len(self._blocked)
