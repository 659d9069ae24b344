"""The rate limits' vocabulary: layers, limits, the checks a request goes through, what an
admitted request holds (its reservation and lease) and the decision, with the fixed windows
counters live in.

Pure, like the rest of the limit decisions (`planning`: which checks apply; `verdicts`: the
verdict and its response headers). No I/O and no clock: time comes in as milliseconds since
the Unix epoch (Redis's clock in production, an injected one in the local limiter and the
tests).

Both limiters (Redis and per-process) run the same `plan` and the same `verdict`, so they
agree on what a layer is, which one refused and what the client is told.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

MINUTE_MS = 60_000
DAY_MS = 86_400_000

WINDOW_GRACE_MS = 10_000
"""Counters outlive their window by this much: a settle arriving just after the window ended
still finds the window start and is recognised as late (dropped), not applied to a new window."""

UNREACHABLE = 2**53
"""Limits at or above this are treated as no limit: Lua numbers are doubles, exact only below
2^53, and nobody can send 9 quadrillion requests a minute anyway."""

CONCURRENCY_RETRY_AFTER = 1.0
"""Seconds a client refused for concurrency is told to wait: a slot frees when any of its own
requests ends, which we cannot predict; the lease TTL (minutes) would be far too pessimistic."""


class Layer(StrEnum):
    """A rate-limit layer; the value is what `x-ratelimit-scope` and the metrics show."""

    KEY_REQUESTS = "key_requests"
    ENVIRONMENT_REQUESTS = "environment_requests"
    TENANT_REQUESTS = "tenant_requests"
    GLOBAL_REQUESTS = "global_requests"
    KEY_TOKENS_MINUTE = "key_tokens_minute"
    KEY_TOKENS_DAY = "key_tokens_day"
    ENVIRONMENT_TOKENS_MINUTE = "environment_tokens_minute"
    ENVIRONMENT_TOKENS_DAY = "environment_tokens_day"
    KEY_CONCURRENCY = "key_concurrency"
    KEY_BUDGET = "key_budget"
    ENVIRONMENT_BUDGET = "environment_budget"
    TENANT_BUDGET = "tenant_budget"
    """Spend budgets in money (services/domain/budgets.py): nano-dollars per period."""
    KEY_USAGE_REQUESTS = "key_usage_requests"
    """GET /v1/usage per key per minute: counted apart from inference (`usage_plan`)."""
    USAGE_REPORTS_IN_FLIGHT = "usage_reports_in_flight"
    """Not a counter in Redis: GET /v1/usage reports one gateway process computes at once
    (`in_flight.InFlight`), so reports cannot hold the PostgreSQL pool key lookups need."""
    UNAVAILABLE = "unavailable"
    """Not a limit: Redis is unreachable and the policy is `deny` (answer 503)."""


class Kind(StrEnum):
    REQUESTS = "r"
    TOKENS = "t"
    CONCURRENCY = "c"
    MONEY = "m"
    """A budget: nano-dollars in a period the gateway names (its end, in ms), not a window
    Redis's clock derives: months are not a fixed length."""


class Origin(StrEnum):
    """Where a reservation lives, so settle/renew go back to the same place."""

    REDIS = "redis"
    LOCAL = "local"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class LimitSubject:
    """Who a request is counted against: the API key and the environment and tenant it
    belongs to (from the auth step)."""

    key_id: str
    environment_id: str
    tenant_id: str


@dataclass(frozen=True, slots=True)
class BudgetCap:
    """A spend budget over a request: at most `limit` nano-dollars in the period ending at
    `period_end_ms` (Unix ms; the gateway computes it, services/domain/budgets.py)."""

    layer: Layer
    limit: int
    period_end_ms: int
    period_start_ms: int = 0


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one request's subject. None means no limit at that layer."""

    key_requests_per_minute: int | None = None
    environment_requests_per_minute: int | None = 10_000
    tenant_requests_per_minute: int | None = 50_000
    global_requests_per_minute: int | None = None
    key_tokens_per_minute: int | None = None
    key_tokens_per_day: int | None = None
    environment_tokens_per_minute: int | None = None
    environment_tokens_per_day: int | None = None
    key_concurrency: int | None = None
    budgets: tuple[BudgetCap, ...] = ()

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, int) and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, not {value}")
        if any(b.limit < 0 for b in self.budgets):
            raise ValueError("a budget cannot be negative")


@dataclass(frozen=True, slots=True)
class Check:
    """One layer to check for one request: the Redis key (also the local limiter's key), the
    limit, the window and how much this request adds."""

    layer: Layer
    kind: Kind
    key: str
    limit: int | None
    """None only for the lease of a key without a concurrency limit: the lease is then kept
    just as the record that makes settling idempotent, and never refuses."""
    window_ms: int
    """0 for concurrency; for money, the period's end (Unix ms), which names the period."""
    amount: int
    starts_ms: int = 0
    """For money: the period's start (what billing's records are summed from)."""
    least: int = 0
    """For money: the least the request can run with (its prompt and one output token a
    sequence). When `amount` does not fit but this does, what is left of the tightest budget
    is granted instead, and the gateway lowers the request's output limit to what the grant
    pays for. 0: all or nothing."""


@dataclass(frozen=True, slots=True)
class TokenWindow:
    """A token counter a reservation added to, and the window it added to."""

    key: str
    start_ms: int


@dataclass(slots=True)
class SlicedTokens:
    """What a request holds of this gateway's slices (RATELIMIT_SLICES): tokens reserved and a
    concurrency slot, to settle into them once."""

    windows: tuple[TokenWindow, ...]
    reserved: int
    settled: bool = False
    slot: str | None = None
    """The key's lease set, when the request holds one of this gateway's concurrency slots
    there (freed at settle)."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """What an allowed request holds until `settle`: its lease and its reserved tokens."""

    lease_id: str
    origin: Origin
    lease_key: str | None
    """The key's in-flight set holding the lease; None when there is nothing to settle."""
    token_windows: tuple[TokenWindow, ...]
    tokens: int
    """The estimate reserved at every token layer."""
    money_windows: tuple[TokenWindow, ...] = ()
    """The budget counters the reservation added to (`start_ms`: the period's end)."""
    money: int = 0
    """Nano-dollars reserved at every budget layer."""
    sliced: SlicedTokens | None = None
    """Tokens reserved from slices rather than in Redis (settled in the gateway)."""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    layer: Layer | None
    """The layer that refused; None when allowed."""
    retry_after: float
    """Seconds until the refusing layer could allow again; 0 when allowed."""
    headers: dict[str, str]
    reservation: Reservation | None
    """Set exactly when allowed: pass it to `settle` (or `release`) when the request ends."""
    degraded: bool
    """Decided without Redis (fallback policy)."""

    @property
    def status(self) -> int:
        """The HTTP status the gateway answers with: 200 (go on), 429 or 503."""
        if self.allowed:
            return 200
        return 503 if self.layer is Layer.UNAVAILABLE else 429


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of evaluating a request's checks against their counters."""

    allowed: bool
    layer: Layer | None
    retry_after: float
    headers: dict[str, str]


# --------------------------------------------------------------------------- windows


def window_start(now_ms: int, window_ms: int) -> int:
    """Fixed windows aligned on the epoch: minutes and UTC days (the epoch has no leap
    seconds, so a multiple of 86,400,000 ms is always a UTC midnight)."""
    return now_ms - now_ms % window_ms


def window_reset_ms(now_ms: int, window_ms: int) -> int:
    """Milliseconds until the window holding `now_ms` ends (never 0: a window just started
    has its whole length ahead)."""
    return window_start(now_ms, window_ms) + window_ms - now_ms


def window_id(check: Check, now_ms: int) -> int:
    """What names the window a counter is in: its start (the period's end for money)."""
    return check.window_ms if check.kind is Kind.MONEY else window_start(now_ms, check.window_ms)


# --------------------------------------------------------------------------- reservations


def lease_member(lease_id: str, money: int, checks: Sequence[Check]) -> str:
    """A lease as Redis holds it: a budgeted one names what it holds (`money` at each budget
    counter, in its period), so that whoever finds it expired unsettled — its gateway died —
    can give the money back (the ACQUIRE and SWEEP scripts). Pure."""
    if money <= 0:
        return lease_id
    held = "".join(f"{c.key}@{c.window_ms}|" for c in checks if c.kind is Kind.MONEY)
    return f"{lease_id}|{money}|{held}" if held else lease_id


def held_by(member: str) -> tuple[int, dict[str, int]]:
    """What a lease member holds (`lease_member`): nano-dollars, and the period end of each
    budget counter it holds them at. Nothing for a lease without money. Pure."""
    parts = member.split("|")
    if len(parts) < 4 or not parts[1].isdigit():
        return 0, {}
    counters = {}
    for part in parts[2:-1]:
        key, _, window = part.rpartition("@")
        if key and window.isdigit():
            counters[key] = int(window)
    return int(parts[1]), counters


def reservation_for(checks: Sequence[Check], now_ms: int, lease_id: str,
                    origin: Origin, money: int | None = None) -> Reservation:
    """What an allowed request holds; `money`: the nano-dollars granted at every budget
    (`money_grant`), its worst case when not given."""
    lease_key = next((c.key for c in checks if c.kind is Kind.CONCURRENCY), None)
    windows = tuple(TokenWindow(c.key, window_start(now_ms, c.window_ms))
                    for c in checks if c.kind is Kind.TOKENS)
    tokens = next((c.amount for c in checks if c.kind is Kind.TOKENS), 0)
    budgets = tuple(TokenWindow(c.key, c.window_ms) for c in checks if c.kind is Kind.MONEY)
    if money is None:
        money = next((c.amount for c in checks if c.kind is Kind.MONEY), 0)
    if origin is Origin.REDIS and lease_key:
        lease_id = lease_member(lease_id, money, checks)  # as ACQUIRE wrote it
    return Reservation(lease_id=lease_id if lease_key else "", origin=origin,
                       lease_key=lease_key, token_windows=windows, tokens=tokens,
                       money_windows=budgets, money=money)
