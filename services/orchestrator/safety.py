"""Guards against acting on a wrong view of the world. Pure.

The orchestrator destroys machines on the strength of what it is told. A single answer that
says most of the fleet is gone at once is more likely a wrong answer (the cloud API asked as
another user, the wrong account, a half-synced status cache) than a fact, and acting on it
costs the whole fleet; if the machines really are gone their heartbeats stop too, and the
monitor's silence signal takes them out, a few at a time (reconciler.replacement_budget).
"""

from __future__ import annotations


def believable_cloud_losses(checked: int, lost: int, *, max_fraction: float) -> bool:
    """Whether one look at the cloud that finds `lost` of the `checked` nodes' machines gone
    is to be acted on: one machine at a time always is; more only up to `max_fraction` of the
    nodes checked."""
    return lost <= 1 or lost <= checked * max_fraction
