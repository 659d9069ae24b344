"""A GPU node's life as a pure state machine, shared by the monitor (heartbeats, staleness,
probes) and the orchestrator (launches, the cloud's view, terminations).

    launching → registered → active ⇄ unhealthy → draining → terminated
                                   ↘ stale (silent)     ↘ failed (the cloud lost it)

`transition(status, signal)` gives the next status, or None when the signal changes nothing.
Terminated and failed are final. A draining node never serves again: only its end follows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from schemas.events import NodeStatus


class Signal(enum.StrEnum):
    LAUNCHED = "launched"
    """The orchestrator asked the cloud for the node."""
    REGISTERED = "registered"
    HEALTHY = "healthy"
    """A heartbeat: vLLM answers and the health score is at or above the threshold."""
    UNHEALTHY = "unhealthy"
    """A heartbeat below the threshold or with vLLM down, or active probes failing."""
    SILENT = "silent"
    """No heartbeat for longer than the staleness timeout."""
    DRAINING = "draining"
    """A spot notice, a drain command, SIGTERM: the node is on its way out."""
    CLOUD_LOST = "cloud_lost"
    """The launcher no longer has the node's cluster (preempted, deleted, never came up)."""
    GONE = "gone"
    """Deregistered or terminated: the end."""


FINAL = frozenset({NodeStatus.TERMINATED, NodeStatus.FAILED})
SERVING = frozenset({NodeStatus.ACTIVE})
ALIVE = frozenset({NodeStatus.LAUNCHING, NodeStatus.REGISTERED, NodeStatus.ACTIVE,
                   NodeStatus.UNHEALTHY, NodeStatus.STALE})
"""Statuses that still count as capacity (being launched, serving, or possibly coming back)."""

_TABLE: dict[tuple[NodeStatus | None, Signal], NodeStatus] = {
    (None, Signal.LAUNCHED): NodeStatus.LAUNCHING,
    (None, Signal.REGISTERED): NodeStatus.REGISTERED,
    (NodeStatus.LAUNCHING, Signal.REGISTERED): NodeStatus.REGISTERED,
    (NodeStatus.REGISTERED, Signal.HEALTHY): NodeStatus.ACTIVE,
    (NodeStatus.ACTIVE, Signal.UNHEALTHY): NodeStatus.UNHEALTHY,
    (NodeStatus.UNHEALTHY, Signal.HEALTHY): NodeStatus.ACTIVE,
    (NodeStatus.STALE, Signal.HEALTHY): NodeStatus.ACTIVE,
    (NodeStatus.STALE, Signal.UNHEALTHY): NodeStatus.UNHEALTHY,
}
for _quiet in (NodeStatus.LAUNCHING, NodeStatus.REGISTERED, NodeStatus.ACTIVE,
               NodeStatus.UNHEALTHY):
    _TABLE[(_quiet, Signal.SILENT)] = NodeStatus.STALE
_ANY: tuple[NodeStatus | None, ...] = (None, *ALIVE)
for _status in _ANY:
    _TABLE[(_status, Signal.DRAINING)] = NodeStatus.DRAINING
for _status in (*_ANY, NodeStatus.DRAINING):
    _TABLE[(_status, Signal.CLOUD_LOST)] = NodeStatus.FAILED
    _TABLE[(_status, Signal.GONE)] = NodeStatus.TERMINATED
# A draining node that the cloud loses before it finished is simply gone, not a failure.
_TABLE[(NodeStatus.DRAINING, Signal.CLOUD_LOST)] = NodeStatus.TERMINATED


def transition(status: NodeStatus | None, signal: Signal) -> NodeStatus | None:
    """The status after `signal`, or None when it changes nothing."""
    if status in FINAL:
        return None
    after = _TABLE.get((status, signal))
    return None if after is None or after == status else after


@dataclass(frozen=True)
class HealthRule:
    threshold: int = 50

    def signal(self, vllm_healthy: bool, health_score: int) -> Signal:
        return Signal.HEALTHY if vllm_healthy and health_score >= self.threshold \
            else Signal.UNHEALTHY
