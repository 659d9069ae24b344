"""Precise prefix-cache routing (issue 15, `kv_aware`): the node that already holds most of a
prompt's leading blocks, as its own KV events told the gateway (kv_index), weighed against
its load. Pure.

Like NVIDIA Dynamo's KV router, a node's score is ``2 x overlap - KV cache usage - load``:
`overlap` is the share of the prompt's cached blocks the node holds (relative to the best
node's, so 1 for the best), KV usage is its last heartbeat's, and load is its requests in
flight here plus those its heartbeat said were waiting, over the bound below. As in
`prefix_aware`, no node takes more than ``(1 + spill) x`` the average load, so one hot prefix
cannot melt a node: its later requests spill to the next best holder (which then caches it
too). When no candidate holds the prompt's first block (the index is cold, or the prompt is
new), the choice is `prefix_aware`'s, so the gateways agree where a new prefix goes, and the
node they pick is the one whose events will tell them so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from services.gateway import prefix_routing
from services.gateway.nodes import NodeView


def choose(overlap: Mapping[str, int], key: bytes | None, nodes: Sequence[NodeView],
           in_flight: Mapping[str, int], spill: float) -> NodeView:
    """The node for a prompt among `nodes` (not empty, sorted by id): `overlap` holds how
    many leading blocks each node caches, `key` its prefix_routing key (None: nothing to
    keep together)."""
    loads = {n.node_id: in_flight.get(n.node_id, 0) + n.waiting for n in nodes}
    bound = math.ceil((sum(loads.values()) + 1) / len(nodes) * (1 + spill))
    under = [n for n in nodes if loads[n.node_id] + 1 <= bound]
    best = max((overlap.get(n.node_id, 0) for n in under), default=0)
    if best == 0:
        if key is not None:
            return prefix_routing.choose(key, nodes, in_flight, spill)
        return min(nodes, key=lambda n: (loads[n.node_id], n.kv_cache_usage))

    def score(n: NodeView) -> tuple[float, bytes]:
        value = (2 * overlap.get(n.node_id, 0) / best - n.kv_cache_usage
                 - loads[n.node_id] / bound)
        # Equal scores: the order every gateway agrees on.
        return value, prefix_routing.rank(key or b"", n.node_id)

    return max(under, key=score)
