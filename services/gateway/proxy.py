"""Forwarding a request to a vLLM node and the answer back, streaming chunk by chunk.

- Pooled keep-alive connections (one ClientSession for all nodes).
- One retry on another node when the connection fails before any byte was sent.
- Upstream errors: vLLM's 4xx are OpenAI-shaped already and pass through; 5xx, a dropped
  connection or a timeout become 502/504 in OpenAI's shape.
- Streams: each line is forwarded as it comes; a silent upstream times out per chunk, not per
  response; a client that hangs up cancels the upstream request and is billed what it got.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from services.core.errors import ApiError, sse_error_event
from services.gateway.balancer import Balancer
from services.gateway.metrics import GatewayMetrics
from services.gateway.nodes import NodeTable, NodeView, RoutingRules
from services.gateway.protocol import (
    ENDPOINTS,
    InferenceRequest,
    StreamMeter,
    upstream_body,
    usage_of,
)
from services.gateway.upstream import (
    ConnectFailed,
    Dropped,
    ReadTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)

log = structlog.get_logger("proxy")

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


class UpstreamFailure(Exception):
    """No node could answer: `status` is what the client gets (502, 503, 504)."""

    def __init__(self, status: int, message: str, *, node_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.node_id = node_id


@dataclass
class ProxyResult:
    response: web.StreamResponse
    status: int
    node_id: str
    prompt_tokens: int
    completion_tokens: int
    latency: float
    time_to_first_token: float | None
    client_gone: bool = False


@dataclass(frozen=True)
class ProxySettings:
    connect_timeout: float = 5.0
    request_timeout: float = 60.0
    chunk_timeout: float = 60.0
    upstream_api_key: str = ""


class Proxy:
    def __init__(self, pool: UpstreamPool, table: NodeTable, balancer: Balancer,
                 rules: RoutingRules, metrics: GatewayMetrics,
                 settings: ProxySettings | None = None) -> None:
        self.pool = pool
        self.table = table
        self.balancer = balancer
        self.rules = rules
        self.metrics = metrics
        self.settings = settings or ProxySettings()

    def has_nodes(self, model: str) -> bool:
        return bool(self.table.candidates(model, time.monotonic(), self.rules))

    async def forward(self, request: web.Request, req: InferenceRequest, request_id: str,
                      headers: dict[str, str]) -> ProxyResult:
        """Send `req` to a node and the answer to the client (with `headers` added)."""
        body = upstream_body(req)
        upstream_headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        if self.settings.upstream_api_key:
            upstream_headers["Authorization"] = f"Bearer {self.settings.upstream_api_key}"
        path = ENDPOINTS[req.endpoint]
        started = time.monotonic()
        tried: set[str] = set()
        last_error = ""
        for attempt in range(2):
            now = time.monotonic()
            node = self.balancer.choose(req.model, self.table.candidates(req.model, now,
                                                                         self.rules),
                                        now, frozenset(tried))
            if node is None:
                if attempt == 0:
                    self.metrics.no_node.labels(req.model).inc()
                    raise UpstreamFailure(503, f"No node is serving the model '{req.model}' "
                                               "right now. Retry shortly.")
                raise UpstreamFailure(502, f"The node serving '{req.model}' failed "
                                           f"({last_error}) and no other node could take it.")
            tried.add(node.node_id)
            if attempt:
                self.metrics.retries.inc()
            self.balancer.started(node.node_id, now)
            self.metrics.child(self.metrics.lb_requests, req.model, node.node_id).inc()
            s = self.settings
            try:
                upstream = await self.pool.post(
                    node.endpoint_url, path, body, upstream_headers,
                    s.chunk_timeout if req.stream else s.request_timeout)
            except ConnectFailed as exc:
                # No byte of an answer came back: safe to send it to another node.
                last_error = str(exc)
                self._failed(node, req.model, "connect", started)
                log.warning("node unreachable; trying another", node_id=node.node_id,
                            error=last_error)
                continue
            except ReadTimeout:
                self._failed(node, req.model, "timeout", started)
                raise UpstreamFailure(504, "The model took too long to answer.",
                                      node_id=node.node_id) from None
            except Dropped:
                self._failed(node, req.model, "dropped", started)
                raise UpstreamFailure(502, "The node dropped the connection mid-answer.",
                                      node_id=node.node_id) from None
            try:
                if req.stream and upstream.status == 200:
                    return await self._stream(request, req, node, upstream, headers, started)
                return await self._whole(request, req, node, upstream, headers, started)
            finally:
                upstream.release()
        raise AssertionError("unreachable")

    def _failed(self, node: NodeView, model: str, reason: str, started: float) -> None:
        self.metrics.child(self.metrics.lb_errors, model, node.node_id, reason).inc()
        self.balancer.finished(node.node_id, ok=False, latency=None, now=time.monotonic())

    def _succeeded(self, node: NodeView, model: str, started: float) -> float:
        now = time.monotonic()
        latency = now - started
        self.metrics.child(self.metrics.lb_latency, model, node.node_id).observe(latency)
        self.balancer.finished(node.node_id, ok=True, latency=latency, now=now)
        return latency

    async def _whole(self, request: web.Request, req: InferenceRequest, node: NodeView,
                     upstream: UpstreamResponse, headers: dict[str, str],
                     started: float) -> ProxyResult:
        try:
            body = await upstream.read()
        except ReadTimeout:
            self._failed(node, req.model, "timeout", started)
            raise UpstreamFailure(504, "The model took too long to answer.",
                                  node_id=node.node_id) from None
        except UpstreamError:
            self._failed(node, req.model, "dropped", started)
            raise UpstreamFailure(502, "The node dropped the connection mid-answer.",
                                  node_id=node.node_id) from None
        if upstream.status >= 500:
            self._failed(node, req.model, f"http_{upstream.status}", started)
            raise UpstreamFailure(502, f"The model server failed ({upstream.status}).",
                                  node_id=node.node_id)
        latency = self._succeeded(node, req.model, started)
        prompt, completion = usage_of(body) if upstream.status == 200 else (0, 0)
        response = web.Response(body=body, status=upstream.status, headers={
            **headers, "Content-Type": upstream.headers.get("content-type",
                                                            "application/json")})
        return ProxyResult(response, upstream.status, node.node_id, prompt, completion,
                           latency, latency if upstream.status == 200 else None)

    async def _stream(self, request: web.Request, req: InferenceRequest, node: NodeView,
                      upstream: UpstreamResponse, headers: dict[str, str],
                      started: float) -> ProxyResult:
        meter = StreamMeter(req.wants_usage, req.wants_continuous_usage)
        response = web.StreamResponse(status=200, headers={**headers, **SSE_HEADERS})
        await response.prepare(request)
        delivered = (0, 0)
        first: float | None = None
        failure: str | None = None
        client_gone = False
        partial = b""
        while True:
            try:
                # Whatever has arrived, however many lines: one write to the client per read.
                data = await upstream.next_chunk()
            except ReadTimeout:
                failure = "chunk_timeout"
                break
            except UpstreamError:
                failure = "dropped"
                break
            if not data:
                if not meter.done:
                    failure = "dropped"  # the node closed the stream before [DONE]
                break
            if first is None:
                first = time.monotonic() - started
            lines = (partial + data).split(b"\n")
            partial = lines.pop()  # an incomplete last line waits for the next read
            out = b"".join(meter.feed(line + b"\n") for line in lines)
            if not out:
                continue
            try:
                await response.write(out)
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                client_gone = True
                break
            delivered = (meter.prompt_tokens, meter.completion_tokens)
        if meter.done and not client_gone:
            delivered = (meter.prompt_tokens, meter.completion_tokens)
        if client_gone:
            upstream.close()  # vLLM sees the disconnect and stops generating
            self.metrics.disconnects.inc()
            latency = self._succeeded(node, req.model, started)
        elif failure is not None:
            upstream.close()
            self._failed(node, req.model, failure, started)
            latency = time.monotonic() - started
            await self._end_with_error(response, failure)
        else:
            latency = self._succeeded(node, req.model, started)
            await _quietly(response.write_eof())
        return ProxyResult(response, 200, node.node_id, delivered[0], delivered[1], latency,
                           first, client_gone=client_gone)

    @staticmethod
    async def _end_with_error(response: web.StreamResponse, failure: str) -> None:
        # The status line is long gone: say it in the stream, as OpenAI does, then stop.
        error = (ApiError.timeout("The model stopped answering.", code="stream_timeout")
                 if failure == "chunk_timeout" else
                 ApiError.bad_gateway("The connection to the model was lost.",
                                      code="upstream_dropped"))
        await _quietly(response.write(sse_error_event(error)))
        await _quietly(response.write_eof())


async def _quietly(op: Any) -> None:
    # The client is gone: there is nothing to tell it.
    with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError,
                             RuntimeError):
        await op
