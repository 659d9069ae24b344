"""Guards against acting on a wrong view of the world. Pure.

The orchestrator destroys machines on the strength of what it is told. A single answer that
says most of the fleet is gone at once is more likely a wrong answer (the cloud API asked as
another user, the wrong account, a half-synced status cache) than a fact, and acting on it
costs the whole fleet; if the machines really are gone their heartbeats stop too, and the
monitor's silence signal takes them out, a few at a time (reconciler.replacement_budget).
Likewise a launch that failed for a reason other than capacity is not retried in the same
place at once (LaunchBackoff).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


def believable_cloud_losses(checked: int, lost: int, *, max_fraction: float) -> bool:
    """Whether one look at the cloud that finds `lost` of the `checked` nodes' machines gone
    is to be acted on: one machine at a time always is; more only up to `max_fraction` of the
    nodes checked."""
    return lost <= 1 or lost <= checked * max_fraction


BackoffKey = tuple[uuid.UUID, str, bool]
"""(deployment, the deployment's region as it names it, spot)."""


@dataclass
class LaunchBackoff:
    """Launches that failed for a reason other than capacity (quota, credentials, an image or
    a setup that fails) fail again if retried at once: each failure of a deployment's launches
    in a (region, spot) keeps them out of it for `base` seconds, doubling up to `cap`; a
    launch there that succeeds forgives it. Meanwhile the deployment launches in its other
    regions. Clocks are the caller's (monotonic seconds)."""

    base: float = 10.0
    cap: float = 300.0
    failures: dict[BackoffKey, int] = field(default_factory=dict)
    until: dict[BackoffKey, float] = field(default_factory=dict)

    def failed(self, key: BackoffKey, now: float) -> float:
        """Note a failure; returns how long the key is now kept out."""
        n = self.failures.get(key, 0) + 1
        self.failures[key] = n
        delay = min(self.cap, self.base * 2.0 ** (n - 1))
        self.until[key] = now + delay
        return delay

    def succeeded(self, key: BackoffKey) -> None:
        self.failures.pop(key, None)
        self.until.pop(key, None)

    def blocked(self, deployment: uuid.UUID, now: float) -> frozenset[tuple[str, bool]]:
        """The (region, spot) pairs the deployment must not launch in now."""
        return frozenset((region, spot) for (dep, region, spot), t in self.until.items()
                         if dep == deployment and t > now)

    def forget(self, keep: set[uuid.UUID]) -> None:
        """Drop what concerns deployments no longer there."""
        for key in [k for k in self.failures if k[0] not in keep]:
            self.succeeded(key)
