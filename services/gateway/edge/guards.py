"""What a request body must be before anything reads it: JSON (415), and not over the limit,
declared or chunked (413)."""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from services.gateway.edge.config import BODY_METHODS, media_type
from services.infra.errors import ApiError, error_response


def require_json(json_types: frozenset[str]) -> Middleware:
    @web.middleware
    async def require_json(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in BODY_METHODS and request.body_exists:
            given = request.headers.get(hdrs.CONTENT_TYPE)
            if media_type(given) not in json_types:
                return error_response(ApiError.unsupported_media_type(given))
        return await handler(request)

    return require_json


def limit_body(max_body: int) -> Middleware:
    @web.middleware
    async def limit_body(request: web.Request, handler: Handler) -> web.StreamResponse:
        declared = request.content_length
        if declared is not None and declared > max_body:
            response = error_response(ApiError.request_too_large(max_body))
            response.force_close()  # do not keep reading a body we refused
            return response
        if request.body_exists and request.client_max_size != max_body:
            # aiohttp counts a chunked body as it is read (request.read/json/post) and stops
            # at the request's client_max_size: make that our limit. Build the app with
            # client_max_size=max_body_bytes and this clone never happens.
            request = request.clone(client_max_size=max_body)
        return await handler(request)

    return limit_body
