"""Which checks a request goes through (`plan`, `money_checks`, `usage_plan`) and under which
Redis keys, and their form for the ACQUIRE script, prepared once per plan (`PlanCache`). Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.gateway.ratelimit.limits import (
    DAY_MS,
    MINUTE_MS,
    UNREACHABLE,
    BudgetCap,
    Check,
    Kind,
    Layer,
    Limits,
    LimitSubject,
)


def redis_key(layer: Layer, subject: LimitSubject) -> str:
    """The reference document's key names, each ending in its tenant's hash tag
    (`:{tenant_id}`): Redis Cluster puts keys with one tag in one slot, so every key one
    request's script touches (its key's, its environment's, its tenant's) lives on one node.
    The platform-wide counter has no tag: it is reached by slices (global_lease.py)."""
    s = subject
    tag = f":{{{s.tenant_id}}}"
    match layer:
        case Layer.KEY_REQUESTS:
            return f"ratelimit:key:{s.key_id}:minute{tag}"
        case Layer.ENVIRONMENT_REQUESTS:
            return f"ratelimit:env:{s.environment_id}:minute{tag}"
        case Layer.TENANT_REQUESTS:
            return f"ratelimit:tenant:{s.tenant_id}:minute{tag}"
        case Layer.GLOBAL_REQUESTS:
            return "ratelimit:global:minute"
        case Layer.KEY_TOKENS_MINUTE:
            return f"tokens:key:{s.key_id}:minute{tag}"
        case Layer.KEY_TOKENS_DAY:
            return f"tokens:key:{s.key_id}:day{tag}"
        case Layer.ENVIRONMENT_TOKENS_MINUTE:
            return f"tokens:env:{s.environment_id}:minute{tag}"
        case Layer.ENVIRONMENT_TOKENS_DAY:
            return f"tokens:env:{s.environment_id}:day{tag}"
        case Layer.KEY_CONCURRENCY:
            return f"ratelimit:key:{s.key_id}:concurrency{tag}"
        case Layer.KEY_USAGE_REQUESTS:
            return f"ratelimit:usage:key:{s.key_id}:minute{tag}"
        case Layer.KEY_BUDGET:
            return f"budget:key:{s.key_id}{tag}"
        case Layer.ENVIRONMENT_BUDGET:
            return f"budget:env:{s.environment_id}{tag}"
        case Layer.TENANT_BUDGET:
            return f"budget:tenant:{s.tenant_id}{tag}"
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
    """The ACQUIRE script's keys: every check's but the platform-wide one's."""
    spec: str
    """The ACQUIRE script's check list: ``kind limit window amount`` per check it counts."""
    lease: bool
    least: int = 0
    """The budgets' `Check.least` (one for all of them: ACQUIRE's last argument)."""
    global_at: int = -1
    """Where the platform-wide check is in `checks` (-1: none). Not counted by ACQUIRE: each
    gateway spends slices of it it borrowed (share.py)."""
    counted_at: tuple[int, ...] = ()
    """Where the checks ACQUIRE counts are in `checks`, in `keys` order."""
    sliced_at: tuple[int, ...] = ()
    """Where the checks spent from this gateway's slices are (RATELIMIT_SLICES:
    counter_leases.py), in `checks`."""

    @property
    def sliced(self) -> tuple[Check, ...]:
        return tuple(self.checks[i] for i in self.sliced_at)

    @property
    def counted(self) -> tuple[Check, ...]:
        return tuple(self.checks[i] for i in self.counted_at)


def prepare(checks: tuple[Check, ...], slices: bool = False) -> PreparedChecks:
    """With `slices`, the request and token counters and the concurrency limit are spent from
    slices, and a lease is taken only for a budget (the tokens settle into the slices)."""
    global_at = next((i for i, c in enumerate(checks) if c.layer is Layer.GLOBAL_REQUESTS), -1)
    money = any(c.kind is Kind.MONEY for c in checks)
    sliced_at = tuple(i for i, c in enumerate(checks) if slices and i != global_at and (
        c.kind in (Kind.REQUESTS, Kind.TOKENS)
        # A concurrency limit by slots, but for a request that holds money: its lease is
        # what gives the money back should its gateway die.
        or (c.kind is Kind.CONCURRENCY and c.limit is not None and not money)))
    counted_at = tuple(
        i for i, c in enumerate(checks) if i != global_at and i not in sliced_at
        and not (sliced_at and c.kind is Kind.CONCURRENCY and c.limit is None and not money))
    counted = [checks[i] for i in counted_at]
    spec = " ".join(f"{c.kind.value} {-1 if c.limit is None else c.limit} "
                    f"{c.window_ms} {c.amount}" for c in counted)
    least = next((c.least for c in checks if c.kind is Kind.MONEY), 0)
    return PreparedChecks(checks, tuple(c.key for c in counted), spec, needs_lease(counted),
                          least, global_at, counted_at, sliced_at)


class PlanCache:
    """`plan` for a hot path: a subject's checks depend on its limits, which change rarely,
    and on the token estimate, which a client mostly keeps the same (its max_tokens). Each
    (subject, limits, estimate) is planned and prepared once; a request then builds nothing."""

    def __init__(self, capacity: int = 50_000, *, slices: bool = False) -> None:
        self.capacity = capacity
        self.slices = slices
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
            found = self._plans[key] = prepare(plan(subject, limits, tokens, cost, least),
                                               self.slices)
        return found

    def plan(self, subject: LimitSubject, limits: Limits, estimated_tokens: int,
             estimated_cost: int = 0, least_cost: int = 0) -> tuple[Check, ...]:
        return self.prepared(subject, limits, estimated_tokens, estimated_cost,
                             least_cost).checks


def needs_lease(checks: Sequence[Check]) -> bool:
    return any(c.kind is Kind.CONCURRENCY for c in checks)
