"""The gateway's own metrics, with the reference document's names. Labels stay bounded: model,
node (the fleet), tenant (the customers) and reasons from a fixed set — never a key, a request
id or a raw path."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.lb_requests = Counter("loadbalancer_requests_total",
                                   "Requests sent to a node", ["model", "node"],
                                   registry=registry)
        self.lb_latency = Histogram("loadbalancer_latency_seconds",
                                    "Upstream latency to a node (whole answer or stream)",
                                    ["model", "node"], buckets=LATENCY_BUCKETS,
                                    registry=registry)
        self.lb_errors = Counter("loadbalancer_errors_total", "Upstream failures by node",
                                 ["model", "node", "reason"], registry=registry)
        self.no_node = Counter("loadbalancer_no_node_total",
                               "Requests refused because no node serves the model", ["model"],
                               registry=registry)
        self.tokens = Counter("tokens_processed_total", "Tokens metered (prompt + completion)",
                              ["model", "tenant_id"], registry=registry)
        self.retries = Counter("gateway_upstream_retries_total",
                               "Requests retried on another node before any byte was sent",
                               registry=registry)
        self.disconnects = Counter("gateway_client_disconnects_total",
                                   "Clients that went away mid-stream", registry=registry)
        self.budget_limited = Counter(
            "budget_limited_requests_total",
            "Requests admitted with what was left of a spend budget, their output limit "
            "lowered to what it pays for (the node ends them there)", ["endpoint"],
            registry=registry)
        self.resumed = Counter(
            "gateway_resumed_requests_total",
            "Requests that went on on another node after theirs failed, by why (dropped, "
            "chunk_timeout, node_leaving, http_5xx, …)", ["reason"], registry=registry)
        self.resume_tokens = Counter(
            "gateway_resume_tokens_total",
            "Prompt tokens the nodes prefilled again to resume requests: the platform's cost, "
            "never on a bill", registry=registry)
        self.kv_events = Counter(
            "gateway_kv_events_total",
            "Nodes' KV cache event messages read for kv_aware routing, by outcome "
            "(applied, unknown_node, undecodable)", ["outcome"], registry=registry)
        self.kv_index_blocks = Gauge(
            "gateway_kv_index_blocks", "Distinct prompt blocks the kv_aware index knows a "
            "holder of", registry=registry)
        self._children: dict[tuple[str, ...], Any] = {}

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set: this runs per request."""
        key = (metric._name, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def forget_node(self, node_id: str) -> None:
        """A node left the fleet: its series go, so the label set stays the fleet's size."""
        per_node = {m._name: m for m in (self.lb_requests, self.lb_latency, self.lb_errors)}
        for key in [k for k in self._children if k[0] in per_node and k[2] == node_id]:
            del self._children[key]
            per_node[key[0]].remove(*key[1:])
