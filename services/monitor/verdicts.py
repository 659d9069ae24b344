"""The monitor's judgements, out of its I/O loops. Pure.

- `heartbeat_verdict`: what a heartbeat says of its node (draining, unhealthy because probes
  fail, or what its health says by the rule), and the reason recorded with a change.
- `ProbeCounts`: failed health probes in a row per node; a node crosses into unhealthy on the
  `threshold`-th, and a passing probe clears it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from schemas.events import NodeHeartbeat
from services.domain.node_states import HealthRule, Signal


def heartbeat_verdict(event: NodeHeartbeat, probe_failing: bool,
                      rule: HealthRule) -> tuple[Signal, str]:
    if event.draining:
        return Signal.DRAINING, "draining"
    if probe_failing:
        # The node says it is fine but we cannot reach it: the probes win until they pass.
        return Signal.UNHEALTHY, "health probes failing"
    signal = rule.signal(event.vllm_healthy, event.health_score)
    if signal is Signal.HEALTHY:
        return signal, "healthy heartbeat"
    return signal, (f"unhealthy heartbeat (vllm {'up' if event.vllm_healthy else 'down'}, "
                    f"score {event.health_score})")


@dataclass(frozen=True)
class ProbeRound:
    passed: list[uuid.UUID] = field(default_factory=list)
    """Their flag goes: heartbeats decide again."""
    failing: dict[uuid.UUID, int] = field(default_factory=dict)
    """At or past the threshold: flagged (refreshed), with their count."""
    crossed: list[tuple[uuid.UUID, int]] = field(default_factory=list)
    """Reached the threshold this round: signalled unhealthy now."""


class ProbeCounts:
    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._failures: dict[uuid.UUID, int] = {}

    def count(self, node: uuid.UUID) -> int:
        return self._failures.get(node, 0)

    def forget(self, node: uuid.UUID) -> None:
        self._failures.pop(node, None)

    def round(self, results: Mapping[uuid.UUID, bool]) -> ProbeRound:
        """One round of probes (node → passed); nodes not probed are forgotten."""
        for gone in self._failures.keys() - results.keys():
            del self._failures[gone]
        out = ProbeRound()
        for node, ok in results.items():
            if ok:
                self._failures.pop(node, None)
                out.passed.append(node)
                continue
            failures = self._failures[node] = self._failures.get(node, 0) + 1
            if failures >= self.threshold:
                out.failing[node] = failures
                if failures == self.threshold:
                    out.crossed.append((node, failures))
        return out
