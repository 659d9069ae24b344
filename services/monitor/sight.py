"""When silence means a node is gone, and when it only means the monitor could not hear. Pure.

A node is stale after `stale_after` seconds without a heartbeat — provided the monitor was
listening all that time. When NATS is down, or no monitor swept for a while (every replica
down, a long failover), every node is silent at once, and declaring them all stale would have
the orchestrator replace and tear down the whole fleet for the monitor's own blindness. So the
monitor keeps `watching_since`: the moment it last started hearing the fleet (after a blind
spell, or at first start). A node is stale only when it has been silent for `stale_after`
*and* the monitor has been watching for `stale_after`: every node gets a full window after
heartbeats resume.
"""

from __future__ import annotations


def watching_since(now: float, *, last_watch: float | None, since: float | None,
                   connected: bool, blind_after: float) -> float:
    """The moment the monitor has been hearing the fleet since.

    `last_watch`: when a sweep last ran (any replica; None: never). `since`: the value kept so
    far (None: none). `connected`: the sweeper's own NATS connection is up. A gap of more than
    `blind_after` between sweeps, or a NATS connection down, is a blind spell: watching starts
    again now."""
    if not connected or since is None or last_watch is None:
        return now
    if now - last_watch > blind_after:
        return now
    return min(since, now)


def in_grace(now: float, since: float, stale_after: float) -> bool:
    """True while the monitor has not yet watched for a whole `stale_after`: no node may be
    declared stale yet (its silence may be the monitor's)."""
    return now - since < stale_after
