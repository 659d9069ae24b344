"""Every exception below becomes an answer in OpenAI's shape; bugs are logged, never shown.
Once a response's status has gone out, the failure is said in the stream instead."""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware

from services.gateway.edge.exchange import EXCHANGE, client_gone, end_stream
from services.infra.errors import ApiError, api_error_for_http, error_response

log = structlog.get_logger("gateway.http")


def recover() -> Middleware:
    async def recovered(request: web.Request, exc: Exception) -> web.StreamResponse:
        exchange = request[EXCHANGE]
        sent = exchange.response
        if isinstance(exc, ConnectionError) and client_gone(request):
            # Writing to (or reading from) a client that hung up; a bug that merely coincides
            # with a hang-up still gets its traceback below.
            exchange.client_gone = True
            if sent is not None:
                exchange.aborted = "client_disconnected"
            log.info("client disconnected", error=type(exc).__name__)
            return sent or error_response(ApiError.invalid_request("Client closed the request."))
        if isinstance(exc, ApiError):
            err = exc
        elif isinstance(exc, web.HTTPException):
            if exc.status < 400:  # a deliberate redirect or empty success, not an error
                return web.Response(status=exc.status, headers=exc.headers)
            err = api_error_for_http(exc, request.method, request.path,
                                     max_body_bytes=request.client_max_size)
        elif isinstance(exc, HttpProcessingError | web.RequestPayloadError):
            # A broken chunked or compressed request body: the client's fault, not a bug.
            log.info("malformed request body", error=type(exc).__name__)
            err = ApiError.invalid_request("The request body could not be read: it is "
                                           "malformed.")
        else:
            log.error("unhandled exception", exc_info=exc)
            err = ApiError.internal(exchange.request_id)
        if sent is None:
            return error_response(err)
        if isinstance(exc, ApiError | web.HTTPException):
            log.warning("stream failed", status=err.status, error=err.message)
        exchange.aborted = "error"
        await end_stream(request, sent, err)
        return sent

    @web.middleware
    async def recover(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            return await recovered(request, exc)

    return recover
