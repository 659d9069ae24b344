"""Failed authentications per client network (pure), and /v1/usage's own limits: its plan and
its cap on reports in flight."""

from __future__ import annotations

import pytest

from services.gateway.ratelimit.auth_failures import (
    Cached,
    FailureLedger,
    FailureLimit,
    FailureVerdict,
    LookupVerdict,
    counts_as_failure,
    judge,
    judge_lookup,
    network_of,
    redis_key,
)
from services.gateway.ratelimit.in_flight import InFlight
from services.gateway.ratelimit.limits import MINUTE_MS, Kind, Layer, Limits, LimitSubject
from services.gateway.ratelimit.local_limiter import LocalRateLimiter
from services.gateway.ratelimit.planning import plan, usage_plan
from services.gateway.ratelimit.verdicts import verdict

LIMIT = FailureLimit(failures=3, window=60.0)


@pytest.mark.parametrize(("ip", "network"), [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:198.51.100.4", "198.51.100.4"),
    ("unknown", "unknown"),
    ("not:an:address", "not:an:address"),
])
def test_failures_count_against_an_ipv4_address_or_an_ipv6_64(ip: str, network: str) -> None:
    assert network_of(ip) == network
    assert redis_key(network) == f"authfail:{network}"


def test_the_first_failures_keep_their_error_then_the_network_is_refused() -> None:
    assert judge(1, 50.0, LIMIT) == FailureVerdict(throttled=False, block_for=0.0)
    assert judge(2, 50.0, LIMIT) == FailureVerdict(throttled=False, block_for=0.0)
    # The failure reaching the limit is still answered 401, and starts the block.
    assert judge(3, 50.0, LIMIT) == FailureVerdict(throttled=False, block_for=50.0)
    assert judge(4, 20.0, LIMIT) == FailureVerdict(throttled=True, block_for=20.0)


def test_a_zero_limit_turns_throttling_off() -> None:
    off = FailureLimit(failures=0)
    assert not off.enabled
    assert judge(10_000, 30.0, off) == FailureVerdict(throttled=False, block_for=0.0)


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="failures must be >= 0"):
        FailureLimit(failures=-1)
    with pytest.raises(ValueError, match="window > 0"):
        FailureLimit(window=0)
    assert FailureLimit(window=0.0001).window_ms == 1


@pytest.mark.parametrize(("status", "reason", "counts"), [
    (401, "invalid", True),  # a wrong key: what a guess looks like
    (401, "malformed", True),
    (401, "revoked", True),  # a dead key replayed
    (401, "expired", True),
    (401, "missing", False),  # no credential at all: a misconfigured client, not a guess
    (403, "tenant_suspended", False),  # a real key
    (403, "environment_suspended", False),
])
def test_which_failures_count_against_a_network(status: int, reason: str,
                                                counts: bool) -> None:
    assert counts_as_failure(status, reason) is counts


def test_a_network_under_its_limit_has_every_key_looked_up() -> None:
    for cached in Cached:
        assert judge_lookup(cached, 0, -2.0, 0.0, LIMIT) == LookupVerdict(0.0, 0.0)
        assert judge_lookup(cached, 2, 30.0, 0.0, LIMIT) == LookupVerdict(0.0, 0.0)


@pytest.mark.parametrize("cached", [Cached.NOTHING, Cached.UNKNOWN, Cached.CHANGING])
def test_a_throttled_network_waits_unless_the_key_is_cached_good(cached: Cached) -> None:
    # Over the shared limit: refused for what is left of the window, and remembered.
    assert judge_lookup(cached, 3, 42.0, 0.0, LIMIT) == LookupVerdict(42.0, 42.0)
    assert judge_lookup(cached, 50, 42.0, 0.0, LIMIT) == LookupVerdict(42.0, 42.0)
    # A counter without an expiry (never left by our writes): a whole window.
    assert judge_lookup(cached, 3, -1.0, 0.0, LIMIT) == LookupVerdict(60.0, 60.0)
    # This process's own block (Redis down, or behind): it decides alone.
    assert judge_lookup(cached, 0, -2.0, 17.0, LIMIT) == LookupVerdict(17.0, 0.0)
    assert judge_lookup(cached, 3, 10.0, 17.0, LIMIT) == LookupVerdict(17.0, 10.0)


def test_a_key_cached_as_a_principal_passes_a_throttled_network() -> None:
    """On every gateway, whether or not that process saw the key succeed: a neighbour behind
    the same NAT cannot lock a tenant out. The network stays refused for everything else."""
    assert judge_lookup(Cached.PRINCIPAL, 3, 42.0, 0.0, LIMIT) == LookupVerdict(0.0, 42.0)
    assert judge_lookup(Cached.PRINCIPAL, 0, -2.0, 17.0, LIMIT) == LookupVerdict(0.0, 0.0)
    assert judge_lookup(Cached.PRINCIPAL, 99, 5.0, 17.0, LIMIT) == LookupVerdict(0.0, 5.0)


def test_no_throttle_when_it_is_off() -> None:
    off = FailureLimit(failures=0)
    for cached in Cached:
        assert judge_lookup(cached, 10_000, 30.0, 12.0, off) == LookupVerdict(0.0, 0.0)


def test_the_ledger_counts_in_windows_opened_by_the_first_failure() -> None:
    ledger = FailureLedger(LIMIT)
    assert ledger.fail("a", 100.0) == (1, 60.0)
    assert ledger.fail("a", 130.0) == (2, 30.0)
    assert ledger.fail("b", 130.0) == (1, 60.0)  # networks are apart
    assert ledger.fail("a", 159.0) == (3, 1.0)
    assert ledger.fail("a", 160.0) == (1, 60.0)  # a new window


def test_blocks_last_their_time_and_only_grow() -> None:
    ledger = FailureLedger(LIMIT)
    assert ledger.blocked_for("a", 0.0) == 0.0
    ledger.block("a", 30.0, 100.0)
    assert ledger.blocked_for("a", 110.0) == 20.0
    ledger.block("a", 5.0, 110.0)  # a shorter block never shortens one in force
    assert ledger.blocked_for("a", 120.0) == 10.0
    ledger.block("a", 0.0, 120.0)
    assert ledger.blocked_for("a", 130.0) == 0.0
    assert ledger.blocked_for("b", 110.0) == 0.0


def test_the_ledger_is_bounded_and_forgets_the_expired_first() -> None:
    ledger = FailureLedger(LIMIT, capacity=3)
    for i in range(3):
        ledger.fail(f"old{i}", 0.0)
        ledger.block(f"old{i}", 10.0, 0.0)
    ledger.fail("kept", 100.0)
    ledger.block("kept", 10.0, 100.0)
    for i in range(5):
        ledger.fail(f"new{i}", 100.0)
        ledger.block(f"new{i}", 10.0, 100.0)
    assert len(ledger) == 6
    assert ledger.blocked_for("new4", 101.0) > 0
    assert ledger.blocked_for("old0", 101.0) == 0.0


# --------------------------------------------------------------------------- usage's own limit

SUBJECT = LimitSubject("k1", "e1", "t1")


def test_usage_has_its_own_counter_per_key() -> None:
    (check,) = usage_plan(SUBJECT, 60)
    assert check.layer is Layer.KEY_USAGE_REQUESTS and check.kind is Kind.REQUESTS
    assert (check.limit, check.window_ms, check.amount) == (60, MINUTE_MS, 1)
    assert check.key == "ratelimit:usage:key:k1:minute:{t1}"
    inference = plan(SUBJECT, Limits(key_requests_per_minute=60), 0)
    assert check.key not in {c.key for c in inference}
    assert usage_plan(SUBJECT, None) == ()


def test_usage_refusals_name_their_layer() -> None:
    checks = usage_plan(SUBJECT, 2)
    now = 1_700_000_000_000
    assert verdict(checks, [1], now).allowed
    refused = verdict(checks, [2], now)
    assert not refused.allowed and refused.layer is Layer.KEY_USAGE_REQUESTS
    assert refused.headers["x-ratelimit-scope"] == "key_usage_requests"
    assert int(refused.headers["Retry-After"]) >= 1


def test_the_local_fallback_counts_usage_apart_from_inference() -> None:
    local = LocalRateLimiter(clock=lambda: 1_700_000_000.0)
    checks = usage_plan(SUBJECT, 2)
    assert [local.decide_checks(checks).allowed for _ in range(3)] == [True, True, False]
    assert local.decide(SUBJECT, Limits(key_requests_per_minute=1), 0).allowed


def test_usage_reports_in_flight_are_capped_per_process() -> None:
    reports = InFlight(2, Layer.USAGE_REPORTS_IN_FLIGHT)
    assert [reports.enter() for _ in range(3)] == [True, True, False]
    assert reports.running == 2  # the refused one took nothing
    reports.leave()
    assert reports.enter() and not reports.enter()
    reports.leave()
    reports.leave()
    assert reports.running == 0
    with pytest.raises(RuntimeError, match="without a matching enter"):
        reports.leave()


def test_a_report_turned_away_is_a_429_with_retry_after() -> None:
    refused = InFlight(1, Layer.USAGE_REPORTS_IN_FLIGHT, retry_after=1.5).refusal()
    assert not refused.allowed and refused.status == 429 and refused.reservation is None
    assert refused.layer is Layer.USAGE_REPORTS_IN_FLIGHT
    assert refused.headers == {"Retry-After": "2",
                               "x-ratelimit-scope": "usage_reports_in_flight"}


def test_no_cap_on_reports_when_it_is_zero() -> None:
    unlimited = InFlight(0, Layer.USAGE_REPORTS_IN_FLIGHT)
    assert all(unlimited.enter() for _ in range(1000))
    with pytest.raises(ValueError, match="limit must be >= 0"):
        InFlight(-1, Layer.USAGE_REPORTS_IN_FLIGHT)
