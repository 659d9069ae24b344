"""Sending a prepared generation or embedding through the engine: faults, the clock, and the
writes of a whole answer or a stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web

from agent.simulator import responses, responses_api
from agent.simulator.config import SimulatorConfig
from agent.simulator.engine import ClientGone, Engine, Ticket
from agent.simulator.faults import FaultState
from agent.simulator.protocol import ENGINE_FAILURE, ApiError, EmbeddingRequest
from agent.simulator.responses import Generation, StreamEncoder
from agent.simulator.responses_api import ResponsesStreamEncoder

# vLLM runs under uvicorn; a gateway that looks at Server sees the same.
JSON_HEADERS = {"Content-Type": "application/json", "Server": "uvicorn"}
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Server": "uvicorn",
               "Cache-Control": "no-cache"}


def json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, headers=JSON_HEADERS)


def error_response(error: ApiError) -> web.Response:
    return json_response(error.body(), error.status)


def cut_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()  # flushes what was written, then closes: the stream just ends


def _whole(gen: Generation) -> web.Response:
    if gen.responses is not None:
        return json_response(responses_api.whole(gen))
    return json_response(responses.chat_completion(gen) if gen.chat
                         else responses.text_completion(gen))


def _encoder(gen: Generation) -> StreamEncoder | ResponsesStreamEncoder:
    return ResponsesStreamEncoder(gen) if gen.responses is not None else StreamEncoder(gen)


class Serving:
    def __init__(self, config: SimulatorConfig, engine: Engine, faults: FaultState) -> None:
        self.config = config
        self.engine = engine
        self.faults = faults

    async def generation(self, request: web.Request, gen: Generation,
                         arrival: float) -> web.StreamResponse:
        faults = self.faults.current
        if self.faults.fails(faults):
            return error_response(ENGINE_FAILURE)
        cut, drop = FaultState.cut_after(faults)
        if cut is not None and cut >= gen.steps:
            cut = None  # the output ends before the fault would strike
        engine = self.engine
        resp: web.StreamResponse | None = None
        ticket: Ticket | None = None
        encoder = _encoder(gen)
        try:
            if gen.stream:
                # As vLLM: the headers go out at once (with the Responses API's created and
                # in_progress events); tokens follow when the engine runs it.
                resp = web.StreamResponse(headers=SSE_HEADERS)
                await resp.prepare(request)
                if opening := encoder.opening():
                    await resp.write(opening)
            ticket = await engine.admit(request, len(gen.choices), gen.total_prompt_tokens,
                                        arrival)
            # The GPU prefills what the prefix cache does not hold, after the prefills queued
            # before it; the decode pace is the batch's it joins (timing.py).
            prefilled = engine.clock.prefill(
                ticket.admitted, max(0, gen.total_prompt_tokens - gen.cached_tokens))
            delay = (faults.slow_seconds + self.config.time_to_first_token
                     + (prefilled - ticket.admitted))
            itl = engine.clock.step(prefilled, engine.scheduler.num_running, gen.steps)
            if delay == 0 and itl == 0 and cut is None:
                # Nothing to simulate: no sleep, no await per token, one write.
                engine.first_token(ticket, engine.now())
                ticket.generated = gen.completion_tokens
                if resp is None:
                    ticket.reasons = [c.finish_reason for c in gen.choices]
                    return _whole(gen)
                await resp.write(encoder.first() + b"".join(
                    encoder.step(s) for s in range(gen.steps)) + encoder.closing())
                ticket.reasons = [c.finish_reason for c in gen.choices]
                await resp.write_eof()
                return resp
            first_at = ticket.admitted + delay
            if resp is None:
                return await self._unary(request, gen, ticket, first_at, itl, cut, drop)
            return await self._stream(request, resp, gen, encoder, ticket, first_at, itl, cut,
                                      drop)
        except (ClientGone, ConnectionError):
            # Nothing more can be sent: end the handler as aiohttp ends one whose client left
            # (a CancelledError is what it expects then, and logs nothing).
            raise asyncio.CancelledError from None
        finally:
            if ticket is not None:
                engine.release(ticket)

    async def _unary(self, request: web.Request, gen: Generation, ticket: Ticket,
                     first_at: float, itl: float, cut: int | None,
                     drop: bool) -> web.Response:
        engine = self.engine
        if cut is not None:
            await engine.sleep_until(request, first_at + cut * itl)
            if cut:
                engine.first_token(ticket, first_at)
            ticket.generated = sum(min(cut, c.num_tokens) for c in gen.choices)
            if drop:
                cut_connection(request)
                raise ClientGone
            await engine.hang(request)
        await engine.sleep_until(request, first_at)
        engine.first_token(ticket, engine.now())
        engine.grow(ticket, 1)
        # One sleep for the whole decode: a whole answer shows nothing until it is done.
        await engine.sleep_until(request, first_at + (gen.steps - 1) * itl)
        engine.grow(ticket, gen.steps)
        ticket.generated = gen.completion_tokens
        ticket.reasons = [c.finish_reason for c in gen.choices]
        return _whole(gen)

    async def _stream(self, request: web.Request, resp: web.StreamResponse, gen: Generation,
                      encoder: StreamEncoder | ResponsesStreamEncoder, ticket: Ticket,
                      first_at: float, itl: float, cut: int | None,
                      drop: bool) -> web.StreamResponse:
        engine = self.engine
        pending: list[bytes] = []
        for step in range(gen.steps if cut is None else cut):
            due = first_at + step * itl  # absolute deadlines: sleeps do not add up drift
            if due > engine.now():
                # Send what is due before sleeping; tokens due together go in one write.
                if pending:
                    await resp.write(b"".join(pending))
                    pending.clear()
                await engine.sleep_until(request, due)
            if step == 0:
                engine.first_token(ticket, engine.now())
                pending.append(encoder.first())
            pending.append(encoder.step(step))
            ticket.generated += sum(1 for c in gen.choices if c.num_tokens > step)
            engine.grow(ticket, step + 1)
        if pending:
            await resp.write(b"".join(pending))
        if cut is not None:
            await engine.sleep_until(request, first_at + cut * itl)
            if drop:
                cut_connection(request)
                raise ClientGone
            await engine.hang(request)
        ticket.reasons = [c.finish_reason for c in gen.choices]
        await resp.write(encoder.closing())
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request, req: EmbeddingRequest, request_id: str,
                         vectors: list[list[float]], prompt_tokens: int,
                         arrival: float) -> web.Response:
        return await self.pooling(request, max(1, len(vectors)), prompt_tokens, arrival,
                                  lambda: responses.embeddings(
                                      request_id, int(time.time()), self.config.model, vectors,
                                      prompt_tokens, req.encoding_format == "base64"))

    async def pooling(self, request: web.Request, seqs: int, prompt_tokens: int,
                      arrival: float, body: Callable[[], bytes]) -> web.Response:
        """A pooling request (embeddings, score, rerank) through the engine: one sequence
        per input, no output tokens. Hang and drop faults do not apply: there is no token to
        stop after."""
        faults = self.faults.current
        if self.faults.fails(faults):
            return error_response(ENGINE_FAILURE)
        engine = self.engine
        ticket: Ticket | None = None
        try:
            ticket = await engine.admit(request, seqs, prompt_tokens, arrival)
            delay = faults.slow_seconds + self.config.time_to_first_token
            if delay:
                await engine.sleep_until(request, ticket.admitted + delay)
            ticket.reasons = ["stop"] * seqs
            return json_response(body())
        except (ClientGone, ConnectionError):
            raise asyncio.CancelledError from None
        finally:
            if ticket is not None:
                engine.release(ticket)
