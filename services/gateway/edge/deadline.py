"""The request's deadline: `request_timeout` to the response (or its first streamed byte),
then `chunk_timeout` of silence at most once it streams (504, or said in the stream)."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from services.gateway.edge.exchange import EXCHANGE, Deadline, end_stream
from services.infra.errors import ApiError, error_response

log = structlog.get_logger("gateway.http")


def deadline(request_timeout: float, chunk_timeout: float) -> Middleware:
    @web.middleware
    async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        exchange = request[EXCHANGE]
        timeout = asyncio.timeout(request_timeout)
        watch = Deadline(timeout, chunk_timeout)
        exchange.deadline = watch
        try:
            async with timeout:
                return await handler(request)
        except TimeoutError:
            if not timeout.expired():
                raise  # someone else's timeout, left unhandled: `recover` reports it
            sent = exchange.response
            if sent is None:
                log.warning("request timed out", timeout_s=request_timeout)
                return error_response(ApiError.timeout(
                    f"The request did not complete within {request_timeout:g} seconds."))
            if watch.streaming:
                log.warning("stream stalled", chunk_timeout_s=chunk_timeout)
                err = ApiError.timeout(f"The stream stalled: nothing was sent for "
                                       f"{chunk_timeout:g} seconds.", code="stream_timeout")
            else:
                log.warning("request timed out after its response began",
                            timeout_s=request_timeout)
                err = ApiError.timeout(
                    f"The request did not complete within {request_timeout:g} seconds.")
            exchange.aborted = "timeout"
            await end_stream(request, sent, err)
            return sent
        finally:
            watch.close()
            exchange.deadline = None

    return deadline
