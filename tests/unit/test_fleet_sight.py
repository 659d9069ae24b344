"""When the monitor may call a silent node stale (services/monitor/sight.py)."""

from __future__ import annotations

import pytest

from services.monitor.sight import in_grace, watching_since

BLIND = 10.0
STALE = 60.0
NOW = 1_000_000.0


def since(*, last_watch: float | None, kept: float | None, connected: bool = True) -> float:
    return watching_since(NOW, last_watch=last_watch, since=kept, connected=connected,
                          blind_after=BLIND)


def test_steady_sweeps_keep_watching() -> None:
    assert since(last_watch=NOW - 1, kept=NOW - 3600) == NOW - 3600


def test_a_gap_at_the_limit_is_not_blindness() -> None:
    assert since(last_watch=NOW - BLIND, kept=NOW - 3600) == NOW - 3600


def test_no_sweep_for_longer_than_blind_after_starts_watching_afresh() -> None:
    # Every monitor was down (or a failover took long): silence only counts from now.
    assert since(last_watch=NOW - BLIND - 0.001, kept=NOW - 3600) == NOW


def test_nats_down_is_blindness_however_recent_the_sweep() -> None:
    assert since(last_watch=NOW - 1, kept=NOW - 3600, connected=False) == NOW


@pytest.mark.parametrize(("last_watch", "kept"), [(None, None), (NOW - 1, None),
                                                  (None, NOW - 3600)])
def test_first_start_watches_from_now(last_watch: float | None, kept: float | None) -> None:
    assert since(last_watch=last_watch, kept=kept) == NOW


def test_a_kept_value_from_a_clock_ahead_is_clamped() -> None:
    assert since(last_watch=NOW - 1, kept=NOW + 5) == NOW


def test_grace_lasts_one_whole_staleness_window() -> None:
    assert in_grace(NOW, NOW, STALE)
    assert in_grace(NOW + STALE - 0.001, NOW, STALE)
    assert not in_grace(NOW + STALE, NOW, STALE)
    assert not in_grace(NOW, NOW - 3600, STALE)


def test_an_outage_longer_than_the_window_declares_nothing_until_heard_again() -> None:
    # NATS down for 5 minutes with sweeps every second: each sweep restarts watching, so
    # nothing is in a position to go stale; once it is back, a full window first.
    kept: float | None = NOW - 3600
    t = NOW
    for _ in range(300):
        kept = watching_since(t, last_watch=t - 1, since=kept, connected=False,
                              blind_after=BLIND)
        assert in_grace(t, kept, STALE)
        t += 1
    last_blind = t - 1  # the last sweep that found NATS down
    while t < last_blind + STALE:
        kept = watching_since(t, last_watch=t - 1, since=kept, connected=True,
                              blind_after=BLIND)
        assert in_grace(t, kept, STALE)
        t += 1
    kept = watching_since(t, last_watch=t - 1, since=kept, connected=True, blind_after=BLIND)
    assert not in_grace(t, kept, STALE)
