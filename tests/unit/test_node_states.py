"""The node state machine, exhaustively."""

from __future__ import annotations

import itertools

import pytest

from schemas.events import NodeStatus as S
from services.domain.node_states import ALIVE, FINAL, HealthRule, Signal, transition

STATES: list[S | None] = [None, *S]

# (from, signal) -> to, for every change the machine makes; every other pair changes nothing.
EXPECTED: dict[tuple[S | None, Signal], S] = {
    (None, Signal.LAUNCHED): S.LAUNCHING,
    (None, Signal.REGISTERED): S.REGISTERED,
    (S.LAUNCHING, Signal.REGISTERED): S.REGISTERED,
    (S.REGISTERED, Signal.HEALTHY): S.ACTIVE,
    (S.ACTIVE, Signal.UNHEALTHY): S.UNHEALTHY,
    (S.UNHEALTHY, Signal.HEALTHY): S.ACTIVE,
    (S.STALE, Signal.HEALTHY): S.ACTIVE,
    (S.STALE, Signal.UNHEALTHY): S.UNHEALTHY,
    (S.LAUNCHING, Signal.SILENT): S.STALE,
    (S.REGISTERED, Signal.SILENT): S.STALE,
    (S.ACTIVE, Signal.SILENT): S.STALE,
    (S.UNHEALTHY, Signal.SILENT): S.STALE,
    (S.DRAINING, Signal.CLOUD_LOST): S.TERMINATED,
    (S.DRAINING, Signal.GONE): S.TERMINATED,
}
for _s in (None, S.LAUNCHING, S.REGISTERED, S.ACTIVE, S.UNHEALTHY, S.STALE):
    EXPECTED[(_s, Signal.DRAINING)] = S.DRAINING
    EXPECTED[(_s, Signal.CLOUD_LOST)] = S.FAILED
    EXPECTED[(_s, Signal.GONE)] = S.TERMINATED


@pytest.mark.parametrize(("status", "signal"), list(itertools.product(STATES, Signal)))
def test_every_pair(status: S | None, signal: Signal) -> None:
    assert transition(status, signal) == EXPECTED.get((status, signal))


def test_final_states_are_final() -> None:
    for status, signal in itertools.product(FINAL, Signal):
        assert transition(status, signal) is None


def test_draining_never_serves_again() -> None:
    reachable = {transition(S.DRAINING, s) for s in Signal} - {None}
    assert reachable == {S.TERMINATED}


def test_only_healthy_heartbeats_make_a_node_active() -> None:
    for (status, signal), after in EXPECTED.items():
        if after == S.ACTIVE:
            assert signal is Signal.HEALTHY, status


def test_every_alive_status_can_end() -> None:
    for status in ALIVE:
        assert transition(status, Signal.GONE) == S.TERMINATED
        assert transition(status, Signal.DRAINING) == S.DRAINING


def test_health_rule() -> None:
    rule = HealthRule(threshold=50)
    assert rule.signal(True, 50) is Signal.HEALTHY
    assert rule.signal(True, 49) is Signal.UNHEALTHY
    assert rule.signal(False, 100) is Signal.UNHEALTHY
