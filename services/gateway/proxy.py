"""Forwarding a request to a vLLM node and the answer back, streaming chunk by chunk.

- Pooled keep-alive connections (one pool for all nodes).
- Each node is called with its own vLLM API key (`Authorization: Bearer <key>`, derived from
  NODE_API_KEY_SECRET and the node's id: services/core/node_keys.py); the tenant's key never
  leaves the gateway.
- One retry on another node when the connection fails before any byte was sent, or when the
  node refuses the gateway's key (401/403: it did nothing with the request).
- A node that fails after the request started (5xx, a dropped connection, silence, or its
  spot deadline near) is replaced by another, up to `resume_attempts` times: a whole answer
  sent again, a stream continued from where it was cut (services/gateway/resume.py).
- Upstream errors: vLLM's 4xx keep their status and reach the client in OpenAI's shape
  (current vLLM's pass through untouched; older vLLM's flat shape is wrapped); 5xx, a dropped
  connection or a timeout that cannot be resumed become 502/504 in OpenAI's shape.
- Streams: each line is forwarded as it comes; a silent upstream times out per chunk, not per
  response; a client that hangs up cancels the upstream request and is billed what it got.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from services.core.errors import ApiError, sse_error_event
from services.core.http import REQUEST_ID
from services.core.node_keys import NodeKeys
from services.gateway.balancer import Balancer, RouteHint
from services.gateway.metrics import GatewayMetrics
from services.gateway.nodes import NodeTable, NodeView, RoutingRules
from services.gateway.protocol import (
    ENDPOINTS,
    InferenceRequest,
    StreamMeter,
    _encode,
    answer_of,
    openai_error_body,
    upstream_body,
)
from services.gateway.responses import ResponsesStreamMeter
from services.gateway.resume import (
    RESUMABLE_STREAMS,
    RESUMABLE_WHOLE,
    Rewriter,
    Transcript,
    continuation_body,
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


@dataclass(slots=True)
class _Segment:
    """One node's part of a stream (a resumed stream has several)."""

    upstream: UpstreamResponse
    meter: StreamMeter | ResponsesStreamMeter
    feed: Callable[[bytes], bytes]
    transcript: Transcript | None = None
    rewriter: Rewriter | None = None
    failure: str | None = None
    client_gone: bool = False
    finished: bool = False
    tried: set[str] = dataclasses.field(default_factory=set)
    """The nodes this stream has been on: a resume goes to none of them."""
    staying: bool = False
    """On a leaving node that no other could relieve: it stays there to the end."""


class _Refused(Exception):
    """A node answered a continuation with a 4xx: the request's fault, not the node's."""


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
            self._failed(progress, req.model, "connect")
            self.balancer.breaker.trip(node.node_id, time.monotonic())
            raise
        except ReadTimeout:
            self._failed(progress, req.model, "timeout")
            raise UpstreamFailure(504, "The model took too long to answer.",
                                  node_id=node.node_id, reason="timeout") from None
        except Dropped:
            self._failed(progress, req.model, "dropped")
            raise UpstreamFailure(502, "The node dropped the connection mid-answer.",
                                  node_id=node.node_id, reason="dropped") from None
        try:
            if req.stream and upstream.status == 200:
                return await self._stream(request, req, progress, upstream, headers, started,
                                          on_stored)
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

    def _failed(self, progress: Progress, model: str, reason: str) -> None:
        assert progress.node is not None
        node_id = progress.node.node_id
        progress.in_flight = False
        self.metrics.child(self.metrics.lb_errors, model, node_id, reason).inc()
        self.balancer.finished(node_id, ok=False, latency=None, now=time.monotonic())

    def _succeeded(self, progress: Progress, model: str, started: float) -> float:
        assert progress.node is not None
        node_id = progress.node.node_id
        progress.in_flight = False
        now = time.monotonic()
        latency = now - started
        self.metrics.child(self.metrics.lb_latency, model, node_id).observe(latency)
        self.balancer.finished(node_id, ok=True, latency=latency, now=now)
        return latency

    async def _whole(self, request: web.Request, req: InferenceRequest, progress: Progress,
                     upstream: UpstreamResponse, headers: dict[str, str],
                     started: float, on_stored: Stored | None) -> ProxyResult:
        node = progress.node
        assert node is not None
        try:
            body = await upstream.read()
        except ReadTimeout:
            self._failed(progress, req.model, "timeout")
            raise UpstreamFailure(504, "The model took too long to answer.",
                                  node_id=node.node_id, reason="timeout") from None
        except UpstreamError:
            self._failed(progress, req.model, "dropped")
            raise UpstreamFailure(502, "The node dropped the connection mid-answer.",
                                  node_id=node.node_id, reason="dropped") from None
        if upstream.status >= 500:
            self._failed(progress, req.model, f"http_{upstream.status}")
            raise UpstreamFailure(502, f"The model server failed ({upstream.status}).",
                                  node_id=node.node_id, reason=f"http_{upstream.status}")
        if upstream.status in (401, 403):
            # Not the tenant's doing (its key never reaches a node): a node that is not ours,
            # or one launched with another NODE_API_KEY_SECRET. Counted against the node.
            self._failed(progress, req.model, "unauthorized")
            raise NodeRefused(f"the node refused the gateway's key ({upstream.status})")
        latency = self._succeeded(progress, req.model, started)
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

    async def _stream(self, request: web.Request, req: InferenceRequest, progress: Progress,
                      upstream: UpstreamResponse, headers: dict[str, str],
                      started: float, on_stored: Stored | None) -> ProxyResult:
        node = progress.node
        assert node is not None
        meter: StreamMeter | ResponsesStreamMeter
        if req.endpoint == "responses":
            meter = ResponsesStreamMeter()
            # Its usage comes only at the end: a client that leaves is billed from there.
            drains = True
        else:
            meter = StreamMeter(req.wants_usage, req.wants_continuous_usage)
            drains = False
        seg = _Segment(upstream, meter, meter.feed, tried={node.node_id})
        if self.settings.resume_attempts and req.endpoint in RESUMABLE_STREAMS:
            seg.transcript = Transcript()
        response = _HeldHeadersResponse(status=200, headers={**headers, **SSE_HEADERS})
        # Writes nothing yet (the headers are held): a client already gone is found by the
        # first write below, like one that leaves mid-stream.
        await response.prepare(request)
        try:
            while True:
                await self._pump(seg, response, progress, started, on_stored, drains)
                if seg.failure is None or seg.client_gone or seg.transcript is None:
                    break
                if seg.failure != "node_leaving" \
                        and not progress.may_resume(self.settings.resume_attempts):
                    break
                resumed = await self._resume(request, req, progress, seg)
                if resumed is None and seg.failure == "node_leaving":
                    seg.failure, seg.staying = None, True  # nowhere to go: stay to the end
                    continue
                if resumed is None:
                    break
                if seg.upstream is not upstream:  # (the first is released by _attempt)
                    seg.upstream.release()
                self._count_resume(seg)
                seg = resumed
            return await self._end_stream(req, progress, seg, response, started)
        finally:
            self._count_resume(seg)
            if seg.upstream is not upstream:
                seg.upstream.release()  # (closes it, unless it was read to its end)

    def _count_resume(self, seg: _Segment) -> None:
        if seg.rewriter is not None:
            self.metrics.resume_tokens.inc(seg.rewriter.resume_prompt_tokens)

    async def _pump(self, seg: _Segment, response: web.StreamResponse, progress: Progress,
                    started: float, on_stored: Stored | None, drains: bool) -> None:
        """Forward one node's stream until it ends, fails, or the client leaves."""
        node = progress.node
        assert node is not None
        meter, upstream = seg.meter, seg.upstream
        announced = on_stored is None or not isinstance(meter, ResponsesStreamMeter)
        partial = b""
        cutover = self.settings.resume_cutover_seconds
        while True:
            if node.leave_by is not None and seg.transcript is not None and not seg.staying \
                    and time.time() >= node.leave_by - cutover:
                seg.failure = "node_leaving"  # before the machine goes: carry on elsewhere
                return
            try:
                # Whatever has arrived, however many lines: one write to the client per read.
                data = await upstream.next_chunk()
            except ReadTimeout:
                seg.failure = "chunk_timeout"
                return
            except UpstreamError:
                seg.failure = "dropped"
                return
            if not data:
                if not meter.done:
                    seg.failure = "dropped"  # the node closed the stream before [DONE]
                return
            if progress.time_to_first_token is None:
                progress.time_to_first_token = time.monotonic() - started
            lines = (partial + data).split(b"\n")
            partial = lines.pop()  # an incomplete last line waits for the next read
            out = b"".join(seg.feed(line + b"\n") for line in lines)
            if not announced and isinstance(meter, ResponsesStreamMeter) and meter.response_id:
                announced = True
                assert on_stored is not None
                await on_stored(meter.response_id, node.node_id)
            if not out or seg.finished:
                continue  # (after [DONE], the read goes on to the end: the connection is reused)
            try:
                if meter.done:
                    # The last of it: headers (if still held), data and the end in one send.
                    await response.write_eof(out)
                    seg.finished = True
                else:
                    await response.write(out)
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                seg.client_gone = True
                if drains:
                    seg.failure = await self._drain(upstream, meter, partial)
                return
            if seg.transcript is not None:
                seg.transcript.add(out)
            # Billed: what the client has been sent (all of it once the stream is done).
            progress.prompt_tokens = meter.prompt_tokens
            progress.completion_tokens = meter.completion_tokens

    async def _end_stream(self, req: InferenceRequest, progress: Progress, seg: _Segment,
                          response: web.StreamResponse, started: float) -> ProxyResult:
        node = progress.node
        assert node is not None
        meter, upstream, failure = seg.meter, seg.upstream, seg.failure
        drains = isinstance(meter, ResponsesStreamMeter)
        if meter.done and (drains or not seg.client_gone):
            progress.prompt_tokens = meter.prompt_tokens
            progress.completion_tokens = meter.completion_tokens
        if seg.client_gone and failure is not None:
            upstream.close()
            self.metrics.disconnects.inc()
            self._failed(progress, req.model, failure)
        elif seg.client_gone:
            upstream.close()  # vLLM sees the disconnect and stops generating
            self.metrics.disconnects.inc()
            self._succeeded(progress, req.model, started)
        elif failure is not None:
            upstream.close()
            if progress.in_flight:
                self._failed(progress, req.model, failure)
            await self._end_with_error(response, failure)
        else:
            self._succeeded(progress, req.model, started)
            await _quietly(response.write_eof())
        # The status line said 200 long ago; the record says how the stream really ended.
        status = 200 if failure is None else 504 if failure == "chunk_timeout" else 502
        return ProxyResult(response, status, node.node_id, client_gone=seg.client_gone)

    async def _resume(self, request: web.Request, req: InferenceRequest, progress: Progress,
                      seg: _Segment) -> _Segment | None:
        """The rest of a cut stream from another node, or None when it cannot go on there
        (a failed stream then ends as it would have; one moving off a leaving node stays)."""
        assert seg.transcript is not None
        assert seg.failure is not None
        node = progress.node
        assert node is not None
        sent = seg.transcript.sent()
        body = None if sent is None else continuation_body(req, sent,
                                                           progress.completion_tokens)
        if sent is None or body is None or sent.done:
            return None
        reason = seg.failure
        leaving = reason == "node_leaving"
        if not leaving:
            seg.upstream.close()
            if progress.in_flight:
                self._failed(progress, req.model, reason)
        if sent.finish_reason is not None:
            return None  # (the end was sent; only usage and [DONE] are missing)
        payload = upstream_body(dataclasses.replace(req, body=body, raw=_encode(body)))
        while leaving or progress.may_resume(self.settings.resume_attempts):
            now = time.monotonic()
            other = self.balancer.choose(req.model, self.table.candidates(req.model, now,
                                                                          self.rules),
                                         now, frozenset(seg.tried))
            if other is None:
                return None
            seg.tried.add(other.node_id)
            progress.resumed += 1
            progress.moved += leaving
            self.metrics.resumed.labels(reason).inc()
            try:
                upstream = await self._continue_on(request, req, progress, other, payload,
                                                   node, reason)
            except _Refused:
                return None
            if upstream is None:
                continue
            if leaving:
                seg.upstream.close()
                self.balancer.abandoned(node.node_id)  # not the node's failure
            progress.node, progress.in_flight = other, True
            rewriter = Rewriter(sent, progress.prompt_tokens, progress.completion_tokens)
            meter = StreamMeter(req.wants_usage, req.wants_continuous_usage)

            def feed(line: bytes, rewriter: Rewriter = rewriter,
                     meter: StreamMeter = meter) -> bytes:
                rewritten = rewriter.feed(line)
                return meter.feed(rewritten) if rewritten else b""

            return _Segment(upstream, meter, feed, transcript=seg.transcript, rewriter=rewriter,
                            tried=seg.tried)
        return None

    async def _continue_on(self, request: web.Request, req: InferenceRequest,
                           progress: Progress, other: NodeView, payload: bytes,
                           previous: NodeView, reason: str) -> UpstreamResponse | None:
        """The continuation's stream from `other`, its head read; None when `other` failed
        (counted against it); _Refused when it refused the continuation (a 4xx)."""
        now = time.monotonic()
        self.balancer.started(other.node_id, now)
        self.metrics.child(self.metrics.lb_requests, req.model, other.node_id).inc()
        headers = {"Content-Type": "application/json",
                   "X-Request-Id": request.get(REQUEST_ID, "") + f"-r{progress.resumed}",
                   "Authorization": self.node_keys.authorization(other.node_id)}
        log.info("resuming a stream on another node", from_node=previous.node_id,
                 node_id=other.node_id, reason=reason, sent_tokens=progress.completion_tokens)
        try:
            upstream = await self.pool.post(other.endpoint_url, ENDPOINTS[req.endpoint],
                                            payload, headers, self.settings.chunk_timeout)
        except UpstreamError as exc:
            connect = isinstance(exc, ConnectFailed)
            self._node_failed(other.node_id, req.model, "connect" if connect else "dropped")
            if connect:
                self.balancer.breaker.trip(other.node_id, time.monotonic())
            return None
        except BaseException:
            self.balancer.abandoned(other.node_id)
            raise
        if upstream.status != 200:
            upstream.release()
            self._node_failed(other.node_id, req.model, f"http_{upstream.status}")
            if upstream.status < 500:
                # A 4xx is the request's, not the node's: it would fail anywhere.
                raise _Refused(upstream.status)
            return None
        return upstream

    def _node_failed(self, node_id: str, model: str, reason: str) -> None:
        self.metrics.child(self.metrics.lb_errors, model, node_id, reason).inc()
        self.balancer.finished(node_id, ok=False, latency=None, now=time.monotonic())

    @staticmethod
    async def _drain(upstream: UpstreamResponse, meter: ResponsesStreamMeter | StreamMeter,
                     partial: bytes) -> str | None:
        """Read the rest of a stream whose client has gone, for the usage at its end; the
        failure that cut it short, if one did (each read is bounded by the chunk timeout)."""
        while not meter.done:
            try:
                data = await upstream.next_chunk()
            except ReadTimeout:
                return "chunk_timeout"
            except UpstreamError:
                return "dropped"
            if not data:
                return "dropped"
            lines = (partial + data).split(b"\n")
            partial = lines.pop()
            for line in lines:
                meter.feed(line + b"\n")
        return None

    @staticmethod
    async def _end_with_error(response: web.StreamResponse, failure: str) -> None:
        # The status line is long gone: say it in the stream, as OpenAI does, then stop.
        error = (ApiError.timeout("The model stopped answering.", code="stream_timeout")
                 if failure == "chunk_timeout" else
                 ApiError.bad_gateway("The connection to the model was lost.",
                                      code="upstream_dropped"))
        await _quietly(response.write(sse_error_event(error)))
        await _quietly(response.write_eof())


class _HeldHeadersResponse(web.StreamResponse):
    """A stream whose headers go out with its first data rather than alone: a send (a system
    call) fewer per stream, and a whole short answer in one. vLLM sends its headers at once,
    so the client still sees them as soon as the node has anything to say."""

    _send_headers_immediately = False


async def _quietly(op: Any) -> None:
    # The client is gone: there is nothing to tell it.
    with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError,
                             RuntimeError):
        await op
