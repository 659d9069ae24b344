"""The monitor's judgements (issue 18: decisions out of its I/O loops). Pure."""

from __future__ import annotations

import uuid

from schemas.events import NodeHeartbeat
from services.domain.node_states import HealthRule, Signal
from services.monitor.verdicts import ProbeCounts, heartbeat_verdict

RULE = HealthRule()


def beat(**fields: object) -> NodeHeartbeat:
    base: dict[str, object] = dict(node_id=uuid.uuid4(), health_score=90, vllm_healthy=True,
                                   model_name="m", draining=False, sequence=1)
    return NodeHeartbeat(**{**base, **fields})  # type: ignore[arg-type]


def test_a_heartbeat_says_draining_then_probes_then_health() -> None:
    assert heartbeat_verdict(beat(draining=True), True, RULE) == (Signal.DRAINING, "draining")
    assert heartbeat_verdict(beat(), True, RULE) == (Signal.UNHEALTHY, "health probes failing")
    assert heartbeat_verdict(beat(), False, RULE) == (Signal.HEALTHY, "healthy heartbeat")
    signal, reason = heartbeat_verdict(beat(vllm_healthy=False, health_score=10), False, RULE)
    assert signal is Signal.UNHEALTHY and reason == "unhealthy heartbeat (vllm down, score 10)"


def test_failed_probes_in_a_row_cross_once_and_a_pass_clears() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    probes = ProbeCounts(threshold=3)
    assert probes.round({a: False, b: True}).failing == {}
    assert probes.round({a: False, b: True}).crossed == []
    third = probes.round({a: False, b: True})
    assert (third.failing, third.crossed, third.passed) == ({a: 3}, [(a, 3)], [b])
    fourth = probes.round({a: False})  # b was not probed: forgotten
    assert (fourth.failing, fourth.crossed) == ({a: 4}, [])  # refreshed, not crossed again
    assert probes.count(b) == 0
    assert probes.round({a: True}).passed == [a] and probes.count(a) == 0
