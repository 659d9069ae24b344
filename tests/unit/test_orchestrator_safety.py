"""Guards against acting on a wrong view, and against retrying a failing launch in the same
place at once (services/orchestrator/safety.py)."""

from __future__ import annotations

import uuid

import pytest

from services.orchestrator.safety import LaunchBackoff, believable_cloud_losses


@pytest.mark.parametrize(("checked", "lost", "believed"), [
    (0, 0, True), (10, 0, True),
    (1, 1, True),    # a one-node deployment whose machine is gone: act
    (2, 1, True),    # a crash in a pair
    (2, 2, False),   # both at once: more likely a wrong look
    (3, 1, True), (3, 2, False),
    (10, 5, True), (10, 6, False), (10, 10, False),
    (100, 50, True), (100, 51, False),
])
def test_believable_cloud_losses(checked: int, lost: int, believed: bool) -> None:
    assert believable_cloud_losses(checked, lost, max_fraction=0.5) is believed


def test_the_fraction_is_the_operators() -> None:
    assert believable_cloud_losses(10, 10, max_fraction=1.0)
    assert not believable_cloud_losses(10, 2, max_fraction=0.1)
    assert believable_cloud_losses(10, 1, max_fraction=0.0)  # one at a time, always


# ----------------------------------------------------------------- launch backoff

DEP, OTHER = uuid.UUID(int=1), uuid.UUID(int=2)
EAST, WEST = "aws/us-east-1", "aws/us-west-2"


def test_a_failure_keeps_the_place_out_for_a_while() -> None:
    b = LaunchBackoff(base=10, cap=300)
    assert b.failed((DEP, EAST, True), now=100) == 10
    assert b.blocked(DEP, 100) == {(EAST, True)}
    assert b.blocked(DEP, 109.9) == {(EAST, True)}
    assert b.blocked(DEP, 110) == frozenset()


def test_failures_in_a_row_double_up_to_the_cap() -> None:
    b = LaunchBackoff(base=10, cap=300)
    delays = [b.failed((DEP, EAST, True), now=float(i)) for i in range(8)]
    assert delays == [10, 20, 40, 80, 160, 300, 300, 300]


def test_a_success_forgives() -> None:
    b = LaunchBackoff(base=10, cap=300)
    for _ in range(3):
        b.failed((DEP, EAST, True), now=0)
    b.succeeded((DEP, EAST, True))
    assert b.blocked(DEP, 0) == frozenset()
    assert b.failed((DEP, EAST, True), now=0) == 10


def test_backoff_is_per_deployment_region_and_kind() -> None:
    b = LaunchBackoff(base=10, cap=300)
    b.failed((DEP, EAST, True), now=0)
    assert b.blocked(OTHER, 0) == frozenset()
    assert (WEST, True) not in b.blocked(DEP, 0)
    assert (EAST, False) not in b.blocked(DEP, 0)


def test_gone_deployments_are_forgotten() -> None:
    b = LaunchBackoff(base=10, cap=300)
    b.failed((DEP, EAST, True), now=0)
    b.failed((OTHER, EAST, True), now=0)
    b.forget({OTHER})
    assert b.blocked(DEP, 0) == frozenset()
    assert b.blocked(OTHER, 0) == {(EAST, True)}
    assert b.failures == {(OTHER, EAST, True): 1}
