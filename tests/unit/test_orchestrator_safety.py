"""Guards against acting on a wrong view (services/orchestrator/safety.py)."""

from __future__ import annotations

import pytest

from services.orchestrator.safety import believable_cloud_losses


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
