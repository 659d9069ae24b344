"""The gateway's node table, routing rules, strategies and circuit breaker (pure)."""

from __future__ import annotations

import uuid
from collections import Counter

import msgspec
import pytest

from schemas.events import (
    NodeAccepted,
    NodeDeregistered,
    NodeDraining,
    NodeHeartbeat,
    NodeSpotWarning,
    NodeStatus,
    NodeStatusChanged,
    NodeTerminated,
)
from services.gateway.balancer import Balancer, BreakerRules, CircuitBreaker, CircuitState
from services.gateway.nodes import ENDED_MEMORY, NodeTable, NodeView, RoutingRules, routable
from tests.helpers import node_accepted, node_registered

RULES = RoutingRules(health_threshold=50, heartbeat_timeout=60)


def accepted(node_id: uuid.UUID, *, model: str = "llama-8b",
             endpoint_url: str = "http://10.0.1.45:8000") -> NodeAccepted:
    """The monitor's acceptance of a registration of `node_id`: what makes a node routable."""
    return node_accepted(msgspec.structs.replace(node_registered(node_id, model=model),
                                                 endpoint_url=endpoint_url))


def beat(node_id: uuid.UUID, *, score: int = 100, healthy: bool = True, waiting: float = 0,
         running: float = 0, kv: float = 0.1, draining: bool = False) -> NodeHeartbeat:
    return NodeHeartbeat(node_id=node_id, sequence=1, health_score=score, vllm_healthy=healthy,
                         num_requests_waiting=waiting, num_requests_running=running,
                         kv_cache_usage=kv, draining=draining)


def table_with(*node_ids: uuid.UUID, model: str = "m") -> NodeTable:
    t = NodeTable()
    for n in node_ids:
        t.apply(accepted(n, model=model), 0)
        t.apply(beat(n), 0)
    return t


# --------------------------------------------------------------------------- node table


def test_a_registered_node_serves_once_it_heartbeats_healthy() -> None:
    n = uuid.uuid4()
    t = NodeTable()
    t.apply(accepted(n, model="m"), 0)
    assert t.candidates("m", 1, RULES) == []  # no heartbeat yet
    t.apply(beat(n), 1)
    assert [c.node_id for c in t.candidates("m", 2, RULES)] == [str(n)]
    assert t.candidates("other", 2, RULES) == []
    assert t.models() == {"m"}


def test_an_early_heartbeat_is_kept_until_acceptance() -> None:
    n = uuid.uuid4()
    t = NodeTable()
    t.apply(beat(n), 5)
    t.apply(accepted(n, model="m"), 6)
    assert t.nodes[str(n)].last_heartbeat == 5
    assert t.candidates("m", 6, RULES)


def test_an_older_heartbeat_never_undoes_a_newer_one() -> None:
    """A stored heartbeat replayed at start can arrive after a live one."""
    n = uuid.uuid4()
    t = NodeTable()
    t.apply(beat(n, score=90), 10)
    t.apply(beat(n, score=10), 4)  # early, and older: kept out
    t.apply(accepted(n, model="m"), 11)
    assert t.nodes[str(n)].health_score == 90
    t.apply(beat(n, healthy=False), 3)
    assert t.nodes[str(n)].last_heartbeat == 10 and t.nodes[str(n)].vllm_healthy
    t.apply(beat(n, score=70), 12)
    assert t.nodes[str(n)].health_score == 70


@pytest.mark.parametrize(("change", "expected"), [
    ({"score": 49}, False), ({"score": 50}, True), ({"healthy": False}, False),
    ({"draining": True}, False),
])
def test_heartbeat_content_decides(change: dict, expected: bool) -> None:
    n = uuid.uuid4()
    t = table_with(n)
    t.apply(beat(n, **change), 1)
    assert bool(t.candidates("m", 1, RULES)) is expected


def test_stale_heartbeat_takes_a_node_out() -> None:
    n = uuid.uuid4()
    t = table_with(n)
    assert t.candidates("m", 60, RULES)
    assert not t.candidates("m", 60.1, RULES)


@pytest.mark.parametrize("event_for", [
    lambda n: NodeDraining(node_id=n, reason="x"),
    lambda n: NodeSpotWarning(node_id=n, provider="aws", action="terminate"),
    lambda n: NodeStatusChanged(node_id=n, from_status=NodeStatus.ACTIVE,
                                to_status=NodeStatus.UNHEALTHY),
    lambda n: NodeStatusChanged(node_id=n, from_status=NodeStatus.ACTIVE,
                                to_status=NodeStatus.STALE),
    lambda n: NodeDeregistered(node_id=n),
    lambda n: NodeTerminated(node_id=n, reason="down"),
])
def test_lifecycle_events_take_a_node_out(event_for: object) -> None:
    n = uuid.uuid4()
    t = table_with(n)
    t.apply(event_for(n), 1)  # type: ignore[operator]
    t.apply(beat(n), 2)  # a later healthy heartbeat does not bring it back
    assert t.candidates("m", 2, RULES) == []


def test_monitor_can_bring_a_node_back_to_active() -> None:
    n = uuid.uuid4()
    t = table_with(n)
    t.apply(NodeStatusChanged(node_id=n, from_status=NodeStatus.ACTIVE,
                              to_status=NodeStatus.UNHEALTHY), 1)
    t.apply(NodeStatusChanged(node_id=n, from_status=NodeStatus.UNHEALTHY,
                              to_status=NodeStatus.ACTIVE), 2)
    assert t.candidates("m", 2, RULES)


def test_routable_rules_directly() -> None:
    v = NodeView("a", "m", "http://x", "r", last_heartbeat=0, vllm_healthy=True,
                 health_score=80)
    assert routable(v, 1, RULES)
    v.status = NodeStatus.LAUNCHING
    assert not routable(v, 1, RULES)


# --------------------------------------------------------------------------- strategies


def nodes(n: int) -> list[NodeView]:
    return [NodeView(f"n{i}", "m", f"http://n{i}", "r", last_heartbeat=0, vllm_healthy=True,
                     health_score=100) for i in range(n)]


def test_round_robin_spreads_evenly() -> None:
    b = Balancer("round_robin")
    candidates = nodes(3)
    picks = Counter(b.choose("m", candidates, 0).node_id for _ in range(300))  # type: ignore[union-attr]
    assert picks == {"n0": 100, "n1": 100, "n2": 100}


def test_least_connections_prefers_the_idle_node() -> None:
    b = Balancer("least_connections")
    candidates = nodes(3)
    b.started("n0", 0)
    b.started("n1", 0)
    assert b.choose("m", candidates, 0).node_id == "n2"  # type: ignore[union-attr]
    b.finished("n0", ok=True, latency=0.1, now=1)
    assert b.choose("m", candidates, 1).node_id in {"n0", "n2"}  # type: ignore[union-attr]
    assert b.in_flight == {"n1": 1}


def test_least_latency_measures_new_nodes_first_then_prefers_fast() -> None:
    b = Balancer("least_latency")
    candidates = nodes(2)
    b.started("n0", 0)
    b.finished("n0", ok=True, latency=0.5, now=0)
    assert b.choose("m", candidates, 0).node_id == "n1"  # type: ignore[union-attr]
    b.started("n1", 0)
    b.finished("n1", ok=True, latency=0.1, now=0)
    assert all(b.choose("m", candidates, 0).node_id == "n1"  # type: ignore[union-attr]
               for _ in range(10))
    for _ in range(30):  # n1 slows down: the moving average follows
        b.finished("n1", ok=True, latency=2.0, now=0)
    assert b.choose("m", candidates, 0).node_id == "n0"  # type: ignore[union-attr]


def test_least_load_uses_vllm_queue_then_kv_cache() -> None:
    b = Balancer("least_load")
    a, c, d = nodes(3)
    a.waiting, c.waiting, d.waiting = 3, 0, 0
    c.kv_cache_usage, d.kv_cache_usage = 0.9, 0.2
    assert b.choose("m", [a, c, d], 0).node_id == "n2"  # type: ignore[union-attr]


def test_exclusions_and_empty() -> None:
    b = Balancer()
    candidates = nodes(2)
    assert b.choose("m", candidates, 0, exclude=frozenset({"n0"})).node_id == "n1"  # type: ignore[union-attr]
    assert b.choose("m", candidates, 0, exclude=frozenset({"n0", "n1"})) is None
    assert b.choose("m", [], 0) is None
    with pytest.raises(ValueError, match="unknown load-balancing strategy"):
        Balancer("random")


# --------------------------------------------------------------------------- circuit breaker


def test_breaker_opens_over_the_error_rate_with_enough_requests() -> None:
    cb = CircuitBreaker(BreakerRules(error_rate=0.5, min_requests=10, window=30, cooldown=10))
    for i in range(9):
        assert cb.record("n", False, i * 0.1) is CircuitState.CLOSED  # too few to judge
    assert cb.record("n", False, 1) is CircuitState.OPEN
    assert not cb.allow("n", 5)


def test_breaker_needs_more_than_half_errors() -> None:
    cb = CircuitBreaker(BreakerRules(min_requests=10))
    for i in range(20):
        assert cb.record("n", i % 2 == 0, i * 0.1) is CircuitState.CLOSED  # exactly 50%
    assert cb.allow("n", 3)


def test_breaker_forgets_outcomes_outside_the_window() -> None:
    cb = CircuitBreaker(BreakerRules(min_requests=10, window=30))
    for i in range(9):
        cb.record("n", False, i)
    assert cb.record("n", False, 100) is CircuitState.CLOSED  # the old nine expired


def test_half_open_lets_one_probe_through_and_decides() -> None:
    cb = CircuitBreaker(BreakerRules(min_requests=2, cooldown=10))
    cb.record("n", False, 0)
    cb.record("n", False, 0)
    assert cb.state("n", 9.9) is CircuitState.OPEN
    assert cb.state("n", 10) is CircuitState.HALF_OPEN
    assert cb.allow("n", 10)
    cb.started("n", 10)
    assert not cb.allow("n", 10.1)  # one probe at a time
    assert cb.record("n", False, 11) is CircuitState.OPEN  # probe failed: open again
    assert not cb.allow("n", 20.9)
    assert cb.allow("n", 21)
    cb.started("n", 21)
    assert cb.record("n", True, 21.5) is CircuitState.CLOSED
    assert cb.allow("n", 21.6)


def test_balancer_skips_open_circuits() -> None:
    b = Balancer("round_robin", CircuitBreaker(BreakerRules(min_requests=2, cooldown=10)))
    candidates = nodes(2)
    for _ in range(2):
        b.started("n0", 0)
        b.finished("n0", ok=False, latency=None, now=0)
    assert {b.choose("m", candidates, 1).node_id for _ in range(10)} == {"n1"}  # type: ignore[union-attr]


def test_an_abandoned_request_frees_its_slot_and_a_probe_that_never_finished() -> None:
    b = Balancer("least_connections",
                 CircuitBreaker(BreakerRules(min_requests=2, cooldown=10)))
    for _ in range(2):
        b.started("n0", 0)
        b.finished("n0", ok=False, latency=None, now=0)
    assert b.breaker.state("n0", 10) is CircuitState.HALF_OPEN
    b.started("n0", 10)  # the probe …
    assert not b.breaker.allow("n0", 10.5)
    b.abandoned("n0")  # … is cut off by a timeout: no verdict either way
    assert b.in_flight == {}
    assert b.breaker.state("n0", 11) is CircuitState.HALF_OPEN
    assert b.breaker.allow("n0", 11)  # the next request probes
    b.started("n0", 11)
    assert b.finished("n0", ok=True, latency=0.1, now=11.5) is CircuitState.CLOSED


def test_a_node_leaving_is_reported_once_and_a_seed_never_overrides_events() -> None:
    gone: list[str] = []
    t = NodeTable(on_removed=gone.append)
    a, b = uuid.uuid4(), uuid.uuid4()
    t.apply(accepted(a, model="m"), 0)
    t.seed(NodeView(str(a), "other", "http://stale", "r"))  # events win
    assert t.nodes[str(a)].model == "m"
    t.seed(NodeView(str(b), "m", "http://b", "r", status=NodeStatus.ACTIVE))
    t.seed(NodeView("dead", "m", "http://d", "r", status=NodeStatus.TERMINATED))
    assert set(t.nodes) == {str(a), str(b)}
    t.apply(beat(b), 1)
    assert [c.node_id for c in t.candidates("m", 1, RULES)] == [str(b)]
    t.apply(NodeTerminated(node_id=a, reason="x"), 2)
    t.apply(NodeTerminated(node_id=a, reason="again"), 3)
    t.apply(NodeStatusChanged(node_id=b, from_status=NodeStatus.ACTIVE,
                              to_status=NodeStatus.FAILED), 4)
    assert gone == [str(a), str(b)] and t.nodes == {}


def test_a_registration_again_leaves_a_serving_node_serving() -> None:
    """An agent that did not hear its acknowledgment registers again: same node."""
    n = uuid.uuid4()
    t = table_with(n)
    t.apply(NodeStatusChanged(node_id=n, from_status=NodeStatus.REGISTERED,
                              to_status=NodeStatus.ACTIVE), 1)
    t.apply(accepted(n, model="m"), 2)
    assert [c.node_id for c in t.candidates("m", 2, RULES)] == [str(n)]
    assert t.nodes[str(n)].status is NodeStatus.ACTIVE


def test_a_raw_registration_never_creates_a_node() -> None:
    """Only the monitor's `node.accepted` does: a registration is an agent's word."""
    n = uuid.uuid4()
    t = NodeTable()
    t.apply(beat(n), 0)
    t.apply(node_registered(n, model="m"), 1)
    assert t.nodes == {} and t.candidates("m", 1, RULES) == []
    t.apply(accepted(n, model="m"), 2)
    assert [c.node_id for c in t.candidates("m", 2, RULES)] == [str(n)]


def test_a_raw_registration_never_re_points_a_node() -> None:
    n = uuid.uuid4()
    t = NodeTable()
    t.apply(accepted(n, model="m", endpoint_url="http://10.0.0.1:8000"), 0)
    t.apply(beat(n), 0)
    attacker = msgspec.structs.replace(node_registered(n, model="other"),
                                       endpoint_url="http://evil.example:8000")
    t.apply(attacker, 1)
    node = t.nodes[str(n)]
    assert (node.endpoint_url, node.model) == ("http://10.0.0.1:8000", "m")
    assert [c.node_id for c in t.candidates("m", 1, RULES)] == [str(n)]


ENDINGS = [
    lambda n: NodeTerminated(node_id=n, reason="down"),
    lambda n: NodeDeregistered(node_id=n),
    lambda n: NodeStatusChanged(node_id=n, from_status=NodeStatus.ACTIVE,
                                to_status=NodeStatus.FAILED),
    lambda n: NodeStatusChanged(node_id=n, from_status=NodeStatus.DRAINING,
                                to_status=NodeStatus.TERMINATED),
]


@pytest.mark.parametrize("end_for", ENDINGS, ids=["terminated", "deregistered", "failed",
                                                  "status-terminated"])
def test_a_node_that_ended_is_never_accepted_again(end_for: object) -> None:
    """An acceptance replayed from the stream (or relayed late) after the node's end, and
    the heartbeats still in flight, bring nothing back."""
    n = uuid.uuid4()
    t = table_with(n)
    t.apply(end_for(n), 1)  # type: ignore[operator]
    assert t.ended(str(n))
    t.apply(beat(n), 2)
    t.apply(accepted(n, model="m"), 3)
    t.apply(beat(n), 4)
    assert t.nodes == {} and t.candidates("m", 4, RULES) == []


@pytest.mark.parametrize("end_for", ENDINGS, ids=["terminated", "deregistered", "failed",
                                                  "status-terminated"])
def test_an_end_heard_before_the_acceptance_keeps_the_node_out(end_for: object) -> None:
    """The agent's own farewell goes on NATS at once; the monitor's acceptance comes through
    the log and the relay, and can arrive after it. A heartbeat kept from before the end is
    dropped with it."""
    n = uuid.uuid4()
    t = NodeTable()
    t.apply(beat(n), 0)
    t.apply(end_for(n), 1)  # type: ignore[operator]
    t.apply(accepted(n, model="m"), 2)
    t.apply(beat(n), 3)
    assert t.nodes == {} and t.candidates("m", 3, RULES) == []


def test_a_seed_of_a_node_seen_ending_is_not_a_node() -> None:
    n = uuid.uuid4()
    t = NodeTable()
    t.apply(NodeTerminated(node_id=n, reason="down"), 0)
    t.seed(NodeView(str(n), "m", "http://x", "r", status=NodeStatus.ACTIVE))
    assert t.nodes == {}


def test_the_memory_of_ended_nodes_is_bounded_and_forgets_the_oldest() -> None:
    assert ENDED_MEMORY == 100_000
    t = NodeTable(ended_memory=3)
    ids = [uuid.uuid4() for _ in range(4)]
    for i, n in enumerate(ids):
        t.apply(NodeTerminated(node_id=n, reason="down"), i)
    t.apply(NodeDeregistered(node_id=ids[1]), 5)  # ended again: still one entry
    assert [t.ended(str(n)) for n in ids] == [False, True, True, True]
    t.apply(accepted(ids[0], model="m"), 6)  # forgotten: taken as any acceptance
    assert set(t.nodes) == {str(ids[0])}


def test_a_seed_without_an_address_is_not_a_node() -> None:
    """A projection row with no endpoint (a launch whose registration was never accepted)
    never becomes routable, whatever status it reached."""
    t = NodeTable()
    n = uuid.uuid4()
    t.seed(NodeView(str(n), "m", "", "r", status=NodeStatus.ACTIVE))
    t.apply(beat(n), 1)
    assert t.nodes == {} and t.candidates("m", 1, RULES) == []


def test_a_node_that_refuses_a_connection_is_out_at_once_until_a_probe() -> None:
    breaker = CircuitBreaker()
    breaker.trip("dead", 100.0)
    assert breaker.state("dead", 100.0) is CircuitState.OPEN and not breaker.allow("dead", 101)
    later = 100.0 + breaker.rules.cooldown
    assert breaker.state("dead", later) is CircuitState.HALF_OPEN  # one probe decides
    assert breaker.record("dead", True, later) is CircuitState.CLOSED
