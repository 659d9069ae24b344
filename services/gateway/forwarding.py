"""What the proxy and its stream relay share: how far a forwarded request got, what it ended
with, the failures that end it, the proxy's settings, and the bookkeeping of a node's outcome
(its metrics and its balancer and circuit counts)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from services.gateway.balancer import Balancer
from services.gateway.metrics import GatewayMetrics
from services.gateway.nodes import NodeView

__all__ = ["NodeOutcomes", "NodeRefused", "Progress", "ProxyResult", "ProxySettings", "Stored",
           "UpstreamFailure"]


class UpstreamFailure(Exception):
    """No node could answer: `status` is what the client gets (502, 503, 504)."""

    def __init__(self, status: int, message: str, *, node_id: str | None = None,
                 reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.node_id = node_id
        self.reason = reason
        """Why the node failed (a loadbalancer_errors_total reason), when one did."""


@dataclass
class ProxyResult:
    """The answer sent; what it used is in the request's `Progress`."""

    response: web.StreamResponse
    status: int
    node_id: str
    client_gone: bool = False


@dataclass(slots=True)
class Progress:
    """How far a forwarded request got, kept current while it runs: when it is cut off (the
    gateway's deadline, a client hanging up) before `forward` returns, the caller still bills
    what was delivered and the balancer gets its slot back."""

    node: NodeView | None = None
    in_flight: bool = False
    """A request to `node` has started and has no outcome yet."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float | None = None
    resumed: int = 0
    """How many times the request went on on another node after its node failed or left."""
    moved: int = 0
    """Of those, moves off a node leaving at a deadline: planned, not failures, so they do
    not count toward the resume attempts."""

    def may_resume(self, attempts: int) -> bool:
        return self.resumed - self.moved < attempts

    @property
    def node_id(self) -> str | None:
        return self.node.node_id if self.node else None


Stored = Callable[[str, str], Awaitable[None]]
"""Called with (response id, node id) when a node has stored a response (Responses API)."""


class NodeRefused(Exception):
    """The node refused the gateway's key (401/403): a secret out of step with the node's,
    or something else listening at its address. Nothing was done with the request."""


@dataclass(frozen=True)
class ProxySettings:
    connect_timeout: float = 5.0
    request_timeout: float = 60.0
    chunk_timeout: float = 60.0
    resume_attempts: int = 2
    """How many times a request may go on on another node after its node failed (0: never)."""
    resume_cutover_seconds: float = 5.0
    """A stream on a node leaving at a deadline moves this long before it."""


CONNECT = "connect"
"""The failure reason of a node that could not be connected to."""


class NodeOutcomes:
    def __init__(self, balancer: Balancer, metrics: GatewayMetrics) -> None:
        self.balancer = balancer
        self.metrics = metrics

    def failed(self, progress: Progress, model: str, reason: str) -> None:
        """The request's node failed it: counted against the node."""
        assert progress.node is not None
        progress.in_flight = False
        self.node_failed(progress.node.node_id, model, reason)

    def succeeded(self, progress: Progress, model: str, started: float) -> float:
        """The node answered: its latency counted; returned."""
        assert progress.node is not None
        node_id = progress.node.node_id
        progress.in_flight = False
        now = time.monotonic()
        latency = now - started
        self.metrics.child(self.metrics.lb_latency, model, node_id).observe(latency)
        self.balancer.finished(node_id, ok=True, latency=latency, now=now)
        return latency

    def node_failed(self, node_id: str, model: str, reason: str) -> None:
        """A node failed a request (`failed`: the progress's node). One that refused the
        connection (`connect`) is out at once, until its circuit's probe: it is down or not
        listening, and every request sent meanwhile would cost a refused connection."""
        now = time.monotonic()
        self.metrics.child(self.metrics.lb_errors, model, node_id, reason).inc()
        self.balancer.finished(node_id, ok=False, latency=None, now=now)
        if reason == CONNECT:
            self.balancer.breaker.trip(node_id, now)
