"""A node's hot data in Redis: what the monitor writes from heartbeats and its verdicts, and
what the admin API and the orchestrator read back. The one place these keys are spelled."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import msgspec
import redis.asyncio as aioredis

from schemas.events import NodeHeartbeat

NodeId = uuid.UUID | str

HEARD = "nodes:heard"
"""node id → when the monitor received the node's latest heartbeat (its clock, epoch
seconds), for every node not ended yet. Ages are measured from that, not from the agent's
`occurred_at`: a node whose clock is off must not look fresh, or stale, for it."""
LAST_SEEN = "nodes:last_seen"
"""node id → when the monitor last heard it; the sweep's set (a stale node leaves it)."""
HEALTH = "nodes:health_score"
"""node id → its latest health score, for the metrics."""


def heartbeat_key(node: NodeId) -> str:
    """The node's latest heartbeat (the event's JSON)."""
    return f"node:{node}:heartbeat"


def heartbeat_order_key(node: NodeId) -> str:
    """(sequence, time) of the latest heartbeat written: only a newer one replaces it."""
    return f"node:{node}:heartbeat_order"


def health_score_key(node: NodeId) -> str:
    return f"node:{node}:health_score"


def status_key(node: NodeId) -> str:
    """The status the monitor last gave the node."""
    return f"node:{node}:status"


def probe_failing_key(node: NodeId) -> str:
    """Set while the monitor's probe of the node's vLLM fails."""
    return f"node:{node}:probe_failing"


async def latest_heartbeats(redis: aioredis.Redis, nodes: Sequence[NodeId]
                            ) -> list[tuple[NodeHeartbeat | None, float | None]]:
    """Each node's latest heartbeat (None when there is none, or it does not decode) and when
    the monitor received it (None when not recorded), in one round trip."""
    if not nodes:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        pipe.mget([heartbeat_key(n) for n in nodes])
        pipe.zmscore(HEARD, [str(n) for n in nodes])
        raws, heard = await pipe.execute()
    out: list[tuple[NodeHeartbeat | None, float | None]] = []
    for raw, at in zip(raws, heard or [None] * len(nodes), strict=True):
        beat = None
        if raw:
            try:
                beat = msgspec.json.decode(raw, type=NodeHeartbeat)
            except (msgspec.DecodeError, msgspec.ValidationError):
                beat = None
        out.append((beat, at))
    return out
