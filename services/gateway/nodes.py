"""The gateway's in-memory view of the GPU nodes, kept current from node events and heartbeats.

Pure: `NodeTable.apply(event, now)` folds one event in; `routable(...)` decides who may take a
request. No Postgres on the hot path: the table is fed from NATS (see node_feed.py).

A node enters the table only from a ``node.accepted`` (the monitor checked that the
orchestrator launched it, that it is live, and settled its address), and its `endpoint_url`
comes only from there: a ``node.registered`` is an agent's word, which a leaked node
credential could make say anything, so it creates and re-points nothing.

A node that has ended never comes back: the table remembers the ids of the last
`ENDED_MEMORY` nodes that ended and ignores a later ``node.accepted`` or heartbeat for them
(an acceptance relayed after the agent's own farewell reached us, a stream replayed at start,
a heartbeat still in flight), which would otherwise put a dead node back in rotation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from schemas.events import (
    Event,
    NodeAccepted,
    NodeDeregistered,
    NodeDraining,
    NodeHeartbeat,
    NodeSpotWarning,
    NodeStatus,
    NodeStatusChanged,
    NodeTerminated,
)

ROUTABLE_STATUSES = frozenset({NodeStatus.REGISTERED, NodeStatus.ACTIVE})
"""REGISTERED counts until the monitor says ACTIVE: a registered node that heartbeats healthy
can serve; the monitor's later status changes (unhealthy, stale, draining) take it out."""


@dataclass
class NodeView:
    node_id: str
    model: str
    endpoint_url: str
    region: str
    status: NodeStatus = NodeStatus.REGISTERED
    health_score: int = 0
    vllm_healthy: bool = False
    draining: bool = False
    last_heartbeat: float | None = None
    """Monotonic time the last heartbeat arrived."""
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    leave_by: float | None = None
    """When a draining node goes (Unix time, from its spot notice or drain): streams on it
    move to another node before then."""


@dataclass(frozen=True)
class RoutingRules:
    health_threshold: int = 50
    heartbeat_timeout: float = 60.0


def routable(node: NodeView, now: float, rules: RoutingRules) -> bool:
    return (node.status in ROUTABLE_STATUSES
            and not node.draining
            and node.vllm_healthy
            and node.health_score >= rules.health_threshold
            and node.last_heartbeat is not None
            and now - node.last_heartbeat <= rules.heartbeat_timeout)


FINAL_STATUSES = frozenset({NodeStatus.TERMINATED, NodeStatus.FAILED})

ENDED_MEMORY = 100_000
"""How many ended nodes' ids the table remembers (about 12 MB): more than a fleet ends in the
NODES stream's lifetime, whose replay is where an old acceptance comes from."""


class NodeTable:
    def __init__(self, on_removed: Callable[[str], None] | None = None, *,
                 ended_memory: int = ENDED_MEMORY,
                 on_draining: Callable[[str], None] | None = None) -> None:
        self.nodes: dict[str, NodeView] = {}
        self._ended: dict[str, None] = {}
        """Ids of nodes that ended, oldest first (a dict keeps insertion order)."""
        self._ended_memory = ended_memory
        # A heartbeat can overtake its node's acceptance (different subjects, a gateway
        # replaying the acceptances at start): keep the latest until the node is known.
        self._early: dict[str, tuple[NodeHeartbeat, float]] = {}
        self._on_removed = on_removed
        """Told the id of each node that leaves the table, so what is kept per node
        elsewhere (circuits, metric series) goes with it."""
        self._on_draining = on_draining
        """Told the id of a node when it starts draining (it takes no new request)."""

    def seed(self, node: NodeView) -> None:
        """A node known from the `nodes` projection at start: its registration may be older
        than the NODES stream keeps. Events, replayed or live, win over it. Only a node with
        an address: the projection has one only from a registration the monitor recorded,
        which it does only when it accepts it."""
        if node.status not in FINAL_STATUSES and node.endpoint_url \
                and node.node_id not in self._ended:
            self.nodes.setdefault(node.node_id, node)

    def ended(self, node_id: str) -> bool:
        """Whether the table saw `node_id` end (among the last `ended_memory` that did)."""
        return node_id in self._ended

    def _end(self, node_id: str) -> None:
        self._early.pop(node_id, None)
        if node_id not in self._ended:
            self._ended[node_id] = None
            if len(self._ended) > self._ended_memory:
                del self._ended[next(iter(self._ended))]
        if self.nodes.pop(node_id, None) is not None and self._on_removed is not None:
            self._on_removed(node_id)

    def apply(self, event: Event, now: float) -> None:
        match event:
            case NodeHeartbeat():
                # `now` is when the beat was sent, more or less: a stored one replayed at
                # start may arrive after a live, newer one, and must not undo it.
                node = self.nodes.get(str(event.node_id))
                if node is None and self.ended(str(event.node_id)):
                    return  # kept as early, it would bring the node back with an acceptance
                if node is None:
                    early = self._early.get(str(event.node_id))
                    if early is None or early[1] <= now:
                        self._early[str(event.node_id)] = (event, now)
                elif node.last_heartbeat is None or node.last_heartbeat <= now:
                    was_draining = node.draining
                    _beat(node, event, now)
                    if node.draining and not was_draining:
                        self._drained(node.node_id)
            case NodeAccepted():
                key = str(event.node_id)
                if self.ended(key):
                    return
                known = self.nodes.get(key)
                if known is not None:
                    # Accepted again (an agent restarted, or asking anew for its ack): the
                    # same node, still serving; what its heartbeats and the monitor said
                    # stands.
                    known.model, known.endpoint_url, known.region = \
                        event.model_name, event.endpoint_url, event.region
                    return
                node = NodeView(key, event.model_name, event.endpoint_url, event.region)
                self.nodes[key] = node
                early = self._early.pop(key, None)
                if early is not None:
                    _beat(node, *early)
            case NodeStatusChanged():
                if event.to_status in FINAL_STATUSES:
                    self._end(str(event.node_id))  # known here or not: it must not come back
                    return
                node = self.nodes.get(str(event.node_id))
                if node is not None:
                    node.status = event.to_status
            case NodeDraining() | NodeSpotWarning():
                node = self.nodes.get(str(event.node_id))
                if node is not None:
                    node.draining = True
                    node.status = NodeStatus.DRAINING
                    if event.deadline is not None:
                        at = event.deadline.timestamp()
                        node.leave_by = at if node.leave_by is None else min(node.leave_by, at)
                    self._drained(node.node_id)
            case NodeDeregistered() | NodeTerminated():
                self._end(str(event.node_id))

    def _drained(self, node_id: str) -> None:
        if self._on_draining is not None:
            self._on_draining(node_id)

    def candidates(self, model: str, now: float, rules: RoutingRules) -> list[NodeView]:
        return [n for n in self.nodes.values() if n.model == model and routable(n, now, rules)]

    def models(self) -> set[str]:
        return {n.model for n in self.nodes.values()}


def _beat(node: NodeView, hb: NodeHeartbeat, now: float) -> None:
    node.last_heartbeat = now
    node.health_score = hb.health_score
    node.vllm_healthy = hb.vllm_healthy
    node.draining = node.draining or hb.draining
    node.running = hb.num_requests_running or 0.0
    node.waiting = hb.num_requests_waiting or 0.0
    node.kv_cache_usage = hb.kv_cache_usage or 0.0
