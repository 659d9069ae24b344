"""Which node holds each stored response, and whose it is (Redis).

vLLM keeps a stored response in the memory of the node that made it, and serves it to anyone
who names its id. The gateway therefore remembers, when a response is stored, the node and
the tenant (``response:<id>`` → ``<tenant id> <node id>``, for RESPONSE_OWNER_TTL_SECONDS),
routes a follow-up (`previous_response_id`) or a retrieval there, and answers 404 for an id
it does not know or that is another tenant's: a tenant can never reach another's response
through a node, however it learned the id.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

log = structlog.get_logger("gateway")

PREFIX = "response:"


class OwnersUnavailable(Exception):
    """Redis did not answer: whether the response exists cannot be told."""


@dataclass(frozen=True)
class Owner:
    tenant_id: str
    node_id: str


def encode_owner(owner: Owner) -> bytes:
    return f"{owner.tenant_id} {owner.node_id}".encode()


def decode_owner(value: bytes | str | None) -> Owner | None:
    """The owner stored under a key; None for nothing, or for what this code never wrote."""
    if value is None:
        return None
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    parts = text.split(" ")
    if len(parts) != 2 or not all(parts):
        return None
    return Owner(parts[0], parts[1])


class ResponseOwners:
    def __init__(self, redis: aioredis.Redis | RedisCluster, ttl_seconds: int) -> None:
        self.redis = redis
        self.ttl_seconds = max(1, ttl_seconds)

    async def remember(self, response_id: str, owner: Owner) -> None:
        """Best effort: a Redis that fails here loses the follow-ups of one response (they
        get 404), never the answer being served."""
        try:
            await self.redis.set(PREFIX + response_id, encode_owner(owner),
                                 ex=self.ttl_seconds)
        except (RedisError, OSError) as exc:
            log.warning("could not remember where a response is stored",
                        response_id=response_id, error=str(exc) or type(exc).__name__)

    async def owner(self, response_id: str, tenant_id: str) -> Owner | None:
        """Where `response_id` is, if it is `tenant_id`'s (None: unknown, or another's)."""
        try:
            found = decode_owner(await self.redis.get(PREFIX + response_id))
        except (RedisError, OSError) as exc:
            raise OwnersUnavailable(str(exc) or type(exc).__name__) from None
        return found if found is not None and found.tenant_id == tenant_id else None

    async def forget(self, response_id: str) -> None:
        try:
            await self.redis.delete(PREFIX + response_id)
        except (RedisError, OSError) as exc:
            raise OwnersUnavailable(str(exc) or type(exc).__name__) from None
