"""How many nodes a deployment wants, from the load its nodes report. Pure.

Pressure (requests waiting in vLLM's queues, or KV caches nearly full) sustained for
`up_delay` adds a node; idleness sustained for `down_delay` removes one. The two delays differ
(scale up fast, down slowly) and each change restarts the clock, so the fleet does not flap.
While a node is on its way (`pending`: launched, not serving yet) pressure adds nothing: a GPU
node takes minutes to come up, and until it serves, the pressure says nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeLoad:
    waiting: float
    running: float
    kv_cache_usage: float


@dataclass(frozen=True)
class ScalePolicy:
    waiting_per_node_high: float = 2.0
    """Average requests waiting per serving node that counts as pressure."""
    kv_cache_high: float = 0.85
    running_per_node_low: float = 0.5
    """Average running requests per node below which (with nothing waiting) it is idle."""
    up_delay: float = 30.0
    down_delay: float = 300.0


@dataclass
class ScaleMemory:
    pressure_since: float | None = None
    idle_since: float | None = None
    desired: int | None = None


@dataclass(frozen=True)
class ScaleDecision:
    desired: int
    reason: str = ""
    memory: ScaleMemory = field(default_factory=ScaleMemory)


def _clamp(n: int, low: int, high: int) -> int:
    return max(low, min(high, n))


def decide_scale(*, min_nodes: int, max_nodes: int, serving: int, loads: list[NodeLoad],
                 memory: ScaleMemory, now: float, policy: ScalePolicy,
                 pending: int = 0) -> ScaleDecision:
    """`serving` is how many nodes serve now, `loads` their latest heartbeats; `pending` how
    many more are launched but not serving yet."""
    desired = _clamp(memory.desired if memory.desired is not None else max(serving, min_nodes),
                     min_nodes, max_nodes)
    mem = ScaleMemory(memory.pressure_since, memory.idle_since, desired)
    if not loads:
        mem.pressure_since = mem.idle_since = None
        return ScaleDecision(desired, "", mem)
    n = len(loads)
    waiting = sum(x.waiting for x in loads) / n
    running = sum(x.running for x in loads) / n
    kv = max(x.kv_cache_usage for x in loads)
    pressure = waiting >= policy.waiting_per_node_high or kv >= policy.kv_cache_high
    idle = waiting == 0 and running < policy.running_per_node_low
    if pressure and pending > 0:
        mem.idle_since = None
        mem.pressure_since = now  # the clock starts again once the new capacity serves
    elif pressure:
        mem.idle_since = None
        mem.pressure_since = mem.pressure_since if mem.pressure_since is not None else now
        if now - mem.pressure_since >= policy.up_delay and desired < max_nodes:
            mem.desired = desired + 1
            mem.pressure_since = now  # a new node needs time to help before another
            return ScaleDecision(mem.desired, f"pressure: {waiting:.1f} waiting per node, "
                                              f"KV cache {kv:.0%}", mem)
    elif idle:
        mem.pressure_since = None
        mem.idle_since = mem.idle_since if mem.idle_since is not None else now
        if now - mem.idle_since >= policy.down_delay and desired > min_nodes:
            mem.desired = desired - 1
            mem.idle_since = now
            return ScaleDecision(mem.desired, f"idle: {running:.1f} running per node", mem)
    else:
        mem.pressure_since = mem.idle_since = None
    return ScaleDecision(desired, "", mem)
