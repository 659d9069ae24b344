"""The limiter's record of unreachable Redis primaries (ratelimit/outages.py): per primary, so
one primary's failover leaves the others' tenants exact."""

from __future__ import annotations

from services.gateway.ratelimit.outages import Outages


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_redis_is_one_record() -> None:
    clock = Clock()
    outages = Outages(cooldown=1.0, policy="local", clock=clock)
    a, b = outages.of("ratelimit:key:a:minute:{t1}"), outages.of("ratelimit:key:b:minute:{t2}")
    assert a is b and not outages.degraded
    outages.failed(a, ConnectionError("refused"))
    assert outages.degraded and outages.is_down("anything")
    assert outages.admit(a) is None  # cooling down: skip Redis
    clock.now += 1.0
    assert outages.admit(a) is True  # the probe
    assert outages.admit(a) is None  # one probe at a time
    outages.done(a)
    outages.recovered(a)
    assert not outages.degraded and outages.admit(a) is False


def test_a_cluster_keeps_one_record_per_primary() -> None:
    clock = Clock()
    nodes = {"t1": "10.0.0.1:7000", "t2": "10.0.0.2:7001"}
    live = {"10.0.0.1:7000", "10.0.0.2:7001"}
    outages = Outages(cooldown=1.0, policy="local", clock=clock,
                      node_of=lambda key: nodes[key[-3:-1]],
                      live_nodes=lambda: frozenset(live))
    down, up = outages.of("k:{t1}"), outages.of("k:{t2}")
    outages.failed(down, ConnectionError("refused"))
    assert outages.is_down("other:{t1}") and not outages.is_down("other:{t2}")
    assert outages.admit(up) is False  # the other primary's tenants still go to Redis
    assert outages.degraded
    # Its replica took over: t1's slots are served elsewhere, the dead one is no primary now.
    nodes["t1"] = "10.0.0.3:7002"
    live.discard("10.0.0.1:7000")
    live.add("10.0.0.3:7002")
    assert not outages.is_down("k:{t1}")
    assert not outages.degraded
