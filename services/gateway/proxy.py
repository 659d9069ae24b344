"""Forwarding a request to a vLLM node and the answer back, streaming chunk by chunk.

- Pooled keep-alive connections (one pool for all nodes).
- Each node is called with its own vLLM API key (`Authorization: Bearer <key>`, derived from
  NODE_API_KEY_SECRET and the node's id: services/infra/node_keys.py); the tenant's key never
  leaves the gateway.
- One retry on another node when the connection fails before any byte was sent, or when the
  node refuses the gateway's key (401/403: it did nothing with the request).
- A node that fails after the request started (5xx, a dropped connection, silence, or its
  spot deadline near) is replaced by another, up to `resume_attempts` times: a whole answer
  sent again, a stream continued from where it was cut (services/gateway/resume.py).
- Upstream errors: vLLM's 4xx keep their status and reach the client in OpenAI's shape
  (current vLLM's pass through untouched; older vLLM's flat shape is wrapped); 5xx, a dropped
  connection or a timeout that cannot be resumed become 502/504 in OpenAI's shape.
- Streams: forwarded chunk by chunk, and resumed, by streams.py.
"""

from __future__ import annotations

import time

import structlog
from aiohttp import web

from services.gateway.balancer import Balancer, RouteHint
from services.gateway.forwarding import (
    CONNECT,
    NodeOutcomes,
    NodeRefused,
    Progress,
    ProxyResult,
    ProxySettings,
    Stored,
    UpstreamFailure,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.node_answers import answer_of, openai_error_body
from services.gateway.nodes import NodeTable, NodeView, RoutingRules
from services.gateway.protocol import ENDPOINTS, InferenceRequest, upstream_body
from services.gateway.resume import RESUMABLE_WHOLE
from services.gateway.streams import StreamRelay
from services.gateway.upstream import (
    ConnectFailed,
    Dropped,
    ReadTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from services.infra.node_keys import NodeKeys

log = structlog.get_logger("proxy")

__all__ = ["Proxy"]



class Proxy:
    def __init__(self, pool: UpstreamPool, table: NodeTable, balancer: Balancer,
                 rules: RoutingRules, metrics: GatewayMetrics, node_keys: NodeKeys,
                 settings: ProxySettings | None = None) -> None:
        self.pool = pool
        self.table = table
        self.balancer = balancer
        self.rules = rules
        self.metrics = metrics
        self.node_keys = node_keys
        self.settings = settings or ProxySettings()
        self.outcomes = NodeOutcomes(balancer, metrics)
        self.streams = StreamRelay(pool, table, balancer, rules, metrics, node_keys,
                                   self.settings, self.outcomes)

    def has_nodes(self, model: str) -> bool:
        """Some node could take a request for `model` now (its circuit lets it)."""
        now = time.monotonic()
        allow = self.balancer.breaker.allow
        return any(allow(n.node_id, now) for n in self.table.candidates(model, now, self.rules))

    async def forward(self, request: web.Request, req: InferenceRequest, request_id: str,
                      headers: dict[str, str], progress: Progress, *,
                      pinned: NodeView | None = None,
                      on_stored: Stored | None = None,
                      route: RouteHint | None = None) -> ProxyResult:
        """Send `req` to a node and the answer to the client (with `headers` added). A
        `pinned` node is the only one tried (it holds the conversation `req` continues);
        `on_stored` hears of a response the node stored; `route` is what a keyed
        strategy routes by."""
        body = upstream_body(req)
        upstream_headers = {"Content-Type": "application/json", "X-Request-Id": request_id,
                             "Authorization": ""}
        path = ENDPOINTS[req.endpoint]
        started = time.monotonic()
        tried: set[str] = set()
        last_error = ""
        attempts = 1 if pinned is not None else 2 + max(0, self.settings.resume_attempts)
        resend = pinned is None and req.endpoint in RESUMABLE_WHOLE
        unreachable = 0
        for attempt in range(attempts):
            now = time.monotonic()
            node = pinned if pinned is not None else self.balancer.choose(
                req.model, self.table.candidates(req.model, now, self.rules), now,
                frozenset(tried), route)
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
            progress.node, progress.in_flight = node, True
            self.metrics.child(self.metrics.lb_requests, req.model, node.node_id).inc()
            upstream_headers["Authorization"] = self.node_keys.authorization(node.node_id)
            try:
                result = await self._attempt(request, req, progress, path, body,
                                             upstream_headers, headers, started, on_stored)
            except UpstreamFailure as exc:
                # Failed after it started, before the client got a byte (a whole answer, or
                # a stream refused before its first): sent again from the start, elsewhere.
                if not resend or not progress.may_resume(self.settings.resume_attempts):
                    raise
                progress.resumed += 1
                self.metrics.resumed.labels(exc.reason or "failed").inc()
                last_error = exc.message
                log.warning("node failed mid-request; sending it again to another",
                            node_id=node.node_id, error=last_error)
                continue
            except ConnectFailed as exc:
                # No byte of an answer came back: safe to send it to another node (once).
                last_error = str(exc)
                log.warning("node unreachable; trying another", node_id=node.node_id,
                            error=last_error)
                unreachable += 1
                if unreachable > 1:
                    break
                continue
            except NodeRefused as exc:
                last_error = str(exc)
                log.warning("node refused the gateway's key; trying another",
                            node_id=node.node_id, error=last_error)
                unreachable += 1
                if unreachable > 1:
                    break
                continue
            except BaseException:
                # Cut off (a deadline, a client gone) or a bug: no verdict on the node (the
                # one it was on last, if it was resumed), but its slot (and a half-open
                # probe) must not stay taken.
                if progress.in_flight and progress.node is not None:
                    progress.in_flight = False
                    self.balancer.abandoned(progress.node.node_id)
                raise
            if progress.resumed and not req.stream:
                self.metrics.resume_tokens.inc(progress.prompt_tokens)  # prefilled again
            return result
        if pinned is not None:
            raise UpstreamFailure(502, "The node holding the previous response could not be "
                                       f"reached ({last_error}). Retry shortly.",
                                  node_id=pinned.node_id)
        raise UpstreamFailure(502, f"The nodes serving '{req.model}' failed ({last_error}).")

    async def _attempt(self, request: web.Request, req: InferenceRequest, progress: Progress,
                       path: str, body: bytes, upstream_headers: dict[str, str],
                       headers: dict[str, str], started: float,
                       on_stored: Stored | None) -> ProxyResult:
        node = progress.node
        assert node is not None
        s = self.settings
        try:
            upstream = await self.pool.post(
                node.endpoint_url, path, body, upstream_headers,
                s.chunk_timeout if req.stream else s.request_timeout)
        except ConnectFailed:
            self.outcomes.failed(progress, req.model, CONNECT)
            raise
        except ReadTimeout:
            self.outcomes.failed(progress, req.model, "timeout")
            raise UpstreamFailure(504, "The model took too long to answer.",
                                  node_id=node.node_id, reason="timeout") from None
        except Dropped:
            self.outcomes.failed(progress, req.model, "dropped")
            raise UpstreamFailure(502, "The node dropped the connection mid-answer.",
                                  node_id=node.node_id, reason="dropped") from None
        try:
            if req.stream and upstream.status == 200:
                return await self.streams.stream(request, req, progress, upstream, headers,
                                                 started, on_stored)
            return await self._whole(request, req, progress, upstream, headers, started,
                                     on_stored)
        finally:
            upstream.release()

    async def fetch(self, node: NodeView, method: str, path: str,
                    request_id: str) -> tuple[int, bytes]:
        """A bodiless `method` on `path` of `node` (a stored response): its status and body,
        an error body in OpenAI's shape. UpstreamFailure when the node cannot answer."""
        headers = {"X-Request-Id": request_id,
                   "Authorization": self.node_keys.authorization(node.node_id)}
        try:
            upstream = await self.pool.request(method, node.endpoint_url, path, b"", headers,
                                               self.settings.request_timeout)
            try:
                body = await upstream.read()
            finally:
                upstream.release()
        except ConnectFailed as exc:
            raise UpstreamFailure(502, f"The node holding this response could not be reached "
                                       f"({exc}). Retry shortly.",
                                  node_id=node.node_id) from None
        except ReadTimeout:
            raise UpstreamFailure(504, "The node holding this response took too long to "
                                       "answer.", node_id=node.node_id) from None
        except UpstreamError:
            raise UpstreamFailure(502, "The node dropped the connection.",
                                  node_id=node.node_id) from None
        if upstream.status >= 500 or upstream.status in (401, 403):
            raise UpstreamFailure(502, f"The node holding this response failed "
                                       f"({upstream.status}).", node_id=node.node_id)
        if upstream.status != 200:
            body = openai_error_body(upstream.status, body)
        return upstream.status, body

    async def _whole(self, request: web.Request, req: InferenceRequest, progress: Progress,
                     upstream: UpstreamResponse, headers: dict[str, str],
                     started: float, on_stored: Stored | None) -> ProxyResult:
        node = progress.node
        assert node is not None
        try:
            body = await upstream.read()
        except ReadTimeout:
            self.outcomes.failed(progress, req.model, "timeout")
            raise UpstreamFailure(504, "The model took too long to answer.",
                                  node_id=node.node_id, reason="timeout") from None
        except UpstreamError:
            self.outcomes.failed(progress, req.model, "dropped")
            raise UpstreamFailure(502, "The node dropped the connection mid-answer.",
                                  node_id=node.node_id, reason="dropped") from None
        if upstream.status >= 500:
            self.outcomes.failed(progress, req.model, f"http_{upstream.status}")
            raise UpstreamFailure(502, f"The model server failed ({upstream.status}).",
                                  node_id=node.node_id, reason=f"http_{upstream.status}")
        if upstream.status in (401, 403):
            # Not the tenant's doing (its key never reaches a node): a node that is not ours,
            # or one launched with another NODE_API_KEY_SECRET. Counted against the node.
            self.outcomes.failed(progress, req.model, "unauthorized")
            raise NodeRefused(f"the node refused the gateway's key ({upstream.status})")
        latency = self.outcomes.succeeded(progress, req.model, started)
        content_type = upstream.headers.get("content-type", "application/json")
        if upstream.status == 200:
            (progress.prompt_tokens, progress.completion_tokens), answer_id = answer_of(body)
            progress.time_to_first_token = latency
            if on_stored is not None and req.store and answer_id:
                # Before the answer leaves: a follow-up may come as soon as it arrives.
                await on_stored(answer_id, node.node_id)
        else:
            body, content_type = openai_error_body(upstream.status, body), "application/json"
        response = web.Response(body=body, status=upstream.status, headers={
            **headers, "Content-Type": content_type})
        return ProxyResult(response, upstream.status, node.node_id)

