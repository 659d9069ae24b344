"""Which NATS errors are the servers refusing a credential (given up on after a few in a row)
and which are NATS being away (waited out for ever)."""

from __future__ import annotations

import pytest

from services.infra.nats_connection import REFUSALS_BEFORE_GIVING_UP, RefusalStreak, auth_refusal


@pytest.mark.parametrize("error", [
    "nats: 'Authorization Violation'",            # CONNECT refused: none, forged, expired, revoked
    "nats: user authentication expired",          # a live connection's JWT expired
    "nats: user authentication revoked",          # a live connection revoked
    "nats: 'Account Authentication Expired'",
    "nats: credentials revoked",
    "nats: authorization failed",                 # nats-py's AuthorizationError
])
def test_the_servers_refusing_the_credential_is_a_refusal(error: str) -> None:
    assert auth_refusal(error)


@pytest.mark.parametrize("error", [
    "[Errno 111] Connect call failed ('127.0.0.1', 4222)",
    "ConnectionRefusedError",
    "TimeoutError",
    "nats: timeout",
    "nats: unexpected EOF",
    "nats: stale connection",
    "nats: 'Authentication Timeout'",             # a slow client on a busy machine: try again
    "nats: Permissions Violation for Publish to \"usage.recorded.t\"",  # a subject, not us
    "nats: no servers available for connection",
    "nats://nats:4222 answered without TLS: not signing in",
])
def test_nats_being_away_is_not_a_refusal(error: str) -> None:
    assert not auth_refusal(error)


def test_a_streak_gives_up_after_refusals_in_a_row_and_a_connection_resets_it() -> None:
    streak = RefusalStreak(3)
    assert not streak.failed("nats: 'Authorization Violation'")
    assert not streak.failed("[Errno 111] Connect call failed")  # neither counts nor resets
    assert not streak.failed("nats: 'Authorization Violation'")
    assert streak.failed("nats: 'Authorization Violation'")
    assert streak.count == 3
    streak.connected()
    assert streak.count == 0
    for _ in range(100):  # NATS away for ever: never given up on
        assert not streak.failed("TimeoutError")
    assert RefusalStreak().limit == REFUSALS_BEFORE_GIVING_UP >= 2
