"""The pure half of rate limiting: types, which checks apply, window arithmetic, the verdict and
its response headers. No I/O and no clock: time comes in as milliseconds since the Unix epoch
(Redis's clock in production, an injected one in the local limiter and the tests).

Both limiters (Redis and per-process) run the same `plan` and the same `verdict`, so they
agree on what a layer is, which one refused and what the client is told.
"""

from __future__ import annotations

import math
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


# --------------------------------------------------------------------------- keys and plan


def redis_key(layer: Layer, subject: LimitSubject) -> str:
    """The reference document's key names. One Redis, no Cluster: a Cluster would need hash
    tags to put one request's keys in one slot (see docs/rate-limits.md)."""
    s = subject
    match layer:
        case Layer.KEY_REQUESTS:
            return f"ratelimit:key:{s.key_id}:minute"
        case Layer.ENVIRONMENT_REQUESTS:
            return f"ratelimit:env:{s.environment_id}:minute"
        case Layer.TENANT_REQUESTS:
            return f"ratelimit:tenant:{s.tenant_id}:minute"
        case Layer.GLOBAL_REQUESTS:
            return "ratelimit:global:minute"
        case Layer.KEY_TOKENS_MINUTE:
            return f"tokens:key:{s.key_id}:minute"
        case Layer.KEY_TOKENS_DAY:
            return f"tokens:key:{s.key_id}:day"
        case Layer.ENVIRONMENT_TOKENS_MINUTE:
            return f"tokens:env:{s.environment_id}:minute"
        case Layer.ENVIRONMENT_TOKENS_DAY:
            return f"tokens:env:{s.environment_id}:day"
        case Layer.KEY_CONCURRENCY:
            return f"ratelimit:key:{s.key_id}:concurrency"
        case Layer.KEY_USAGE_REQUESTS:
            return f"ratelimit:usage:key:{s.key_id}:minute"
        case Layer.KEY_BUDGET:
            return f"budget:key:{s.key_id}"
        case Layer.ENVIRONMENT_BUDGET:
            return f"budget:env:{s.environment_id}"
        case Layer.TENANT_BUDGET:
            return f"budget:tenant:{s.tenant_id}"
    raise ValueError(f"{layer} has no Redis key")


def _effective(limit: int | None) -> int | None:
    return None if limit is None or limit >= UNREACHABLE else limit


def plan(subject: LimitSubject, limits: Limits, estimated_tokens: int,
         estimated_cost: int = 0, least_cost: int = 0) -> tuple[Check, ...]:
    """The checks one request goes through, in a fixed order (requests, tokens, budgets,
    concurrency; key before environment before tenant before global) that also breaks ties.
    `estimated_cost`: nano-dollars, the most the request can cost (reserved at each budget);
    `least_cost`: the least it can run with (`Check.least`)."""
    tokens = max(0, estimated_tokens)
    layered: list[tuple[Layer, Kind, int | None, int, int]] = [
        (Layer.KEY_REQUESTS, Kind.REQUESTS, limits.key_requests_per_minute, MINUTE_MS, 1),
        (Layer.ENVIRONMENT_REQUESTS, Kind.REQUESTS, limits.environment_requests_per_minute,
         MINUTE_MS, 1),
        (Layer.TENANT_REQUESTS, Kind.REQUESTS, limits.tenant_requests_per_minute, MINUTE_MS, 1),
        (Layer.GLOBAL_REQUESTS, Kind.REQUESTS, limits.global_requests_per_minute, MINUTE_MS, 1),
        (Layer.KEY_TOKENS_MINUTE, Kind.TOKENS, limits.key_tokens_per_minute, MINUTE_MS, tokens),
        (Layer.KEY_TOKENS_DAY, Kind.TOKENS, limits.key_tokens_per_day, DAY_MS, tokens),
        (Layer.ENVIRONMENT_TOKENS_MINUTE, Kind.TOKENS, limits.environment_tokens_per_minute,
         MINUTE_MS, tokens),
        (Layer.ENVIRONMENT_TOKENS_DAY, Kind.TOKENS, limits.environment_tokens_per_day, DAY_MS,
         tokens),
    ]
    checks = [Check(layer, kind, redis_key(layer, subject), limit, window, amount)
              for layer, kind, raw, window, amount in layered
              if (limit := _effective(raw)) is not None]
    checks += money_checks(subject, limits.budgets, estimated_cost, least_cost)
    concurrency = _effective(limits.key_concurrency)
    has_tokens = any(c.kind in (Kind.TOKENS, Kind.MONEY) for c in checks)
    if concurrency is not None or has_tokens:
        checks.append(Check(Layer.KEY_CONCURRENCY, Kind.CONCURRENCY,
                            redis_key(Layer.KEY_CONCURRENCY, subject), concurrency, 0, 1))
    return tuple(checks)


def money_checks(subject: LimitSubject, budgets: Sequence[BudgetCap], amount: int = 0,
                 least: int = 0) -> list[Check]:
    """The check of each budget over `subject`: `amount` nano-dollars asked for at each, and
    `least` the request can run with (`Check.least`)."""
    amount = max(0, amount)
    least = min(amount, max(0, least))
    return [Check(b.layer, Kind.MONEY, redis_key(b.layer, subject), b.limit, b.period_end_ms,
                  amount, b.period_start_ms, least) for b in budgets]


def usage_plan(subject: LimitSubject, per_minute: int | None) -> tuple[Check, ...]:
    """The one check of a usage report: requests per key per minute, on a counter of its own,
    so reading usage neither spends nor is blocked by the key's inference budget."""
    limit = _effective(per_minute)
    if limit is None:
        return ()
    layer = Layer.KEY_USAGE_REQUESTS
    return (Check(layer, Kind.REQUESTS, redis_key(layer, subject), limit, MINUTE_MS, 1),)


@dataclass(frozen=True, slots=True)
class PreparedChecks:
    """A request's checks with what the Redis call needs, derived once per plan."""

    checks: tuple[Check, ...]
    keys: tuple[str, ...]
    spec: str
    """The ACQUIRE script's check list: ``kind limit window amount`` per check."""
    lease: bool
    least: int = 0
    """The budgets' `Check.least` (one for all of them: ACQUIRE's last argument)."""


def prepare(checks: tuple[Check, ...]) -> PreparedChecks:
    spec = " ".join(f"{c.kind.value} {-1 if c.limit is None else c.limit} "
                    f"{c.window_ms} {c.amount}" for c in checks)
    least = next((c.least for c in checks if c.kind is Kind.MONEY), 0)
    return PreparedChecks(checks, tuple(c.key for c in checks), spec, needs_lease(checks),
                          least)


class PlanCache:
    """`plan` for a hot path: a subject's checks depend on its limits, which change rarely,
    and on the token estimate, which a client mostly keeps the same (its max_tokens). Each
    (subject, limits, estimate) is planned and prepared once; a request then builds nothing."""

    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = capacity
        self._plans: dict[tuple[LimitSubject, Limits, int, int, int], PreparedChecks] = {}

    def prepared(self, subject: LimitSubject, limits: Limits, estimated_tokens: int,
                 estimated_cost: int = 0, least_cost: int = 0) -> PreparedChecks:
        tokens = max(0, estimated_tokens)
        cost, least = (max(0, estimated_cost), max(0, least_cost)) if limits.budgets else (0, 0)
        key = (subject, limits, tokens, cost, least)
        found = self._plans.get(key)
        if found is None:
            if len(self._plans) >= self.capacity:
                self._plans.clear()  # rare; cheaper than bookkeeping an LRU per request
            found = self._plans[key] = prepare(plan(subject, limits, tokens, cost, least))
        return found

    def plan(self, subject: LimitSubject, limits: Limits, estimated_tokens: int,
             estimated_cost: int = 0, least_cost: int = 0) -> tuple[Check, ...]:
        return self.prepared(subject, limits, estimated_tokens, estimated_cost,
                             least_cost).checks


def needs_lease(checks: Sequence[Check]) -> bool:
    return any(c.kind is Kind.CONCURRENCY for c in checks)


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


def window_id(check: Check, now_ms: int) -> int:
    """What names the window a counter is in: its start (the period's end for money)."""
    return check.window_ms if check.kind is Kind.MONEY else window_start(now_ms, check.window_ms)


# --------------------------------------------------------------------------- windows


def window_start(now_ms: int, window_ms: int) -> int:
    """Fixed windows aligned on the epoch: minutes and UTC days (the epoch has no leap
    seconds, so a multiple of 86,400,000 ms is always a UTC midnight)."""
    return now_ms - now_ms % window_ms


def window_reset_ms(now_ms: int, window_ms: int) -> int:
    """Milliseconds until the window holding `now_ms` ends (never 0: a window just started
    has its whole length ahead)."""
    return window_start(now_ms, window_ms) + window_ms - now_ms


def fits(check: Check, used: int) -> bool:
    """Whether one more request fits. A request adds at least 1 to the comparison so that a
    zero-token estimate is still refused once the budget is spent (and a limit of 0 refuses
    everything). A budget fits when the least the request can run with does (`Check.least`)."""
    if check.limit is None:
        return True
    need = check.least if check.kind is Kind.MONEY and check.least else check.amount
    return used + max(need, 1) <= check.limit


def money_grant(checks: Sequence[Check], used: Sequence[int]) -> int:
    """The nano-dollars an admitted request holds at every budget: its worst case, or what is
    left of the tightest budget when that is less (never below `Check.least`: the request
    would not have fitted). What the ACQUIRE script computes, for the local limiter."""
    grant: int | None = None
    for check, u in zip(checks, used, strict=True):
        if check.kind is not Kind.MONEY:
            continue
        if grant is None:
            grant = check.amount
        if check.limit is not None:
            grant = min(grant, max(0, check.limit - u))
    return grant or 0


# --------------------------------------------------------------------------- verdict


def format_reset(seconds: float) -> str:
    """OpenAI's reset format, which is Go's `time.Duration` string at millisecond precision,
    rounded up: `20ms`, `1s`, `1.5s`, `6m0s`, `1h0m0s`; `0s` for nothing left to wait."""
    ms = max(0, math.ceil(round(seconds * 1000, 6)))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)
    out = f"{hours}h" if hours else ""
    if hours or minutes:
        out += f"{minutes}m"
    return f"{out}{secs}s"


def retry_after_header(seconds: float) -> str:
    """`Retry-After` is whole seconds; rounded up and at least 1 so clients never spin."""
    return str(max(1, math.ceil(round(seconds, 6))))


def retry_after_of(check: Check, now_ms: int) -> float:
    if check.kind is Kind.CONCURRENCY:
        return CONCURRENCY_RETRY_AFTER
    if check.kind is Kind.MONEY:
        return max(0, check.window_ms - now_ms) / 1000
    return window_reset_ms(now_ms, check.window_ms) / 1000


def verdict(checks: Sequence[Check], used: Sequence[int], now_ms: int, *,
            committed: bool | None = None) -> Verdict:
    """Judge a request from each check's usage *before* it (`used`, aligned with `checks`,
    already 0 for a stale window). `committed` is what the store did (the Lua script decides
    atomically); by default it is recomputed, which is what the local limiter does.

    When several layers refuse, the one that frees last is named: retrying before it resets
    is pointless."""
    if len(used) != len(checks):
        raise ValueError("one usage figure per check")
    failing = [i for i, (c, u) in enumerate(zip(checks, used, strict=True)) if not fits(c, u)]
    allowed = not failing if committed is None else committed
    layer: Layer | None = None
    retry_after = 0.0
    refused: Check | None = None
    if not allowed:
        candidates = failing or [i for i, c in enumerate(checks) if c.limit is not None][:1]
        if candidates:
            best = max(candidates, key=lambda i: (retry_after_of(checks[i], now_ms), -i))
            refused = checks[best]
            layer = refused.layer
            retry_after = retry_after_of(refused, now_ms)
    headers = rate_limit_headers(checks, used, now_ms, committed=allowed, refused=refused)
    if not allowed:
        if layer is not None:
            headers["x-ratelimit-scope"] = str(layer)
        headers["Retry-After"] = retry_after_header(retry_after)
    return Verdict(allowed=allowed, layer=layer, retry_after=retry_after, headers=headers)


def rate_limit_headers(checks: Sequence[Check], used: Sequence[int], now_ms: int, *,
                       committed: bool, refused: Check | None = None) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the most constraining request layer and token
    layer (remaining counted after this request when it was committed). When a layer of one
    kind refused, that kind's headers describe it, so they agree with `x-ratelimit-scope`."""
    # Runs on every request: one pass, few objects. The most constraining check of a kind has
    # the fewest remaining, then resets last (it binds longer), then comes first in the plan;
    # a check that refused is named whatever its standing.
    best: dict[Kind, tuple[tuple[int, int, int], Check, int, int]] = {}
    for i, c in enumerate(checks):
        limit = c.limit
        if limit is None or c.kind is Kind.CONCURRENCY or c.kind is Kind.MONEY:
            continue
        remaining = limit - (used[i] + c.amount if committed else used[i])
        if remaining < 0:
            remaining = 0
        window = c.window_ms
        reset = window - now_ms % window if window else 0
        rank = (-1, 0, 0) if c is refused else (remaining, -reset, i)
        held = best.get(c.kind)
        if held is None or rank < held[0]:
            best[c.kind] = (rank, c, remaining, reset)
    headers: dict[str, str] = {}
    for kind, suffix in ((Kind.REQUESTS, "requests"), (Kind.TOKENS, "tokens")):
        chosen = best.get(kind)
        if chosen is None:
            continue
        _, check, remaining, reset = chosen
        headers[f"x-ratelimit-limit-{suffix}"] = str(check.limit)
        headers[f"x-ratelimit-remaining-{suffix}"] = str(remaining)
        headers[f"x-ratelimit-reset-{suffix}"] = format_reset(reset / 1000)
    return headers


def unavailable(retry_after: float) -> Verdict:
    """Redis is unreachable and the policy is `deny`."""
    return Verdict(allowed=False, layer=Layer.UNAVAILABLE, retry_after=retry_after,
                   headers={"x-ratelimit-scope": str(Layer.UNAVAILABLE),
                            "Retry-After": retry_after_header(retry_after)})
