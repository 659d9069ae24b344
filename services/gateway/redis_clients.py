"""The gateway's Redis clients, on one Redis or on a Redis Cluster (REDIS_CLUSTER).

Two per gateway: the limiter's (a pipelined connection per Redis primary: the hot path) and
the shared one for the key cache, failed-authentication counts, response owners and the
budget reconciler (redis-py's client, or its cluster client). Neither retries a command by
itself: a retried EVALSHA or INCR that did run counts twice.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from services.gateway.ratelimit import connect_redis
from services.infra.pipelined_cluster import PipelinedCluster, parse_seeds
from services.infra.pipelined_redis import PipelinedRedis

SharedRedis = aioredis.Redis | RedisCluster
LimiterRedis = PipelinedRedis | PipelinedCluster


def connect_shared(url: str, *, cluster: bool, timeout: float) -> SharedRedis:
    if not cluster:
        return connect_redis(url, timeout=timeout)
    credentials, seeds = parse_seeds(url)
    username, _, password = credentials.rpartition(":")
    return RedisCluster(startup_nodes=[ClusterNode(a.host, a.port) for a in seeds],
                        username=username or None, password=password or None,
                        socket_timeout=timeout, socket_connect_timeout=timeout,
                        retry=Retry(NoBackoff(), 0))


def connect_limiter(url: str, *, cluster: bool, timeout: float) -> LimiterRedis:
    if cluster:
        return PipelinedCluster(url, timeout=timeout)
    return PipelinedRedis(url, timeout=timeout)
