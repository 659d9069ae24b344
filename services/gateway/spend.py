"""Spend budgets at the gateway (issue 21): what a request may cost before it runs, what it
cost when it ends, the caps over it now, and how a refusal reads. Pure.

The worst case must be an upper bound, or a budget could be overshot: the prompt is counted
as at most one token per byte of the request body (every token of a byte-level tokenizer
covers at least one byte of text, and the body's JSON around the text outweighs a chat
template's markers) and never more than the model's context; the output as what the request
allows (the context when it sets no limit), for every sequence it runs; the region as the
dearest one it could be served in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal

import msgspec

from services.domain.budgets import Period, nano, period_bounds, worst_case_cost
from services.domain.pricing import cost
from services.domain.usage_queries import money
from services.gateway.auth import Principal, PrincipalBudget
from services.gateway.models import ModelInfo
from services.gateway.ratelimit import BudgetCap, Layer

LAYERS = {"key": Layer.KEY_BUDGET, "environment": Layer.ENVIRONMENT_BUDGET,
          "tenant": Layer.TENANT_BUDGET}
BUDGET_LAYERS = frozenset(LAYERS.values())


class Pricer:
    def __init__(self, multipliers: Mapping[str, Decimal]) -> None:
        self.multipliers = dict(multipliers)
        self.dearest = max([Decimal(1), *self.multipliers.values()])

    def worst_case(self, model: ModelInfo, body_bytes: int, output_bound: int) -> int:
        """Nano-dollars the request can cost at most."""
        prompt = min(body_bytes, model.context_length)
        return nano(worst_case_cost(prompt, output_bound, 1, model.input_price,
                                    model.output_price, self.dearest))

    def bounds(self, model: ModelInfo, body_bytes: int, output_bound: int,
               sequences: int) -> tuple[int, int]:
        """(the most the request can cost, the least it can run with): its prompt and one
        output token a sequence, when it generates (else all or nothing)."""
        worst = self.worst_case(model, body_bytes, output_bound)
        if output_bound <= sequences:
            return worst, worst
        return worst, self.worst_case(model, body_bytes, sequences)

    def output_limit(self, model: ModelInfo, body_bytes: int, sequences: int, granted: int,
                     per_sequence: int) -> int:
        """The most output tokens a sequence (1 to `per_sequence`) whose worst case is paid
        for by `granted` nano-dollars. The cost grows with the tokens, so a bisection finds
        it: ~17 prices at most, and only for a request admitted with less than its worst
        case (the last ones of a budget's period)."""
        low, high = 1, max(1, per_sequence)
        while low < high:
            mid = (low + high + 1) // 2
            if self.worst_case(model, body_bytes, mid * sequences) <= granted:
                low = mid
            else:
                high = mid - 1
        return low

    def actual(self, model: ModelInfo, prompt: int, completion: int, region: str) -> int:
        """Nano-dollars billing will charge (services/domain/pricing.py)."""
        return nano(cost(prompt, completion, model.input_price, model.output_price,
                         self.multipliers.get(region, Decimal(1))))


def caps(budgets: Sequence[PrincipalBudget], now: datetime) -> tuple[BudgetCap, ...]:
    """The budgets over a key now: each with the end of its current period."""
    out = []
    for b in budgets:
        anchor = datetime.fromtimestamp(b.anchor, UTC) if b.anchor is not None else None
        period = Period(b.period, b.every_days, anchor)  # type: ignore[arg-type]
        start, end = period_bounds(period, now)
        out.append(BudgetCap(LAYERS[b.scope], b.amount_nano, int(end.timestamp() * 1000),
                             int(start.timestamp() * 1000)))
    return tuple(out)


class CapsCache:
    """`caps` for the hot path: the periods of a key's budgets change only when one ends, so
    each set of budgets is worked out once per period rather than on every request."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._found: dict[tuple[PrincipalBudget, ...],
                          tuple[tuple[BudgetCap, ...], int, int]] = {}

    def caps(self, budgets: tuple[PrincipalBudget, ...], now: float) -> tuple[BudgetCap, ...]:
        """`caps(budgets)` at `now` (Unix seconds)."""
        now_ms = int(now * 1000)
        found = self._found.get(budgets)
        if found is not None and found[1] <= now_ms < found[2]:
            return found[0]
        computed = caps(budgets, datetime.fromtimestamp(now, UTC))
        if len(self._found) >= self.capacity:
            self._found.clear()  # rare; cheaper than an LRU's bookkeeping per request
        # Good from the latest start to the earliest end: a clock stepped back recomputes.
        self._found[budgets] = (computed, max(c.period_start_ms for c in computed),
                                min(c.period_end_ms for c in computed))
        return computed


def refusal_message(layer: Layer, budgets: Sequence[PrincipalBudget], retry_after: float,
                    now: datetime) -> str:
    scope = next(s for s, found in LAYERS.items() if found is layer)
    budget = next((b for b in budgets if b.scope == scope), None)
    amount = f"${Decimal(budget.amount_nano).scaleb(-9).normalize():f} " if budget else ""
    per = ("period" if budget is None else f"{budget.every_days} days"
           if budget.period == "days" else budget.period)
    resets = datetime.fromtimestamp(now.timestamp() + retry_after, UTC)
    what = {"key": "this API key's", "environment": "this environment's",
            "tenant": "your account's"}[scope]
    return (f"What is left of {what} spend budget ({amount}per {per}) does not cover the "
            f"least this request can cost. It resets at {resets:%Y-%m-%dT%H:%M:%SZ}; send "
            f"a shorter request, or raise the budget.")


class BudgetView(msgspec.Struct, kw_only=True):
    """A budget over the caller's key as the tenant reads it (GET /v1/budgets)."""

    object: str = "budget"
    scope: str
    """`key` (the caller's own), `environment` (its environment's) or `tenant` (the
    account's)."""
    scope_id: str
    amount: str
    """Dollars per period, 9 places."""
    currency: str = "usd"
    period: str
    every_days: int | None = None
    anchor: datetime | None = None
    period_start: datetime
    period_end: datetime
    spent: str
    """What billing recorded in the period (a few seconds behind the requests)."""
    remaining: str


class BudgetList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[BudgetView]


def budget_views(principal: Principal, caps_now: Sequence[BudgetCap],
                 spent: Sequence[int]) -> BudgetList:
    """The budgets over `principal`'s key with their current periods (`caps`, in the same
    order) and what was spent in each (nano-dollars). Pure."""
    ids = {"key": principal.key_id, "environment": principal.environment_id,
           "tenant": principal.tenant_id}
    views = []
    for budget, cap, nanos in zip(principal.budgets, caps_now, spent, strict=True):
        amount, used = Decimal(budget.amount_nano).scaleb(-9), Decimal(nanos).scaleb(-9)
        custom = budget.period == "days"
        views.append(BudgetView(
            scope=budget.scope, scope_id=ids[budget.scope], amount=money(amount),
            period=budget.period, every_days=budget.every_days if custom else None,
            anchor=datetime.fromtimestamp(budget.anchor, UTC)
            if custom and budget.anchor is not None else None,
            period_start=datetime.fromtimestamp(cap.period_start_ms / 1000, UTC),
            period_end=datetime.fromtimestamp(cap.period_end_ms / 1000, UTC),
            spent=money(used), remaining=money(max(Decimal(0), amount - used))))
    return BudgetList(data=views)
