"""Redis Cluster routing (services/infra/cluster_slots.py) and the limiter's key layout: every
key one request's script touches is in its tenant's slot."""

from __future__ import annotations

import pytest

from services.gateway.ratelimit.limits import BudgetCap, Layer, Limits, LimitSubject
from services.gateway.ratelimit.planning import plan, redis_key, usage_plan
from services.infra.cluster_slots import SLOTS, Address, SlotMap, key_slot, redirect
from services.infra.pipelined_cluster import parse_seeds

EVERY_LAYER = Limits(key_requests_per_minute=1, environment_requests_per_minute=2,
                     tenant_requests_per_minute=3, global_requests_per_minute=4,
                     key_tokens_per_minute=5, key_tokens_per_day=6,
                     environment_tokens_per_minute=7, environment_tokens_per_day=8,
                     key_concurrency=9,
                     budgets=(BudgetCap(Layer.KEY_BUDGET, 10, 1),
                              BudgetCap(Layer.ENVIRONMENT_BUDGET, 11, 1),
                              BudgetCap(Layer.TENANT_BUDGET, 12, 1)))


def test_slots_are_redis_clusters() -> None:
    # Values from Redis's own CLUSTER KEYSLOT.
    assert key_slot("foo") == 12182
    assert key_slot("123456789") == 12739
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers") == \
        key_slot("user1000")
    assert key_slot("foo{}{bar}") == key_slot("foo{}{bar}")  # an empty tag: the whole key
    assert key_slot("foo{}{bar}") != key_slot("bar")
    assert key_slot(b"foo") == key_slot("foo")


def test_every_key_of_a_request_is_in_its_tenants_slot() -> None:
    subject = LimitSubject("key-1", "env-1", "tenant-1")
    checks = [c for c in plan(subject, EVERY_LAYER, 100, 5, 1)
              if c.layer is not Layer.GLOBAL_REQUESTS]
    assert {c.layer for c in checks} == set(Layer) - {
        Layer.GLOBAL_REQUESTS, Layer.KEY_USAGE_REQUESTS, Layer.USAGE_REPORTS_IN_FLIGHT,
        Layer.UNAVAILABLE}
    keys = [c.key for c in checks] + [c.key for c in usage_plan(subject, 60)]
    assert {key_slot(k) for k in keys} == {key_slot("tenant-1")}
    # The reference's names, each followed by the tenant's tag.
    assert redis_key(Layer.KEY_REQUESTS, subject) == "ratelimit:key:key-1:minute:{tenant-1}"
    assert redis_key(Layer.GLOBAL_REQUESTS, subject) == "ratelimit:global:minute"


def test_tenants_spread_over_the_slots() -> None:
    slots = {key_slot(redis_key(Layer.KEY_REQUESTS, LimitSubject("k", "e", f"t{i}")))
             for i in range(1000)}
    assert len(slots) > 950


def cluster_slots_reply() -> list[object]:
    return [[0, 5460, [b"10.0.0.1", 7000, b"id-a"], [b"10.0.0.4", 7003, b"id-d"]],
            [5461, 10922, [b"", 7001, b"id-b"]],
            [10923, 16383, [b"10.0.0.3", 7002, b"id-c"]]]


def test_a_slot_map_from_cluster_slots() -> None:
    asked = Address("10.0.0.2", 7001)
    slots = SlotMap.from_cluster_slots(cluster_slots_reply(), asked=asked)
    assert slots.covers_all()
    assert slots.node_for(0) == slots.node_for(5460) == Address("10.0.0.1", 7000)
    assert slots.node_for(5461) == asked  # no host reported: the one asked
    assert slots.node_for(16383) == Address("10.0.0.3", 7002)
    assert len(slots.primaries) == 3
    moved = slots.moved(42, Address("10.0.0.9", 7009))
    assert moved.node_for(42) == Address("10.0.0.9", 7009)
    assert moved.node_for(43) == slots.node_for(42) == Address("10.0.0.1", 7000)
    partial = SlotMap.from_cluster_slots(cluster_slots_reply()[:2], asked=asked)
    assert not partial.covers_all() and partial.node_for(SLOTS - 1) is None
    with pytest.raises(ValueError, match="bad slot range"):
        SlotMap.from_cluster_slots([[5, 3, [b"h", 1]]], asked=asked)


def test_redirects() -> None:
    moved = redirect("MOVED 3999 127.0.0.1:6381", default_host="x")
    assert moved is not None and moved.moved and moved.slot == 3999
    assert moved.to == Address("127.0.0.1", 6381)
    ask = redirect("ASK 3999 :6381", default_host="10.1.1.1")
    assert ask is not None and not ask.moved and ask.to == Address("10.1.1.1", 6381)
    assert redirect("CROSSSLOT Keys in request don't hash to the same slot",
                    default_host="x") is None
    assert redirect("MOVED x y", default_host="x") is None


def test_cluster_urls() -> None:
    assert parse_seeds("redis://a:7000,b:7001") == ("", [Address("a", 7000),
                                                         Address("b", 7001)])
    assert parse_seeds("redis+cluster://user:pw@a:7000/0") == ("user:pw", [Address("a", 7000)])
    with pytest.raises(ValueError, match="database 0 only"):
        parse_seeds("redis://a:7000/3")
    with pytest.raises(ValueError, match="starts redis://"):
        parse_seeds("http://a:7000")
