"""What follows an attempt: retry when, pace how, give up, disable; reading 429s."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from services.domain.notifications.targets import Kind
from services.notifier.app import rules_of
from services.notifier.policy import (
    AttemptResult,
    Outcome,
    Rules,
    Schedule,
    bucket_pause,
    classify,
    decide,
    retry_after_of,
)
from services.notifier.settings import (
    SVIX_SCHEDULE,
    NotifierSettings,
    check_settings,
    parse_schedule,
)

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
SVIX = Schedule(parse_schedule(SVIX_SCHEDULE))
RULES = Rules(SVIX, min_interval=1.0, disable_after=5 * 86400, max_retry_after=3600)


def result(status: int | None, **kwargs: object) -> AttemptResult:
    return AttemptResult(status, 12.0, **kwargs)  # type: ignore[arg-type]


def test_the_default_schedule_is_svix() -> None:
    assert SVIX.delays == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    assert SVIX.first == 0
    assert [SVIX.after_failures(n) for n in range(1, 9)] == \
        [5, 300, 1800, 7200, 18000, 36000, 36000, None]
    with pytest.raises(ValueError, match="at least one"):
        Schedule(())


@pytest.mark.parametrize(("status", "kwargs", "outcome"), [
    (200, {}, Outcome.DELIVERED), (204, {}, Outcome.DELIVERED),
    (429, {}, Outcome.RATE_LIMITED), (404, {}, Outcome.GONE), (410, {}, Outcome.GONE),
    (500, {}, Outcome.FAILED), (400, {}, Outcome.FAILED), (401, {}, Outcome.FAILED),
    (301, {}, Outcome.FAILED), (None, {}, Outcome.FAILED),
    (None, {"refused": True}, Outcome.REFUSED), (550, {"permanent": True}, Outcome.GONE),
    (250, {"delivered": True}, Outcome.DELIVERED), (302, {}, Outcome.FAILED),
])
def test_classify(status: int | None, kwargs: dict[str, object], outcome: Outcome) -> None:
    assert classify(result(status, **kwargs)) is outcome


def test_delivered_stops_the_failure_clock_and_paces_the_endpoint() -> None:
    d = decide(result(204), failures=2, failing_since=NOW - timedelta(hours=1), now=NOW,
               rules=RULES)
    assert (d.status, d.failures, d.failing_since, d.next_attempt_in) == \
        ("delivered", 2, None, None)
    assert d.next_send_in == 1.0
    paused = decide(result(204, pause=7.5), failures=0, failing_since=None, now=NOW,
                    rules=RULES)
    assert paused.next_send_in == 7.5  # Discord's bucket is empty: wait for its reset


def test_failures_follow_the_schedule_then_exhaust() -> None:
    failing_since = None
    waits = []
    for failures in range(8):
        d = decide(result(503), failures=failures, failing_since=failing_since, now=NOW,
                   rules=RULES)
        failing_since = d.failing_since
        waits.append(d.next_attempt_in)
        assert d.failures == failures + 1
    assert waits == [5, 300, 1800, 7200, 18000, 36000, 36000, None]
    assert d.status == "failed" and d.exhausted and d.disable_reason is None
    assert failing_since == NOW


def test_429_waits_as_asked_without_moving_along_the_schedule() -> None:
    d = decide(result(429, retry_after=2.5), failures=3, failing_since=None, now=NOW,
               rules=RULES)
    assert (d.outcome, d.status, d.failures, d.next_attempt_in, d.next_send_in) == \
        (Outcome.RATE_LIMITED, "pending", 3, 2.5, 2.5)
    assert d.failing_since is None
    capped = decide(result(429, retry_after=86400), failures=0, failing_since=None, now=NOW,
                    rules=RULES)
    assert capped.next_attempt_in == 3600
    unsaid = decide(result(429), failures=0, failing_since=None, now=NOW, rules=RULES)
    assert unsaid.next_attempt_in == 1.0


def test_gone_disables_at_once() -> None:
    d = decide(result(404), failures=0, failing_since=None, now=NOW, rules=RULES)
    assert (d.status, d.exhausted) == ("failed", False)
    assert d.disable_reason is not None and "404" in d.disable_reason
    mailbox = decide(result(550, permanent=True, error="no such user"), failures=0,
                     failing_since=None, now=NOW, rules=RULES)
    assert mailbox.disable_reason is not None and "550" in mailbox.disable_reason


def test_failing_for_too_long_disables() -> None:
    since = NOW - timedelta(days=5)
    d = decide(result(500), failures=0, failing_since=since, now=NOW, rules=RULES)
    assert d.status == "failed" and d.disable_reason is not None
    assert "failing without a success since 2025-12-27T12:00:00+00:00" in d.disable_reason
    almost = decide(result(500), failures=0, failing_since=since + timedelta(seconds=1),
                    now=NOW, rules=RULES)
    assert almost.status == "pending" and almost.disable_reason is None


def test_refused_counts_as_a_failure() -> None:
    d = decide(result(None, refused=True, error="refused: private"), failures=0,
               failing_since=None, now=NOW, rules=RULES)
    assert (d.outcome, d.status, d.failures, d.next_attempt_in) == \
        (Outcome.REFUSED, "pending", 1, 5)


def test_retry_after_from_discord_body_header_seconds_and_http_date() -> None:
    assert retry_after_of({"Retry-After": "2"}, b'{"retry_after": 0.456, "global": false}',
                          NOW) == 0.456
    assert retry_after_of({"retry-after": "7"}, b"slow down", NOW) == 7.0
    later = format_datetime(NOW + timedelta(seconds=30), usegmt=True)
    assert retry_after_of({"Retry-After": later}, b"", NOW) == 30.0
    assert retry_after_of({"Retry-After": "soon"}, b"", NOW) is None
    assert retry_after_of({}, b'{"retry_after": "x"}', NOW) is None
    assert retry_after_of({}, b"{not json", NOW) is None
    assert retry_after_of({"Retry-After": "-5"}, b"", NOW) == 0.0


def test_bucket_pause() -> None:
    assert bucket_pause({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset-After": "1.5"}) == 1.5
    assert bucket_pause({"x-ratelimit-remaining": "3", "x-ratelimit-reset-after": "1.5"}) \
        is None
    assert bucket_pause({"X-RateLimit-Remaining": "0"}) is None
    assert bucket_pause({"X-RateLimit-Remaining": "?", "X-RateLimit-Reset-After": "1"}) is None


def test_settings() -> None:
    assert parse_schedule("0, 0.05 ,0.1") == (0.0, 0.05, 0.1)
    for bad in ("", "a,b", "1,-1"):
        with pytest.raises(ValueError, match="RETRY_SCHEDULE"):
            parse_schedule(bad)
    check_settings(NotifierSettings())
    with pytest.raises(ValueError, match="LEASE_SECONDS"):
        check_settings(NotifierSettings(lease_seconds=5))
    with pytest.raises(ValueError, match="SMTP_SECURITY"):
        check_settings(NotifierSettings(smtp_security="ssl"))
    rules = rules_of(NotifierSettings(min_interval_slack=1.0, min_interval_discord=2.0))
    assert (rules[Kind.SLACK].min_interval, rules[Kind.DISCORD].min_interval) == (1.0, 2.0)
    assert rules[Kind.EMAIL].schedule == SVIX
