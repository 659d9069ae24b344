"""The three safety signals the monitor watches, turned into node status changes:

1. heartbeats: healthy / unhealthy (vLLM's health and the score against the threshold);
2. silence: no heartbeat for `stale_after` seconds (the leader sweeps every `sweep_every`);
3. active probes of each serving node's `/health` (the leader; `probe_failures` in a row).

(The cloud's own view, the third signal of the reference design, belongs to the orchestrator,
which owns the launcher.)

Heartbeats go to Redis in batches, one round trip per batch (a pipeline of one script call
per heartbeat): the heartbeat, the score, the node's last-seen time in the `nodes:last_seen`
sorted set, and back the node's cached status (`node:{id}:status`). Only when that cached
status says a transition is possible does the watcher go to PostgreSQL (Fleet.signal re-reads
the truth under a row lock and decides again). The NATS callback only queues: a slow batch
never holds the subscription's reader, and the queue drops its oldest heartbeats rather than
grow without bound (a newer one from the same node follows).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import aiohttp
import asyncpg
import msgspec
import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from schemas.events import (
    Event,
    NodeDeregistered,
    NodeDraining,
    NodeHeartbeat,
    NodeRegistered,
    NodeSpotWarning,
    NodeStatus,
    NodeStatusChanged,
    NodeTerminated,
)
from services.domain.fleet import Fleet
from services.domain.node_hot_data import (
    HEALTH,
    HEARD,
    LAST_SEEN,
    health_score_key,
    heartbeat_key,
    heartbeat_order_key,
    probe_failing_key,
    status_key,
)
from services.domain.node_states import FINAL, HealthRule, Signal, transition
from services.infra.aio import stop_task
from services.monitor.sight import in_grace, watching_since
from services.monitor.verdicts import ProbeCounts, heartbeat_verdict

log = structlog.get_logger("watcher")

WATCHED_AT = "monitor:watched_at"
"""When a sweep last ran, on any replica."""
WATCHING_SINCE = "monitor:watching_since"
"""Since when the monitor has been hearing the fleet without a blind spell."""

# Heartbeats are spread over the replicas one message at a time, so two from the same node
# can be handled out of order: only a newer one is written. Older means neither a higher
# sequence nor a later time than the last written (an agent that restarts counts its
# sequence from 1 again, but its clock goes on). A node that has ended is not written at all.
# KEYS: heartbeat, health_score, status, last_seen zset, probe-failing flag, heard zset,
#       health hash, heartbeat order ("sequence time").
# ARGV: heartbeat json, score, ttl, node id, now (seconds), sequence, occurred at (seconds).
# Returns {cached status, probe flag set, written}.
_RECORD = """
local status = redis.call('GET', KEYS[3])
if status == 'terminated' or status == 'failed' then
  return {status, 0, 0}
end
local order = redis.call('GET', KEYS[8])
if order then
  local sep = string.find(order, ' ', 1, true)
  local seq = tonumber(string.sub(order, 1, sep - 1))
  local at = tonumber(string.sub(order, sep + 1))
  if tonumber(ARGV[6]) <= seq and tonumber(ARGV[7]) <= at then
    return {status, 0, 0}
  end
end
redis.call('SET', KEYS[8], ARGV[6] .. ' ' .. ARGV[7], 'EX', ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[6], ARGV[5], ARGV[4])
redis.call('HSET', KEYS[7], ARGV[4], ARGV[2])
return {status, redis.call('EXISTS', KEYS[5]), 1}
"""

# Nodes not heard from for ARGV[1] seconds' worth (score <= ARGV[1]) leave the metrics: a
# node that went without a word (its end never recorded) must not stay a series for ever.
# KEYS: heard zset, health hash.
_FORGET = """
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 5000)
if #old > 0 then
  redis.call('ZREM', KEYS[1], unpack(old))
  redis.call('HDEL', KEYS[2], unpack(old))
end
return #old
"""


@dataclass(frozen=True)
class WatchSettings:
    health_threshold: int = 50
    stale_after: float = 60.0
    sweep_every: float = 1.0
    heartbeat_ttl: int = 300
    probe_every: float = 10.0
    probe_timeout: float = 2.0
    probe_failures: int = 3
    probe_concurrency: int = 100
    gauges_every: float = 5.0
    """How often the leader refreshes the fleet's series (seconds)."""
    batch: int = 500
    """Heartbeats per Redis round trip at most."""
    queue_limit: int = 200_000
    blind_after: float = 10.0
    """A gap between sweeps longer than this means nobody was watching: silence counts
    again from the next sweep (see sight.py)."""


@dataclass(frozen=True)
class FleetSnapshot:
    """What the leader read of the whole fleet at `taken_at`."""

    heard: list[tuple[str, float]]
    """(node id, when the monitor last heard it), for every node not ended."""
    health: list[tuple[str, float]]
    counts: dict[str, int]
    """status → nodes, for active, draining and stale."""


_FLEET_HELP = {
    "node_health_score": "Latest health score reported by a node",
    "node_heartbeat_age_seconds": "Seconds since a node's last heartbeat",
    "nodes_active_total": "Nodes in status active",
    "nodes_draining_total": "Nodes in status draining",
    "nodes_stale_total": "Nodes in status stale",
}


class FleetGauges(Collector):
    """The fleet's series, read from Redis and PostgreSQL (shared by every replica) by the
    leader every `gauges_every`, not from what this replica happened to handle: heartbeats are
    spread over the replicas, so no replica's own view is the fleet's. Only the leader exports
    them (a standby, or a replica that lost the lead, exports none: never a stale or zero
    value), one series per node not ended. Ages are computed when scraped."""

    def __init__(self) -> None:
        self.snapshot: FleetSnapshot | None = None

    def _families(self) -> dict[str, GaugeMetricFamily]:
        return {name: GaugeMetricFamily(name, text,
                                        labels=None if name.startswith("nodes_") else ["node_id"])
                for name, text in _FLEET_HELP.items()}

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families().values())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.snapshot
        if snap is None:
            return
        f = self._families()
        now = time.time()
        for node, seen in snap.heard:
            f["node_heartbeat_age_seconds"].add_metric([node], round(max(0.0, now - seen), 3))
        for node, score in snap.health:
            f["node_health_score"].add_metric([node], score)
        for status in ("active", "draining", "stale"):
            f[f"nodes_{status}_total"].add_metric([], snap.counts.get(status, 0))
        yield from f.values()


class WatchMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.fleet = FleetGauges()
        if registry is not None:
            registry.register(self.fleet)
        self.leader = Gauge("monitor_is_leader",
                            "1 on the replica that sweeps, probes and exports the fleet",
                            registry=registry)
        self.grace = Gauge("monitor_stale_grace",
                           "1 while the leader declares no node stale because the monitor "
                           "itself was blind (NATS down, no sweep) until just now",
                           registry=registry)
        self.heartbeats = Counter("monitor_heartbeats_total",
                                  "Heartbeats this replica handled", registry=registry)
        self.superseded = Counter(
            "monitor_heartbeats_superseded_total",
            "Heartbeats not recorded: a newer one from the node was already (or it has ended)",
            registry=registry)
        self.dropped = Counter("monitor_heartbeats_dropped_total",
                               "Heartbeats dropped unhandled because the queue was full",
                               registry=registry)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def status_of(event: Event) -> NodeStatus | None:
    """The status a node event says its node is in now (None: says nothing about it)."""
    match event:
        case NodeStatusChanged():
            return event.to_status
        case NodeRegistered():
            return NodeStatus.REGISTERED
        case NodeDraining() | NodeSpotWarning():
            return NodeStatus.DRAINING
        case NodeDeregistered() | NodeTerminated():
            return NodeStatus.TERMINATED
    return None


class NodeWatcher:
    def __init__(self, fleet: Fleet, redis: aioredis.Redis, settings: WatchSettings, *,
                 registry: CollectorRegistry | None = None,
                 connected: Callable[[], bool] = lambda: True) -> None:
        self.fleet = fleet
        self.connected = connected
        """Whether this replica hears NATS now (the sweeper is blind when it does not)."""
        self.redis = redis
        self.settings = settings
        self.rule = HealthRule(settings.health_threshold)
        self.metrics = WatchMetrics(registry)
        self._record = redis.register_script(_RECORD)
        self._forget = redis.register_script(_FORGET)
        self._probes = ProbeCounts(settings.probe_failures)
        self._queue: deque[NodeHeartbeat] = deque()
        self._queued = asyncio.Event()
        self._gauges_at = 0.0
        self.heartbeats = 0
        self.transitions = 0
        self.sweeps = 0
        self.probe_rounds = 0
        self.watching_since: float | None = None
        """When the monitor last started hearing the fleet (see sight.py); the leader's."""

    # ------------------------------------------------------------------ heartbeats

    async def on_heartbeat(self, event: Event) -> None:
        """The subscription's callback: queue it for `handle_heartbeats`."""
        if not isinstance(event, NodeHeartbeat):
            return
        if len(self._queue) >= self.settings.queue_limit:
            self._queue.popleft()
            self.metrics.dropped.inc()
        self._queue.append(event)
        self._queued.set()

    async def handle_heartbeats(self) -> None:
        """Drain the queue in batches, until cancelled."""
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._queue:
                n = min(len(self._queue), self.settings.batch)
                batch = [self._queue.popleft() for _ in range(n)]
                try:
                    await self._record_batch(batch)
                except (aioredis.RedisError, OSError) as exc:
                    # Observations: the next heartbeats carry the same news.
                    log.warning("heartbeat batch not recorded", size=n, error=str(exc))

    async def _record_batch(self, batch: list[NodeHeartbeat]) -> None:
        now = time.time()
        ttl = self.settings.heartbeat_ttl
        async with self.redis.pipeline(transaction=False) as pipe:
            for event in batch:
                node = event.node_id
                await self._record(
                    keys=[heartbeat_key(node), health_score_key(node),
                          status_key(node), LAST_SEEN, probe_failing_key(node),
                          HEARD, HEALTH, heartbeat_order_key(node)],
                    args=[msgspec.json.encode(event), event.health_score, ttl, str(node), now,
                          event.sequence, repr(event.occurred_at.timestamp())],
                    client=pipe)
            results = await pipe.execute()
        self.heartbeats += len(batch)
        self.metrics.heartbeats.inc(len(batch))
        for event, (cached, probe_failing, written) in zip(batch, results, strict=True):
            if written:
                await self._judge(event, cached, bool(probe_failing))
            else:  # a newer one was handled already (or the node has ended): it decided
                self.metrics.superseded.inc()

    async def _judge(self, event: NodeHeartbeat, cached: bytes | None,
                     probe_failing: bool) -> None:
        signal, reason = heartbeat_verdict(event, probe_failing, self.rule)
        status = NodeStatus(cached.decode()) if cached else None
        if status is not None and transition(status, signal) is None:
            return  # the common case: nothing changes, no database
        await self._signal(event.node_id, signal, reason, event.health_score)

    async def _signal(self, node: uuid.UUID, signal: Signal, reason: str,
                      health_score: int | None = None) -> NodeStatus | None:
        after = await self.fleet.signal(node, signal, reason=reason, health_score=health_score)
        if after is not None:
            self.transitions += 1
            log.info("node status changed", node_id=str(node), status=after.value,
                     reason=reason)
            await self.remember(node, after)
        elif (await self.redis.get(status_key(node))) is None:
            # Unknown to the cache (a new node, a flushed Redis): learn it from the truth —
            # unless the node's events got there first while we read (NX): what we read may
            # already be stale (a launching node registering right now).
            truth = await self.fleet.status(node)
            if truth is not None:
                await self.redis.set(status_key(node), truth.value, ex=7 * 86400, nx=True)
        return after

    async def remember(self, node: uuid.UUID, status: NodeStatus) -> None:
        """Keep the cached status in step with the log (called for every node event)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(status_key(node), status.value, ex=7 * 86400)
            if status in FINAL:
                # A gone node's series go too: the labels stay bounded by the live fleet.
                pipe.zrem(LAST_SEEN, str(node))
                pipe.zrem(HEARD, str(node))
                pipe.hdel(HEALTH, str(node))
                pipe.delete(heartbeat_key(node), health_score_key(node),
                            heartbeat_order_key(node))
            elif status == NodeStatus.REGISTERED:
                # Silence counts from the registration until the first heartbeat.
                pipe.zadd(LAST_SEEN, {str(node): time.time()}, nx=True)
            await pipe.execute()
        if status in FINAL:
            self._probes.forget(node)

    async def on_node_events(self, events: list[Event]) -> None:
        for e in events:
            status = status_of(e)
            node = getattr(e, "node_id", None)
            if status is not None and isinstance(node, uuid.UUID):
                await self.remember(node, status)

    # ------------------------------------------------------------------ the leader's work

    async def lead(self) -> None:
        """Sweep for silence every `sweep_every`, and probe every `probe_every` in a task of
        its own: a round of probes waiting on unreachable nodes must never push the sweep
        (and stale detection) back. Until cancelled."""
        self._gauges_at = 0.0
        self.metrics.leader.set(1)
        try:
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.settings.probe_timeout)) as session:
                probes = asyncio.create_task(self._probe_forever(session), name="probes")
                try:
                    while True:
                        await self.sweep()
                        await asyncio.sleep(self.settings.sweep_every)
                finally:
                    await stop_task(probes)
        finally:
            # The next leader exports the fleet; this replica's copy would only go stale.
            self.metrics.fleet.snapshot = None
            self.metrics.leader.set(0)
            self.metrics.grace.set(0)

    async def _probe_forever(self, session: aiohttp.ClientSession) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.probe(session)
            except (aioredis.RedisError, OSError, asyncpg.PostgresError) as exc:
                log.warning("probe round failed; the next one retries", error=str(exc))
            await asyncio.sleep(max(0.0, self.settings.probe_every
                                    - (time.monotonic() - started)))

    async def _watch(self, now: float) -> float:
        """Note this sweep and return since when the monitor has been hearing the fleet. Kept
        in Redis: a new leader after a short failover carries on, after a long one (or when
        every monitor was down) it starts watching afresh."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.getset(WATCHED_AT, now)
            pipe.get(WATCHING_SINCE)
            last, kept = await pipe.execute()
        before = float(kept) if kept is not None else None
        since = watching_since(now, last_watch=float(last) if last is not None else None,
                               since=before, connected=self.connected(),
                               blind_after=self.settings.blind_after)
        if since != before:
            await self.redis.set(WATCHING_SINCE, since)
            if before is not None and since == now:
                log.warning("the monitor was blind (NATS down or no sweep for a while): "
                            "no node is declared stale until it has listened again",
                            seconds=self.settings.stale_after)
        self.watching_since = since
        return since

    async def sweep(self) -> int:
        """Declare silent nodes stale; refresh the fleet gauges. Returns nodes declared."""
        now = time.time()
        self.sweeps += 1
        since = await self._watch(now)
        grace = in_grace(now, since, self.settings.stale_after)
        self.metrics.grace.set(1 if grace else 0)
        silent = [] if grace else [_text(m) for m in await self.redis.zrangebyscore(
            LAST_SEEN, "-inf", now - self.settings.stale_after)]
        declared = 0
        for raw in silent:
            node = uuid.UUID(raw)
            after = await self._signal(
                node, Signal.SILENT, f"no heartbeat for {self.settings.stale_after:.0f}s")
            if after == NodeStatus.STALE:
                declared += 1
                # Out of the sweep until it speaks again (a heartbeat puts it back).
                await self.redis.zrem(LAST_SEEN, raw)
            elif after is None:
                await self.redis.zrem(LAST_SEEN, raw)
        await self._refresh_gauges(now)
        return declared

    async def _refresh_gauges(self, now: float) -> None:
        if now - self._gauges_at < self.settings.gauges_every:
            return
        self._gauges_at = now
        forgotten = await self._forget(keys=[HEARD, HEALTH],
                                       args=[now - self.settings.heartbeat_ttl])
        if forgotten:
            log.info("nodes silent past the heartbeat ttl left the metrics", nodes=forgotten)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrange(HEARD, 0, -1, withscores=True)
            pipe.hgetall(HEALTH)
            seen, scores = await pipe.execute()
        rows = await self.fleet.log.pool.fetch(
            "SELECT status, count(*) AS n FROM nodes WHERE status IN ('active', 'draining', "
            "'stale') GROUP BY status")
        heard = [(_text(m), float(t)) for m, t in cast(list[tuple[bytes, float]], seen)]
        known = {node for node, _ in heard}
        health = [(node, float(v)) for k, v in cast(dict[bytes, bytes], scores).items()
                  if (node := _text(k)) in known]
        self.metrics.fleet.snapshot = FleetSnapshot(
            heard=heard, health=health, counts={r["status"]: r["n"] for r in rows})

    async def probe(self, session: aiohttp.ClientSession) -> None:
        """GET /health of every registered, active or unhealthy node; a node failing
        `probe_failures` probes in a row is unhealthy whatever its heartbeats say, until a
        probe passes.

        The verdict is a flag in Redis (`node:{id}:probe_failing`) that every replica's
        heartbeat handling reads. It is refreshed by every failing probe (its expiry only
        covers a leader that dies) and deleted by every passing one, whoever set it: after a
        failover the new leader's first passing probe clears its predecessor's flag."""
        nodes = [n for n in await self.fleet.nodes(statuses=frozenset(
            {NodeStatus.REGISTERED, NodeStatus.ACTIVE, NodeStatus.UNHEALTHY}))
            if n.endpoint_url]
        limit = asyncio.Semaphore(self.settings.probe_concurrency)

        async def one(url: str) -> bool:
            async with limit:
                try:
                    async with session.get(f"{url}/health") as resp:
                        return resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    # aiohttp turns a cancellation that meets its own timeout into a
                    # TimeoutError: a stopping monitor must not take it for a failed probe.
                    me = asyncio.current_task()
                    if me is not None and me.cancelling():
                        raise asyncio.CancelledError from None
                    return False

        results = await asyncio.gather(*(one(n.endpoint_url) for n in nodes))
        verdict = self._probes.round({n.id: ok for n, ok in zip(nodes, results, strict=True)})
        ttl = max(60, int(3 * self.settings.probe_every))
        async with self.redis.pipeline(transaction=False) as pipe:
            for node_id in verdict.passed:
                pipe.delete(probe_failing_key(node_id))  # heartbeats decide again
            for node_id, failures in verdict.failing.items():
                pipe.set(probe_failing_key(node_id), failures, ex=ttl)
            await pipe.execute()
        self.probe_rounds += 1
        for node_id, failures in verdict.crossed:
            await self._signal(node_id, Signal.UNHEALTHY,
                               f"{failures} health probes failed in a row")
