"""Spend budgets' pure rules: periods, the worst case a request may cost, amounts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.domain.budgets import (
    MAX_AMOUNT,
    Budget,
    Period,
    nano,
    period_bounds,
    worst_case_cost,
)
from services.domain.pricing import cost


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_a_day_resets_at_utc_midnight_and_a_month_on_the_first() -> None:
    assert period_bounds(Period("day"), at(2026, 3, 10, 23, 59)) == (at(2026, 3, 10),
                                                                    at(2026, 3, 11))
    assert period_bounds(Period("month"), at(2026, 2, 14, 5)) == (at(2026, 2, 1), at(2026, 3, 1))
    assert period_bounds(Period("month"), at(2024, 2, 29, 23)) == (at(2024, 2, 1),
                                                                  at(2024, 3, 1))
    assert period_bounds(Period("month"), at(2026, 12, 31, 23)) == (at(2026, 12, 1),
                                                                   at(2027, 1, 1))


def test_custom_periods_repeat_from_their_anchor_both_ways() -> None:
    weekly = Period("days", every_days=7, anchor=at(2026, 3, 2, 9))
    assert period_bounds(weekly, at(2026, 3, 2, 9)) == (at(2026, 3, 2, 9), at(2026, 3, 9, 9))
    assert period_bounds(weekly, at(2026, 3, 20)) == (at(2026, 3, 16, 9), at(2026, 3, 23, 9))
    assert period_bounds(weekly, at(2026, 3, 1)) == (at(2026, 2, 23, 9), at(2026, 3, 2, 9))
    start, end = period_bounds(weekly, at(2026, 3, 9, 8, 59, 59))
    assert end - start == timedelta(days=7) and start <= at(2026, 3, 9, 8, 59, 59) < end
    with pytest.raises(ValueError, match="anchor"):
        Period("days", every_days=7)
    with pytest.raises(ValueError, match="every_days"):
        Period("days", every_days=0, anchor=at(2026, 1, 1))


def test_the_worst_case_is_every_choice_at_its_output_budget_in_the_dearest_region() -> None:
    worst = worst_case_cost(1000, 200, 3, Decimal("3"), Decimal("15"), Decimal("1.25"))
    assert worst == cost(1000, 600, Decimal("3"), Decimal("15"), Decimal("1.25"))
    assert worst == Decimal("0.015"), worst  # (1000 x 3 + 600 x 15) / 1M x 1.25
    # Whatever the request really costs, it is not more than that.
    for prompt, completion, mult in ((1000, 600, "1.25"), (1000, 0, "1"), (999, 599, "1.1")):
        assert cost(prompt, completion, Decimal("3"), Decimal("15"), Decimal(mult)) <= worst


def test_amounts_are_dollars_on_the_nano_dollar_grid_and_bounded() -> None:
    assert nano(Decimal("12.5")) == 12_500_000_000
    assert nano(MAX_AMOUNT) < 2**53  # exact in Redis's Lua
    Budget("tenant", "t", Decimal("0"), Period("month"))
    with pytest.raises(ValueError, match="0 to"):
        Budget("tenant", "t", MAX_AMOUNT + 1, Period("month"))
    with pytest.raises(ValueError, match="9 decimal places"):
        Budget("key", "k", Decimal("0.0000000001"), Period("day"))


def test_the_gateway_prices_the_worst_case_at_the_dearest_region_and_bounds_the_prompt() -> None:
    from services.gateway.auth import PrincipalBudget
    from services.gateway.models import ModelInfo
    from services.gateway.ratelimit import Layer
    from services.gateway.spend import Pricer, caps, refusal_message

    model = ModelInfo("m", 1000, 0, Decimal("3"), Decimal("15"))
    pricer = Pricer({"eu-west-1": Decimal("1.10"), "cheap": Decimal("0.5")})
    assert pricer.dearest == Decimal("1.10")
    # The prompt is the body's bytes, never more than the context.
    assert pricer.worst_case(model, 400, 100) == nano(cost(400, 100, Decimal(3), Decimal(15),
                                                            Decimal("1.10")))
    assert pricer.worst_case(model, 10**6, 100) == pricer.worst_case(model, 1000, 100)
    assert pricer.actual(model, 10, 5, "cheap") == nano(cost(10, 5, Decimal(3), Decimal(15),
                                                             Decimal("0.5")))
    assert pricer.actual(model, 10, 5, "nowhere") == nano(cost(10, 5, Decimal(3), Decimal(15)))
    budgets = (PrincipalBudget("key", 500_000_000, "day", 1, None),
               PrincipalBudget("tenant", 10**10, "month", 1, None))
    now = at(2026, 3, 10, 12)
    [key, tenant] = caps(budgets, now)
    assert (key.layer, key.limit, key.period_end_ms) == (
        Layer.KEY_BUDGET, 500_000_000, int(at(2026, 3, 11).timestamp() * 1000))
    assert tenant.period_start_ms == int(at(2026, 3, 1).timestamp() * 1000)
    message = refusal_message(Layer.KEY_BUDGET, budgets, 12 * 3600, now)
    assert "this API key's spend budget ($0.5 per day)" in message
    assert "resets at 2026-03-11T00:00:00Z" in message
    fortnight = (PrincipalBudget("environment", 3 * 10**9, "days", 14, at(2026, 3, 1).timestamp()),)
    assert "this environment's spend budget ($3 per 14 days)" in refusal_message(
        Layer.ENVIRONMENT_BUDGET, fortnight, 60, now)


def test_a_request_runs_with_what_is_left_when_that_pays_for_its_prompt_and_a_token() -> None:
    """The last requests of a period: what is left of the tightest budget is granted when it
    pays for the request's least (prompt and one output token a sequence); below that, the
    budget refuses, and the verdict names it."""
    from services.gateway.ratelimit import BudgetCap, Layer, Limits, LimitSubject
    from services.gateway.ratelimit.limits import Kind
    from services.gateway.ratelimit.planning import plan
    from services.gateway.ratelimit.verdicts import fits, money_grant, verdict

    subject = LimitSubject("k", "e", "t")
    limits = Limits(budgets=(BudgetCap(Layer.KEY_BUDGET, 1000, 10**13),
                             BudgetCap(Layer.TENANT_BUDGET, 5000, 10**13)))
    checks = plan(subject, limits, 0, 800, 100)
    money = [c for c in checks if c.kind is Kind.MONEY]
    assert [(c.amount, c.least) for c in money] == [(800, 100), (800, 100)]
    used = [0] * len(checks)
    assert money_grant(checks, used) == 800  # the worst case fits: all of it
    key_at = checks.index(money[0])
    used[key_at] = 850  # 150 left at the key, plenty at the tenant
    assert fits(money[0], 850) and money_grant(checks, used) == 150
    assert verdict(checks, used, 0).allowed
    used[key_at] = 950  # 50 left: below the least
    assert not fits(money[0], 950)
    refused = verdict(checks, used, 0)
    assert not refused.allowed and refused.layer is Layer.KEY_BUDGET
    # Without a least (an embedding: nothing to shorten), all or nothing as before.
    whole = plan(subject, limits, 0, 800)
    assert not fits(next(c for c in whole if c.kind is Kind.MONEY), 850)


def test_the_local_limiter_grants_and_settles_what_is_left_alike() -> None:
    from services.gateway.ratelimit import BudgetCap, Layer, Limits, LimitSubject
    from services.gateway.ratelimit.local_limiter import LocalRateLimiter

    local = LocalRateLimiter(clock=lambda: 1000.0)
    subject = LimitSubject("k", "e", "t")
    limits = Limits(budgets=(BudgetCap(Layer.KEY_BUDGET, 1000, 10**13),))
    first = local.decide(subject, limits, 0, 800, 100)
    second = local.decide(subject, limits, 0, 800, 100)
    assert first.reservation is not None and first.reservation.money == 800
    assert second.reservation is not None and second.reservation.money == 200
    assert not local.decide(subject, limits, 0, 800, 100).allowed
    local.settle_now(second.reservation, 0, 120)  # it cost 120: 80 back, still below 100
    assert not local.decide(subject, limits, 0, 800, 100).allowed
    local.settle_now(first.reservation, 0, 500)  # 300 back
    granted = local.decide(subject, limits, 0, 800, 100)
    assert granted.reservation is not None and granted.reservation.money == 380


def test_a_grant_below_the_worst_case_buys_the_most_tokens_it_pays_for() -> None:
    from services.gateway.models import ModelInfo
    from services.gateway.spend import Pricer

    model = ModelInfo("m", 4096, 0, Decimal("3"), Decimal("15"))
    pricer = Pricer({"eu-west-1": Decimal("1.10")})
    worst, least = pricer.bounds(model, 300, 4096 * 2, 2)
    assert worst == pricer.worst_case(model, 300, 8192)
    assert least == pricer.worst_case(model, 300, 2)  # the prompt and a token a sequence
    # Nothing to shorten (an embedding, or one token asked for): all or nothing.
    assert pricer.bounds(model, 300, 0, 1) == (pricer.worst_case(model, 300, 0),) * 2
    for granted in (least, least + 1, (least + worst) // 3, worst - 1):
        per_sequence = pricer.output_limit(model, 300, 2, granted, 4096)
        assert pricer.worst_case(model, 300, 2 * per_sequence) <= granted
        if per_sequence < 4096:  # one more token a sequence would not be paid for
            assert pricer.worst_case(model, 300, 2 * (per_sequence + 1)) > granted
    assert pricer.output_limit(model, 300, 2, least, 4096) == 1


def test_caps_are_worked_out_once_a_period() -> None:
    from services.gateway.auth import PrincipalBudget
    from services.gateway.spend import CapsCache, caps

    budgets = (PrincipalBudget("key", 10**9, "day", 1, None),
               PrincipalBudget("tenant", 10**10, "month", 1, None))
    cache = CapsCache()
    noon = at(2026, 3, 10, 12).timestamp()
    first = cache.caps(budgets, noon)
    assert first == caps(budgets, at(2026, 3, 10, 12))
    assert cache.caps(budgets, noon + 3600) is first  # the same periods: not recomputed
    tomorrow = cache.caps(budgets, at(2026, 3, 11, 0).timestamp())  # the day's ended
    assert tomorrow == caps(budgets, at(2026, 3, 11)) and tomorrow != first
    assert cache.caps(budgets, noon) == first  # a clock stepped back: worked out again
