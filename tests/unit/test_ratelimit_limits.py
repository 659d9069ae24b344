"""Rate limits, the pure part: plan, windows, verdicts, headers and their formats."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from services.gateway.ratelimit.limits import (
    CONCURRENCY_RETRY_AFTER,
    DAY_MS,
    MINUTE_MS,
    UNREACHABLE,
    BudgetCap,
    Check,
    Decision,
    Kind,
    Layer,
    Limits,
    LimitSubject,
    Origin,
    reservation_for,
    window_reset_ms,
    window_start,
)
from services.gateway.ratelimit.planning import plan, prepare
from services.gateway.ratelimit.verdicts import (
    fits,
    format_reset,
    retry_after_header,
    unavailable,
    verdict,
)

SUBJECT = LimitSubject(key_id="k1", environment_id="e1", tenant_id="t1")
NONE = Limits(environment_requests_per_minute=None, tenant_requests_per_minute=None)
# 2030-01-02 03:04:05.678 UTC
NOW = int(dt.datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC).timestamp() * 1000)


def replace_limits(**given: int) -> Limits:
    """Only the given layers (the default environment and tenant limits off)."""
    return dataclasses.replace(NONE, **given)


def layers(checks: tuple[Check, ...]) -> list[Layer]:
    return [c.layer for c in checks]


# --------------------------------------------------------------------------- windows


def test_minute_windows_align_on_utc_minutes() -> None:
    start = window_start(NOW, MINUTE_MS)
    assert dt.datetime.fromtimestamp(start / 1000, dt.UTC) == \
        dt.datetime(2030, 1, 2, 3, 4, tzinfo=dt.UTC)
    assert window_reset_ms(NOW, MINUTE_MS) == 60_000 - 5_678


def test_day_windows_align_on_utc_midnight() -> None:
    start = window_start(NOW, DAY_MS)
    assert dt.datetime.fromtimestamp(start / 1000, dt.UTC) == \
        dt.datetime(2030, 1, 2, tzinfo=dt.UTC)
    assert window_reset_ms(NOW, DAY_MS) == DAY_MS - (3 * 3600 + 4 * 60 + 5) * 1000 - 678


@pytest.mark.parametrize("window", [MINUTE_MS, DAY_MS])
def test_window_boundaries(window: int) -> None:
    boundary = window_start(NOW, window) + window
    assert window_start(boundary, window) == boundary
    assert window_start(boundary - 1, window) == boundary - window
    assert window_reset_ms(boundary, window) == window  # a fresh window has it all ahead
    assert window_reset_ms(boundary - 1, window) == 1


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (-3, "0s"), (0.02, "20ms"), (0.0201, "21ms"), (0.999, "999ms"), (1, "1s"),
    (1.5, "1.5s"), (1.25, "1.25s"), (59.999, "59.999s"), (60, "1m0s"), (61.5, "1m1.5s"),
    (360, "6m0s"), (3599.001, "59m59.001s"), (3600, "1h0m0s"), (86_400, "24h0m0s"),
    (90_061, "25h1m1s"),
])
def test_format_reset_is_go_duration_at_millisecond_precision(seconds: float,
                                                              text: str) -> None:
    assert format_reset(seconds) == text


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "1"), (0.2, "1"), (1.0, "1"), (1.2, "2"), (59.5, "60"), (86_399.1, "86400"),
])
def test_retry_after_is_whole_seconds_at_least_one(seconds: float, text: str) -> None:
    assert retry_after_header(seconds) == text


# --------------------------------------------------------------------------- plan


def test_defaults_check_environment_and_tenant_only() -> None:
    checks = plan(SUBJECT, Limits(), 100)
    assert layers(checks) == [Layer.ENVIRONMENT_REQUESTS, Layer.TENANT_REQUESTS]
    assert [c.limit for c in checks] == [10_000, 50_000]
    assert [c.key for c in checks] == ["ratelimit:env:e1:minute:{t1}",
                                       "ratelimit:tenant:t1:minute:{t1}"]


def test_every_layer_with_its_reference_key_and_order() -> None:
    limits = Limits(key_requests_per_minute=1, environment_requests_per_minute=2,
                    tenant_requests_per_minute=3, global_requests_per_minute=4,
                    key_tokens_per_minute=5, key_tokens_per_day=6,
                    environment_tokens_per_minute=7, environment_tokens_per_day=8,
                    key_concurrency=9)
    checks = plan(SUBJECT, limits, 42)
    assert [(c.layer, c.key, c.limit) for c in checks] == [
        (Layer.KEY_REQUESTS, "ratelimit:key:k1:minute:{t1}", 1),
        (Layer.ENVIRONMENT_REQUESTS, "ratelimit:env:e1:minute:{t1}", 2),
        (Layer.TENANT_REQUESTS, "ratelimit:tenant:t1:minute:{t1}", 3),
        (Layer.GLOBAL_REQUESTS, "ratelimit:global:minute", 4),
        (Layer.KEY_TOKENS_MINUTE, "tokens:key:k1:minute:{t1}", 5),
        (Layer.KEY_TOKENS_DAY, "tokens:key:k1:day:{t1}", 6),
        (Layer.ENVIRONMENT_TOKENS_MINUTE, "tokens:env:e1:minute:{t1}", 7),
        (Layer.ENVIRONMENT_TOKENS_DAY, "tokens:env:e1:day:{t1}", 8),
        (Layer.KEY_CONCURRENCY, "ratelimit:key:k1:concurrency:{t1}", 9),
    ]
    assert [c.amount for c in checks] == [1, 1, 1, 1, 42, 42, 42, 42, 1]
    assert [c.window_ms for c in checks] == [MINUTE_MS] * 5 + [DAY_MS, MINUTE_MS, DAY_MS, 0]


def test_token_layers_keep_a_lease_as_the_settlement_record() -> None:
    checks = plan(SUBJECT, Limits(key_tokens_per_day=10), 3)
    lease = checks[-1]
    assert lease.kind is Kind.CONCURRENCY and lease.limit is None
    assert fits(lease, 10**9)  # never refuses


def test_no_lease_without_tokens_or_concurrency() -> None:
    assert not any(c.kind is Kind.CONCURRENCY for c in plan(SUBJECT, Limits(), 5))
    assert plan(SUBJECT, NONE, 5) == ()


def test_negative_estimates_count_as_zero() -> None:
    checks = plan(SUBJECT, Limits(key_tokens_per_minute=10), -5)
    assert checks[-2].amount == 0


def test_unreachably_huge_limits_are_no_limit() -> None:
    limits = Limits(key_requests_per_minute=UNREACHABLE, tenant_requests_per_minute=10**30,
                    environment_requests_per_minute=UNREACHABLE - 1)
    assert [(c.layer, c.limit) for c in plan(SUBJECT, limits, 1)] == \
        [(Layer.ENVIRONMENT_REQUESTS, UNREACHABLE - 1)]


def test_negative_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="key_concurrency"):
        Limits(key_concurrency=-1)


def test_reservation_records_lease_and_token_windows() -> None:
    checks = plan(SUBJECT, Limits(key_tokens_per_minute=100, environment_tokens_per_day=9), 7)
    r = reservation_for(checks, NOW, "lease-1", Origin.REDIS)
    assert r.lease_key == "ratelimit:key:k1:concurrency:{t1}" and r.lease_id == "lease-1"
    assert r.tokens == 7
    assert [(w.key, w.start_ms) for w in r.token_windows] == [
        ("tokens:key:k1:minute:{t1}", window_start(NOW, MINUTE_MS)),
        ("tokens:env:e1:day:{t1}", window_start(NOW, DAY_MS)),
    ]
    nothing = reservation_for(plan(SUBJECT, Limits(), 7), NOW, "x", Origin.REDIS)
    assert nothing.lease_key is None and nothing.lease_id == "" and nothing.token_windows == ()


# --------------------------------------------------------------------------- verdicts


def test_allowed_headers_count_this_request() -> None:
    checks = plan(SUBJECT, Limits(key_requests_per_minute=10, key_tokens_per_minute=1000), 100)
    v = verdict(checks, [3, 0, 0, 200, 0], NOW)
    assert v.allowed and v.layer is None and v.retry_after == 0
    assert v.headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "6",
        "x-ratelimit-reset-requests": "54.322s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "700",
        "x-ratelimit-reset-tokens": "54.322s",
    }


def test_refused_exactly_at_the_limit() -> None:
    checks = plan(SUBJECT, Limits(key_requests_per_minute=5), 1)
    assert verdict(checks, [4, 4, 4], NOW).allowed
    v = verdict(checks, [5, 5, 5], NOW)
    assert not v.allowed and v.layer is Layer.KEY_REQUESTS
    assert v.retry_after == pytest.approx(54.322)
    assert v.headers["x-ratelimit-scope"] == "key_requests"
    assert v.headers["Retry-After"] == "55"
    assert v.headers["x-ratelimit-remaining-requests"] == "0"
    assert v.headers["x-ratelimit-limit-requests"] == "5"


def test_limit_zero_refuses_everything_even_a_zero_token_request() -> None:
    assert not verdict(plan(SUBJECT, replace_limits(key_requests_per_minute=0), 0), [0],
                       NOW).allowed
    checks = plan(SUBJECT, replace_limits(key_tokens_per_minute=0), 0)
    v = verdict(checks, [0, 0], NOW)
    assert not v.allowed and v.layer is Layer.KEY_TOKENS_MINUTE


def test_tokens_must_fit_whole() -> None:
    checks = plan(SUBJECT, replace_limits(key_tokens_per_minute=1000), 300)
    assert verdict(checks, [700, 0], NOW).allowed
    v = verdict(checks, [701, 0], NOW)
    assert v.layer is Layer.KEY_TOKENS_MINUTE
    assert v.headers["x-ratelimit-remaining-tokens"] == "299"


def test_the_layer_that_frees_last_is_named() -> None:
    checks = plan(SUBJECT, replace_limits(key_tokens_per_minute=100, key_tokens_per_day=100,
                                          key_concurrency=1), 10)
    v = verdict(checks, [100, 100, 1], NOW)
    assert v.layer is Layer.KEY_TOKENS_DAY
    assert v.headers["x-ratelimit-reset-tokens"] == format_reset(v.retry_after)
    v = verdict(checks, [0, 0, 1], NOW)
    assert v.layer is Layer.KEY_CONCURRENCY and v.retry_after == CONCURRENCY_RETRY_AFTER
    assert v.headers["Retry-After"] == "1"


def test_ties_go_to_the_plan_order() -> None:
    checks = plan(SUBJECT, replace_limits(key_requests_per_minute=1,
                                          tenant_requests_per_minute=1), 1)
    assert verdict(checks, [1, 1], NOW).layer is Layer.KEY_REQUESTS


def test_headers_describe_the_most_constraining_layer_of_each_kind() -> None:
    checks = plan(SUBJECT, Limits(key_requests_per_minute=100, key_tokens_per_minute=1000,
                                  key_tokens_per_day=5000), 10)
    # env has 10_000 - 9_995 - 1 = 4 left, fewer than the key's 100 - 1 - 1 = 98.
    v = verdict(checks, [1, 9_995, 0, 0, 4_900, 0], NOW)
    assert v.headers["x-ratelimit-limit-requests"] == "10000"
    assert v.headers["x-ratelimit-remaining-requests"] == "4"
    assert v.headers["x-ratelimit-limit-tokens"] == "5000"
    assert v.headers["x-ratelimit-remaining-tokens"] == "90"


def test_equal_remaining_prefers_the_longer_window() -> None:
    checks = plan(SUBJECT, replace_limits(key_tokens_per_minute=100, key_tokens_per_day=100), 10)
    v = verdict(checks, [50, 50, 0], NOW)
    assert v.headers["x-ratelimit-reset-tokens"] == format_reset(
        window_reset_ms(NOW, DAY_MS) / 1000)


def test_refusing_layer_wins_the_headers_even_when_another_has_less_left() -> None:
    # Both token windows refuse 300 tokens; the day is named (it frees last), so the token
    # headers describe the day although the minute has fewer left.
    checks = plan(SUBJECT, replace_limits(key_tokens_per_minute=1000,
                                          key_tokens_per_day=10_000), 300)
    v = verdict(checks, [800, 9_750, 0], NOW)
    assert v.layer is Layer.KEY_TOKENS_DAY
    assert v.headers["x-ratelimit-limit-tokens"] == "10000"
    assert v.headers["x-ratelimit-remaining-tokens"] == "250"


def test_a_request_layer_refusal_still_reports_tokens() -> None:
    checks = plan(SUBJECT, replace_limits(key_requests_per_minute=2,
                                          environment_tokens_per_minute=10_000), 300)
    v = verdict(checks, [2, 0, 0], NOW)
    assert v.layer is Layer.KEY_REQUESTS
    assert v.headers["x-ratelimit-remaining-requests"] == "0"
    assert v.headers["x-ratelimit-remaining-tokens"] == "10000"  # nothing reserved


def test_no_request_headers_without_request_layers() -> None:
    v = verdict(plan(SUBJECT, replace_limits(key_tokens_per_minute=5), 1), [0, 0], NOW)
    assert set(v.headers) == {"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                              "x-ratelimit-reset-tokens"}
    assert verdict((), [], NOW).headers == {}


def test_committed_comes_from_the_store() -> None:
    checks = plan(SUBJECT, replace_limits(key_requests_per_minute=5), 1)
    v = verdict(checks, [5], NOW, committed=False)
    assert not v.allowed and v.layer is Layer.KEY_REQUESTS
    with pytest.raises(ValueError, match="one usage"):
        verdict(checks, [], NOW)


def test_unavailable_is_a_503() -> None:
    v = unavailable(0.5)
    assert v.layer is Layer.UNAVAILABLE and v.headers["Retry-After"] == "1"
    d = Decision(allowed=False, layer=v.layer, retry_after=v.retry_after, headers=v.headers,
                 reservation=None, degraded=True)
    assert d.status == 503
    assert Decision(allowed=False, layer=Layer.KEY_REQUESTS, retry_after=1, headers={},
                    reservation=None, degraded=False).status == 429


def test_plan_cache_gives_the_same_checks_as_plan() -> None:
    from services.gateway.ratelimit.planning import PlanCache, plan

    subject = LimitSubject("k", "e", "t")
    limits = Limits(key_requests_per_minute=5, key_tokens_per_minute=100,
                    environment_tokens_per_day=1000, key_concurrency=2)
    cache = PlanCache(capacity=2)
    for tokens in (0, 7, 7, 300, -3):
        assert cache.plan(subject, limits, tokens) == plan(subject, limits, tokens)
    other = LimitSubject("k2", "e", "t")
    for s in (other, LimitSubject("k3", "e", "t"), subject):  # past capacity: still right
        assert cache.plan(s, limits, 9) == plan(s, limits, 9)
    prepared = cache.prepared(subject, limits, 7)
    assert prepared is cache.prepared(subject, limits, 7)  # built once
    assert prepared.keys == tuple(c.key for c in plan(subject, limits, 7))
    words = prepared.spec.split(" ")
    assert words[:4] == ["r", "5", "60000", "1"]  # the key's requests first
    assert [words[i:i + 4] for i in range(0, len(words), 4)
            if words[i] == "t"] == [["t", "100", "60000", "7"], ["t", "1000", "86400000", "7"]]
    assert words[-4:] == ["c", "2", "0", "1"]
    assert prepared.lease


def test_with_slices_only_a_budget_is_counted_per_request() -> None:
    subject = LimitSubject("k1", "e1", "t1")
    every = Limits(key_requests_per_minute=1, environment_requests_per_minute=2,
                   tenant_requests_per_minute=3, global_requests_per_minute=4,
                   key_tokens_per_minute=5, key_tokens_per_day=6,
                   environment_tokens_per_minute=7, environment_tokens_per_day=8,
                   key_concurrency=9)
    checks = plan(subject, every, 10)
    counted = prepare(checks)
    assert counted.lease and not counted.sliced_at and len(counted.keys) == len(checks) - 1
    sliced = prepare(checks, slices=True)
    assert not sliced.keys and not sliced.lease  # no script, no lease per request
    assert {c.layer for c in sliced.sliced} == {c.layer for c in checks} - {
        Layer.GLOBAL_REQUESTS}
    # Tokens without a concurrency limit: no lease either (they settle into the slices).
    tokens_only = prepare(plan(subject, Limits(key_tokens_per_minute=5), 10), slices=True)
    assert not tokens_only.keys and not tokens_only.lease
    # A budget: its lease holds the money, and counts the request's concurrency too.
    budgeted = dataclasses.replace(every, budgets=(
        BudgetCap(Layer.KEY_BUDGET, 10**9, 1_800_000_000_000),))
    with_money = prepare(plan(subject, budgeted, 10, 100), slices=True)
    assert {c.layer for c in with_money.counted} == {Layer.KEY_CONCURRENCY, Layer.KEY_BUDGET}
    assert with_money.lease
