"""Feeding the kv_aware index from the nodes' KV cache events (``node.kv_events.<node id>``,
core NATS, relayed by each node's agent; every gateway needs all, so no queue group).

The subject names the sender (NATS lets a node publish only on its own), and only a node in
the table that is not draining is believed: events from a node that left, or was never
accepted, are dropped, so nothing can put a node the gateway does not route to in the index.
What does not decode as vLLM's batch is dropped and counted. A ``Kv-Seq`` that goes back
means the node's engine restarted: what the index held for it is forgotten first.
"""

from __future__ import annotations

import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.kv_events import KvEventDecodeError, decode_batch
from schemas.subjects import KV_SEQ_HEADER, NODE_KV_EVENTS
from services.gateway.kv_index import KvIndex
from services.gateway.metrics import GatewayMetrics
from services.gateway.nodes import NodeTable
from services.infra.bus import Bus

log = structlog.get_logger("kv_feed")


class KvFeed:
    def __init__(self, bus: Bus, table: NodeTable, index: KvIndex,
                 metrics: GatewayMetrics) -> None:
        self.bus = bus
        self.table = table
        self.index = index
        self.metrics = metrics
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.bus.nc.subscribe(f"{NODE_KV_EVENTS}.*", cb=self.on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # closing anyway: nothing to do about it
                log.debug("unsubscribe failed", error=str(exc))
            self._sub = None

    async def on_msg(self, msg: Msg) -> None:
        self.apply(msg.subject, msg.data, msg.headers or {})

    def apply(self, subject: str, data: bytes, headers: dict[str, str]) -> str:
        """One message; returns its outcome (the metric's label)."""
        outcome = self._apply(subject, data, headers)
        self.metrics.kv_events.labels(outcome).inc()
        return outcome

    def _apply(self, subject: str, data: bytes, headers: dict[str, str]) -> str:
        node_id = subject.rsplit(".", 1)[-1]
        node = self.table.nodes.get(node_id)
        if node is None or node.draining:
            return "unknown_node"
        try:
            batch = decode_batch(data)
        except KvEventDecodeError:
            return "undecodable"
        seq = headers.get(KV_SEQ_HEADER, "")
        if seq.isdigit() and not self.index.sequence(node_id, int(seq)):
            log.info("node's kv cache restarted; forgot its blocks", node_id=node_id)
        self.index.apply(node_id, batch.events)
        return "applied"
