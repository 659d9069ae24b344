"""The autoscaler's decision: pressure adds a node after `up_delay`, idleness removes one after
`down_delay`, every change restarts the clock, and nothing flaps."""

from __future__ import annotations

import itertools

import pytest

from services.orchestrator.autoscaler import (
    NodeLoad,
    ScaleDecision,
    ScaleMemory,
    ScalePolicy,
    decide_scale,
)

POLICY = ScalePolicy(waiting_per_node_high=2.0, kv_cache_high=0.85, running_per_node_low=0.5,
                     up_delay=30.0, down_delay=300.0)

BUSY = NodeLoad(waiting=5.0, running=8.0, kv_cache_usage=0.5)
"""Queues backing up: pressure."""
FULL_KV = NodeLoad(waiting=0.0, running=8.0, kv_cache_usage=0.95)
"""Nothing waiting but the KV cache nearly full: pressure."""
IDLE = NodeLoad(waiting=0.0, running=0.0, kv_cache_usage=0.0)
STEADY = NodeLoad(waiting=0.0, running=4.0, kv_cache_usage=0.4)
"""Serving comfortably: neither pressure nor idle."""


def decide(memory: ScaleMemory, now: float, loads: list[NodeLoad], *, min_nodes: int = 1,
           max_nodes: int = 5, serving: int | None = None,
           policy: ScalePolicy = POLICY) -> ScaleDecision:
    return decide_scale(min_nodes=min_nodes, max_nodes=max_nodes,
                        serving=len(loads) if serving is None else serving, loads=loads,
                        memory=memory, now=now, policy=policy)


def run(memory: ScaleMemory, times: list[float], loads: list[NodeLoad], *, min_nodes: int = 1,
        max_nodes: int = 5, serving: int | None = None) -> tuple[ScaleMemory, list[int]]:
    """Feed each decision's memory into the next call; returns the last memory and every
    desired count along the way."""
    seen = []
    for t in times:
        d = decide(memory, t, loads, min_nodes=min_nodes, max_nodes=max_nodes, serving=serving)
        memory = d.memory
        seen.append(d.desired)
    return memory, seen


# ----------------------------------------------------------------- starting point and clamping


def test_first_call_starts_from_serving() -> None:
    d = decide(ScaleMemory(), 0.0, [STEADY] * 3, min_nodes=1, max_nodes=5)
    assert d.desired == 3
    assert d.memory.desired == 3
    assert d.reason == ""


def test_first_call_never_below_min() -> None:
    d = decide(ScaleMemory(), 0.0, [STEADY], min_nodes=2, max_nodes=5, serving=0)
    assert d.desired == 2


@pytest.mark.parametrize(("remembered", "min_nodes", "max_nodes", "expected"), [
    (10, 1, 4, 4),  # max lowered under us
    (0, 2, 4, 2),   # min raised under us
    (3, 1, 4, 3),
    (3, 3, 3, 3),
])
def test_desired_is_clamped(remembered: int, min_nodes: int, max_nodes: int,
                            expected: int) -> None:
    d = decide(ScaleMemory(desired=remembered), 0.0, [STEADY], min_nodes=min_nodes,
               max_nodes=max_nodes)
    assert d.desired == expected
    assert d.memory.desired == expected


def test_serving_above_max_is_clamped() -> None:
    assert decide(ScaleMemory(), 0.0, [STEADY] * 8, max_nodes=5).desired == 5


def test_remembered_desired_wins_over_serving() -> None:
    # Nodes still launching are not serving yet: the remembered target must not shrink to it.
    d = decide(ScaleMemory(desired=4), 0.0, [STEADY], serving=1)
    assert d.desired == 4


# ----------------------------------------------------------------- no loads


def test_no_loads_keeps_desired_and_resets_clocks() -> None:
    memory = ScaleMemory(pressure_since=0.0, idle_since=5.0, desired=3)
    d = decide(memory, 1_000.0, [], serving=0)
    assert d.desired == 3
    assert d.memory == ScaleMemory(pressure_since=None, idle_since=None, desired=3)
    assert d.reason == ""


def test_no_loads_without_memory_uses_min() -> None:
    d = decide(ScaleMemory(), 0.0, [], min_nodes=2, serving=0)
    assert d.desired == 2
    assert d.memory.desired == 2


def test_no_loads_interrupts_pressure() -> None:
    memory, _ = run(ScaleMemory(desired=1), [0.0, 20.0], [BUSY])
    memory = decide(memory, 25.0, []).memory
    # Pressure is back, but the clock starts again: 29 s later is still too soon.
    d = decide(memory, 26.0, [BUSY])
    assert d.memory.pressure_since == 26.0
    assert decide(d.memory, 55.0, [BUSY]).desired == 1
    assert decide(d.memory, 56.0, [BUSY]).desired == 2


# ----------------------------------------------------------------- pressure


@pytest.mark.parametrize("load", [BUSY, FULL_KV], ids=["waiting", "kv-cache"])
def test_sustained_pressure_adds_one_node_after_up_delay(load: NodeLoad) -> None:
    d0 = decide(ScaleMemory(desired=1), 100.0, [load])
    assert d0.desired == 1
    assert d0.memory.pressure_since == 100.0
    d1 = decide(d0.memory, 129.9, [load])
    assert d1.desired == 1
    assert d1.memory.pressure_since == 100.0  # the clock keeps its start
    d2 = decide(d1.memory, 130.0, [load])
    assert d2.desired == 2
    assert d2.memory.desired == 2
    assert d2.reason.startswith("pressure")


def test_pressure_threshold_is_inclusive() -> None:
    at_waiting = NodeLoad(waiting=2.0, running=1.0, kv_cache_usage=0.0)
    at_kv = NodeLoad(waiting=0.0, running=1.0, kv_cache_usage=0.85)
    for load in (at_waiting, at_kv):
        assert decide(ScaleMemory(desired=1), 0.0, [load]).memory.pressure_since == 0.0


def test_waiting_is_averaged_per_node() -> None:
    # 3 waiting over two nodes is 1.5 each: below the threshold of 2.
    loads = [NodeLoad(3.0, 4.0, 0.3), NodeLoad(0.0, 4.0, 0.3)]
    d = decide(ScaleMemory(desired=2), 0.0, loads)
    assert d.memory.pressure_since is None
    # 4 waiting over two nodes is 2 each: pressure.
    loads = [NodeLoad(4.0, 4.0, 0.3), NodeLoad(0.0, 4.0, 0.3)]
    assert decide(ScaleMemory(desired=2), 0.0, loads).memory.pressure_since == 0.0


def test_kv_cache_uses_the_fullest_node() -> None:
    loads = [NodeLoad(0.0, 4.0, 0.9), NodeLoad(0.0, 4.0, 0.1), NodeLoad(0.0, 4.0, 0.1)]
    assert decide(ScaleMemory(desired=3), 0.0, loads).memory.pressure_since == 0.0


def test_clock_restarts_after_each_step() -> None:
    memory, seen = run(ScaleMemory(desired=1), [0.0, 30.0], [BUSY])
    assert seen == [1, 2]
    assert memory.pressure_since == 30.0
    # Right after a step, still under pressure: no second node until another up_delay.
    memory, seen = run(memory, [31.0, 45.0, 59.9], [BUSY] * 2)
    assert seen == [2, 2, 2]
    memory, seen = run(memory, [60.0], [BUSY] * 2)
    assert seen == [3]


def test_one_node_per_step_even_after_a_long_wait() -> None:
    memory = decide(ScaleMemory(desired=1), 0.0, [BUSY]).memory
    d = decide(memory, 10_000.0, [BUSY])
    assert d.desired == 2


def test_never_above_max() -> None:
    _, seen = run(ScaleMemory(desired=1), [float(t) for t in range(0, 1000, 10)], [BUSY],
                       max_nodes=3)
    assert max(seen) == 3
    assert seen[-1] == 3


def test_at_max_pressure_changes_nothing() -> None:
    d = decide(ScaleMemory(pressure_since=0.0, desired=3), 500.0, [BUSY] * 3, max_nodes=3)
    assert d.desired == 3
    assert d.reason == ""


def test_input_memory_is_not_mutated() -> None:
    memory = ScaleMemory(pressure_since=0.0, idle_since=None, desired=1)
    d = decide(memory, 30.0, [BUSY])
    assert d.desired == 2
    assert memory == ScaleMemory(pressure_since=0.0, idle_since=None, desired=1)
    assert d.memory is not memory


# ----------------------------------------------------------------- idleness


def test_sustained_idleness_removes_one_node_after_down_delay() -> None:
    d0 = decide(ScaleMemory(desired=3), 0.0, [IDLE] * 3)
    assert d0.memory.idle_since == 0.0
    assert d0.desired == 3
    # The up_delay is not enough to scale down: the down delay is longer.
    d1 = decide(d0.memory, POLICY.up_delay, [IDLE] * 3)
    assert d1.desired == 3
    d2 = decide(d1.memory, 299.9, [IDLE] * 3)
    assert d2.desired == 3
    d3 = decide(d2.memory, 300.0, [IDLE] * 3)
    assert d3.desired == 2
    assert d3.memory.idle_since == 300.0
    assert d3.reason.startswith("idle")


def test_idle_clock_restarts_after_each_step() -> None:
    _, seen = run(ScaleMemory(desired=3), [0.0, 300.0, 310.0, 599.0, 600.0], [IDLE] * 3)
    assert seen == [3, 2, 2, 2, 1]


def test_idle_needs_nothing_waiting() -> None:
    load = NodeLoad(waiting=0.5, running=0.0, kv_cache_usage=0.0)
    d = decide(ScaleMemory(desired=2), 0.0, [load] * 2)
    assert d.memory.idle_since is None
    assert d.memory.pressure_since is None


def test_idle_threshold_is_strict() -> None:
    at_low = NodeLoad(waiting=0.0, running=0.5, kv_cache_usage=0.1)
    assert decide(ScaleMemory(desired=2), 0.0, [at_low]).memory.idle_since is None
    below = NodeLoad(waiting=0.0, running=0.49, kv_cache_usage=0.1)
    assert decide(ScaleMemory(desired=2), 0.0, [below]).memory.idle_since == 0.0


def test_running_is_averaged_per_node() -> None:
    # One busy node among three quiet ones: 1.0 running on average, not idle.
    loads = [NodeLoad(0.0, 1.0, 0.1), IDLE, IDLE, IDLE]
    assert decide(ScaleMemory(desired=4), 0.0, loads).memory.idle_since == 0.0
    loads = [NodeLoad(0.0, 4.0, 0.1), IDLE, IDLE, IDLE]
    assert decide(ScaleMemory(desired=4), 0.0, loads).memory.idle_since is None


def test_never_below_min() -> None:
    _, seen = run(ScaleMemory(desired=4), [float(t) for t in range(0, 5000, 60)], [IDLE],
                       min_nodes=2)
    assert min(seen) == 2
    assert seen[-1] == 2


def test_full_kv_cache_is_not_idle() -> None:
    # Nothing waiting, little running, but the cache is full: that is pressure, not idleness.
    load = NodeLoad(waiting=0.0, running=0.0, kv_cache_usage=0.9)
    d = decide(ScaleMemory(desired=2, idle_since=0.0), 1_000.0, [load])
    assert d.desired == 2
    assert d.memory.idle_since is None
    assert d.memory.pressure_since == 1_000.0


# ----------------------------------------------------------------- no flapping


def test_pressure_resets_the_idle_clock() -> None:
    memory, _ = run(ScaleMemory(desired=3), [0.0, 290.0], [IDLE] * 3)
    assert memory.idle_since == 0.0
    d = decide(memory, 295.0, [BUSY] * 3)
    assert d.memory.idle_since is None
    assert d.memory.pressure_since == 295.0
    # Idle again just after: the down delay starts over rather than firing at 300.
    memory, seen = run(d.memory, [296.0, 300.0, 595.0], [IDLE] * 3)
    assert seen == [3, 3, 3]
    assert memory.idle_since == 296.0
    assert memory.pressure_since is None
    assert decide(memory, 596.0, [IDLE] * 3).desired == 2


def test_idleness_resets_the_pressure_clock() -> None:
    memory, _ = run(ScaleMemory(desired=1), [0.0, 25.0], [BUSY])
    d = decide(memory, 26.0, [IDLE])
    assert d.memory.pressure_since is None
    assert d.memory.idle_since == 26.0
    memory, seen = run(d.memory, [27.0, 30.0, 56.0], [BUSY])
    assert seen == [1, 1, 1]
    assert decide(memory, 57.0, [BUSY]).desired == 2


def test_mixed_state_resets_both_clocks() -> None:
    for memory in (ScaleMemory(pressure_since=0.0, desired=2),
                   ScaleMemory(idle_since=0.0, desired=2),
                   ScaleMemory(pressure_since=0.0, idle_since=0.0, desired=2)):
        d = decide(memory, 1_000.0, [STEADY] * 2)
        assert d.desired == 2
        assert d.memory == ScaleMemory(pressure_since=None, idle_since=None, desired=2)
        assert d.reason == ""


def test_brief_steady_blip_delays_scale_up() -> None:
    memory, _ = run(ScaleMemory(desired=1), [0.0, 29.0], [BUSY])
    memory = decide(memory, 29.5, [STEADY]).memory
    memory, seen = run(memory, [30.0, 59.0], [BUSY])
    assert seen == [1, 1]
    assert decide(memory, 60.0, [BUSY]).desired == 2


def test_desired_persists_across_calls() -> None:
    memory, seen = run(ScaleMemory(), [0.0, 30.0], [BUSY], serving=1)
    assert seen == [1, 2]
    # The new node is not serving yet (serving stays 1), yet the target holds at 2 whatever
    # the load does meanwhile.
    for t, loads in ((31.0, [STEADY]), (32.0, []), (33.0, [IDLE]), (34.0, [BUSY])):
        d = decide(memory, t, loads, serving=1)
        assert d.desired == 2
        memory = d.memory


# ----------------------------------------------------------------- a day in the life


def test_spike_then_quiet_goes_up_then_back_down_without_oscillation() -> None:
    min_nodes, max_nodes, step = 1, 4, 5.0
    memory = ScaleMemory()
    serving = 1
    history: list[tuple[float, int]] = []
    t = 0.0
    while t < 3_600.0:
        if t < 60.0:
            load = STEADY
        elif t < 600.0:
            load = BUSY  # a ten-minute spike
        else:
            load = IDLE
        d = decide_scale(min_nodes=min_nodes, max_nodes=max_nodes, serving=serving,
                         loads=[load] * serving, memory=memory, now=t, policy=POLICY)
        memory = d.memory
        serving = d.desired  # nodes come up at once in this simulation
        history.append((t, d.desired))
        t += step

    counts = [n for _, n in history]
    peak = counts.index(max_nodes)
    # Up to the peak it only ever rises, one node at a time; after, it only ever falls.
    rising, falling = counts[:peak + 1], counts[peak:]
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(rising))
    assert all(a - b in (0, 1) for a, b in itertools.pairwise(falling))
    assert counts[-1] == min_nodes
    # The climb: each node took an up_delay of sustained pressure (pressure starts at t=60).
    ups = [t for (_, prev), (t, n) in itertools.pairwise(history) if n > prev]
    assert ups == [90.0, 120.0, 150.0]
    # The descent: each node took a down_delay of sustained quiet (quiet starts at t=600).
    downs = [t for (_, prev), (t, n) in itertools.pairwise(history) if n < prev]
    assert downs == [900.0, 1_200.0, 1_500.0]
    changes = sum(1 for a, b in itertools.pairwise(counts) if a != b)
    assert changes == 2 * (max_nodes - min_nodes)


# ----------------------------------------------------------------- capacity on its way


def test_pressure_adds_nothing_while_a_node_is_on_its_way() -> None:
    memory = ScaleMemory(desired=2)
    # A node is launching: pressure for far longer than up_delay changes nothing …
    for t in range(0, 600, 10):
        d = decide_scale(min_nodes=1, max_nodes=5, serving=1, loads=[BUSY], memory=memory,
                         now=float(t), policy=POLICY, pending=1)
        memory = d.memory
        assert d.desired == 2
    # … and once it serves, the clock starts from then, not from the first pressure.
    d = decide_scale(min_nodes=1, max_nodes=5, serving=2, loads=[BUSY, BUSY], memory=memory,
                     now=600.0, policy=POLICY)
    assert d.desired == 2
    d = decide_scale(min_nodes=1, max_nodes=5, serving=2, loads=[BUSY, BUSY], memory=d.memory,
                     now=600.0 + POLICY.up_delay, policy=POLICY)
    assert d.desired == 3 and "pressure" in d.reason
