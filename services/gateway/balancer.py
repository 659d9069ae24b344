"""Choosing a node for a request: strategies and a circuit breaker per node. Pure (time is
passed in), so every decision is unit-tested without a clock or a network.

Strategies:
- round_robin (default): each model's candidates in turn.
- least_connections: fewest requests this gateway has in flight on the node.
- least_latency: lowest moving average of this gateway's upstream latency to the node
  (nodes not yet measured go first, so they get measured).
- least_load: vLLM's own view from heartbeats: fewest waiting, then KV cache, then running.
- prefix_aware: a conversation back to the node that holds its prefix in its KV cache, by
  rendezvous hashing with bounded load (services/gateway/prefix_routing.py); a request with
  nothing to key it by goes by least_load.
- kv_aware: the node whose KV cache holds most of the prompt's leading blocks, as the nodes'
  own KV events tell (kv_index, kv_routing), weighed against load; prefix_aware's choice
  while no candidate holds the prompt's first block.

Circuit breaker: over a sliding window, a node whose error rate exceeds the threshold with at
least `min_requests` outcomes is opened (no traffic) for `cooldown` seconds, then half-open:
one probe request; success closes it, failure opens it again.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from services.gateway import kv_routing, prefix_routing
from services.gateway.kv_index import KvIndex
from services.gateway.nodes import NodeView

STRATEGIES = ("round_robin", "least_connections", "least_latency", "least_load", "prefix_aware",
              "kv_aware")


@dataclass(frozen=True)
class RouteHint:
    """What a keyed strategy routes a request by."""

    key: bytes | None = None
    """prefix_routing.route_key: its session, or the start of its conversation."""
    blocks: Callable[[int], Iterator[bytes]] | None = None
    """kv_aware: the keys of its prompt's blocks of a given size (kv_prompt), read lazily."""


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerRules:
    error_rate: float = 0.5
    min_requests: int = 10
    window: float = 30.0
    cooldown: float = 10.0


BUCKET_SECONDS = 1.0
"""Outcomes are counted per second: the window costs O(window seconds) memory and O(1) per
request, however busy the node."""


@dataclass
class _Circuit:
    buckets: deque[list[float]] = field(default_factory=deque)
    """[bucket start, outcomes, errors], oldest first."""
    total: int = 0
    errors: int = 0
    opened_at: float | None = None
    probing: bool = False

    def add(self, now: float, ok: bool, window: float) -> None:
        start = now - now % BUCKET_SECONDS
        if self.buckets and self.buckets[-1][0] == start:
            bucket = self.buckets[-1]
        else:
            bucket = [start, 0, 0]
            self.buckets.append(bucket)
        bucket[1] += 1
        self.total += 1
        if not ok:
            bucket[2] += 1
            self.errors += 1
        horizon = now - window
        while self.buckets and self.buckets[0][0] + BUCKET_SECONDS <= horizon:
            _, total, errors = self.buckets.popleft()
            self.total -= int(total)
            self.errors -= int(errors)


class CircuitBreaker:
    def __init__(self, rules: BreakerRules | None = None) -> None:
        self.rules = rules or BreakerRules()
        self._circuits: dict[str, _Circuit] = {}

    def state(self, node_id: str, now: float) -> CircuitState:
        c = self._circuits.get(node_id)
        if c is None or c.opened_at is None:
            return CircuitState.CLOSED
        if now - c.opened_at < self.rules.cooldown:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    def allow(self, node_id: str, now: float) -> bool:
        """May a request go to this node? In half-open, only one probe at a time."""
        state = self.state(node_id, now)
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN:
            return False
        return not self._circuits[node_id].probing

    def started(self, node_id: str, now: float) -> None:
        if self.state(node_id, now) is CircuitState.HALF_OPEN:
            self._circuits[node_id].probing = True

    def record(self, node_id: str, ok: bool, now: float) -> CircuitState:
        """Count an outcome; returns the state after it."""
        c = self._circuits.setdefault(node_id, _Circuit())
        if c.opened_at is not None:
            if now - c.opened_at < self.rules.cooldown:
                return CircuitState.OPEN  # a straggler from before the opening
            # The half-open probe decides.
            c.probing = False
            if ok:
                self._circuits[node_id] = _Circuit()
                return CircuitState.CLOSED
            c.opened_at = now
            return CircuitState.OPEN
        c.add(now, ok, self.rules.window)
        if c.total >= self.rules.min_requests and c.errors / c.total > self.rules.error_rate:
            self._circuits[node_id] = _Circuit(opened_at=now)
            return CircuitState.OPEN
        return CircuitState.CLOSED

    def trip(self, node_id: str, now: float) -> None:
        """Open the node's circuit at once: it refused a connection, so it is down or not
        listening (a dead machine whose heartbeats have not yet gone stale); every request
        sent to it until then would cost a refused connection and a retry."""
        self._circuits[node_id] = _Circuit(opened_at=now)

    def abandoned(self, node_id: str) -> None:
        """A request ended with no verdict on the node (cut off by a timeout or a client
        hanging up): a half-open probe that never finished must not keep the node out."""
        c = self._circuits.get(node_id)
        if c is not None:
            c.probing = False

    def forget(self, node_id: str) -> None:
        self._circuits.pop(node_id, None)


class Balancer:
    """Picks among routable candidates; tracks this gateway's in-flight count and latency."""

    LATENCY_SMOOTHING = 0.2

    def __init__(self, strategy: str = "round_robin", breaker: CircuitBreaker | None = None,
                 *, spill: float = 0.25, kv_index: KvIndex | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown load-balancing strategy {strategy!r}; "
                             f"one of {', '.join(STRATEGIES)}")
        if spill < 0:
            raise ValueError("spill must be >= 0")
        self.strategy = strategy
        self.spill = spill
        self.keyed = strategy in ("prefix_aware", "kv_aware")
        """Whether `choose` wants a request's RouteHint."""
        self.kv_index = kv_index if strategy == "kv_aware" else None
        self.breaker = breaker or CircuitBreaker()
        self.in_flight: dict[str, int] = {}
        self.latency: dict[str, float] = {}
        self._turn: dict[str, int] = {}

    def choose(self, model: str, candidates: Sequence[NodeView], now: float,
               exclude: frozenset[str] = frozenset(), hint: RouteHint | None = None
               ) -> NodeView | None:
        allowed = sorted((n for n in candidates
                          if n.node_id not in exclude and self.breaker.allow(n.node_id, now)),
                         key=lambda n: n.node_id)
        if not allowed:
            return None
        if self.kv_index is not None and hint is not None:
            return kv_routing.choose(self._overlap(hint, allowed), hint.key, allowed,
                                     self.in_flight, self.spill)
        if self.keyed and hint is not None and hint.key is not None:
            return prefix_routing.choose(hint.key, allowed, self.in_flight, self.spill)
        turn = self._turn.get(model, 0)
        self._turn[model] = turn + 1
        if self.strategy == "round_robin":
            return allowed[turn % len(allowed)]
        # Ties go round robin too, so equal nodes share the work.
        rotated = allowed[turn % len(allowed):] + allowed[:turn % len(allowed)]
        if self.strategy == "least_connections":
            return min(rotated, key=lambda n: self.in_flight.get(n.node_id, 0))
        if self.strategy == "least_latency":
            return min(rotated, key=lambda n: self.latency.get(n.node_id, 0.0))
        return min(rotated, key=lambda n: (n.waiting, round(n.kv_cache_usage, 2), n.running))

    def _overlap(self, hint: RouteHint, nodes: Sequence[NodeView]) -> dict[str, int]:
        index = self.kv_index
        if index is None or hint.blocks is None:
            return {}
        by_size: dict[int, list[str]] = {}
        for n in nodes:
            size = index.block_size(n.node_id)
            if size:
                by_size.setdefault(size, []).append(n.node_id)
        overlap: dict[str, int] = {}
        for size, ids in by_size.items():  # one size, unless the fleet mixes engines
            overlap.update(index.overlaps(hint.blocks(size), ids))
        return overlap

    def started(self, node_id: str, now: float) -> None:
        self.in_flight[node_id] = self.in_flight.get(node_id, 0) + 1
        self.breaker.started(node_id, now)

    def finished(self, node_id: str, *, ok: bool, latency: float | None,
                 now: float) -> CircuitState:
        self._leave(node_id)
        if ok and latency is not None:
            previous = self.latency.get(node_id)
            self.latency[node_id] = latency if previous is None else \
                previous + self.LATENCY_SMOOTHING * (latency - previous)
        return self.breaker.record(node_id, ok, now)

    def abandoned(self, node_id: str) -> None:
        """Started, then cut off before any outcome: neither a success nor a failure."""
        self._leave(node_id)
        self.breaker.abandoned(node_id)

    def _leave(self, node_id: str) -> None:
        left = self.in_flight.get(node_id, 1) - 1
        if left > 0:
            self.in_flight[node_id] = left
        else:
            self.in_flight.pop(node_id, None)

    def forget(self, node_id: str) -> None:
        if self.kv_index is not None:
            self.kv_index.forget(node_id)
        self.in_flight.pop(node_id, None)
        self.latency.pop(node_id, None)
        self.breaker.forget(node_id)
