"""Streams from a node to the client, chunk by chunk, and their resumption on another node
when theirs fails mid-stream or is leaving (issue 16; the pure part is resume.py).

A stream is forwarded as segments, one per node it ran on: each line goes through the
segment's meter (and, on a continuation, its rewriter first) and on to the client in one
write per read. A silent node times out per chunk, not per response; a client that hangs up
closes the node's request and is billed what it got.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from services.gateway.balancer import Balancer
from services.gateway.forwarding import (
    CONNECT,
    NodeOutcomes,
    Progress,
    ProxyResult,
    ProxySettings,
    Stored,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.node_answers import StreamMeter
from services.gateway.nodes import NodeTable, NodeView, RoutingRules
from services.gateway.protocol import ENDPOINTS, InferenceRequest, _encode, upstream_body
from services.gateway.responses import ResponsesStreamMeter
from services.gateway.resume import RESUMABLE_STREAMS, Rewriter, Transcript, continuation_body
from services.gateway.upstream import (
    ConnectFailed,
    ReadTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from services.infra.errors import ApiError, sse_error_event
from services.infra.http import REQUEST_ID
from services.infra.node_keys import NodeKeys

log = structlog.get_logger("proxy")

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


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


class StreamRelay:
    def __init__(self, pool: UpstreamPool, table: NodeTable, balancer: Balancer,
                 rules: RoutingRules, metrics: GatewayMetrics, node_keys: NodeKeys,
                 settings: ProxySettings, outcomes: NodeOutcomes) -> None:
        self.pool = pool
        self.table = table
        self.balancer = balancer
        self.rules = rules
        self.metrics = metrics
        self.node_keys = node_keys
        self.settings = settings
        self.outcomes = outcomes

    async def stream(self, request: web.Request, req: InferenceRequest, progress: Progress,
                     upstream: UpstreamResponse, headers: dict[str, str],
                     started: float, on_stored: Stored | None) -> ProxyResult:
        """Forward a stream the node began (a 200), and carry it on elsewhere if the node
        fails it."""
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
        meter, upstream, feed, transcript = seg.meter, seg.upstream, seg.feed, seg.transcript
        announced = on_stored is None or not isinstance(meter, ResponsesStreamMeter)
        partial = b""
        cutover = self.settings.resume_cutover_seconds
        while True:
            if node.leave_by is not None and transcript is not None and not seg.staying \
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
            out = b"".join([feed(line + b"\n") for line in lines])
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
            if transcript is not None:
                transcript.add(out)
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
            self.outcomes.failed(progress, req.model, failure)
        elif seg.client_gone:
            upstream.close()  # vLLM sees the disconnect and stops generating
            self.metrics.disconnects.inc()
            self.outcomes.succeeded(progress, req.model, started)
        elif failure is not None:
            upstream.close()
            if progress.in_flight:
                self.outcomes.failed(progress, req.model, failure)
            await self._end_with_error(response, failure)
        else:
            self.outcomes.succeeded(progress, req.model, started)
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
                self.outcomes.failed(progress, req.model, reason)
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
            self.outcomes.node_failed(other.node_id, req.model,
                                      CONNECT if isinstance(exc, ConnectFailed) else "dropped")
            return None
        except BaseException:
            self.balancer.abandoned(other.node_id)
            raise
        if upstream.status != 200:
            upstream.release()
            self.outcomes.node_failed(other.node_id, req.model, f"http_{upstream.status}")
            if upstream.status < 500:
                # A 4xx is the request's, not the node's: it would fail anywhere.
                raise _Refused(upstream.status)
            return None
        return upstream

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
