"""The latest heartbeat of every node, in Redis: `node:{id}:heartbeat` (the whole heartbeat)
and `node:{id}:health_score`, as the reference document names them. Heartbeats are
observations: they never go into the log."""

from __future__ import annotations

import msgspec
import redis.asyncio as aioredis
import structlog

from schemas.events import Event, NodeHeartbeat

log = structlog.get_logger("heartbeats")


class HeartbeatStore:
    def __init__(self, redis: aioredis.Redis, *, ttl_seconds: int = 300) -> None:
        self.redis = redis
        self.ttl = ttl_seconds
        self.stored = 0

    async def on_heartbeat(self, event: Event) -> None:
        if not isinstance(event, NodeHeartbeat):
            return
        node = event.node_id
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(f"node:{node}:heartbeat", msgspec.json.encode(event), ex=self.ttl)
            pipe.set(f"node:{node}:health_score", event.health_score, ex=self.ttl)
            await pipe.execute()
        self.stored += 1
