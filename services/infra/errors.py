"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Everything a service refuses (the gateway's inference API, the admin API) goes out through
`ApiError` and `error_response`, so clients (the OpenAI SDKs among them) always find the same
body whatever layer said no. The SDKs choose their exception class from the HTTP status; `type`
and `code` let a program tell cases apart.

| status | type                    | code (default)           | raised by                          |
|--------|-------------------------|--------------------------|------------------------------------|
| 400    | invalid_request_error   | null                     | bad JSON, bad parameters           |
| 401    | authentication_error    | invalid_api_key          | missing, unknown or revoked key    |
| 403    | permission_error        | null                     | key not allowed this model / route |
| 404    | not_found_error         | null                     | unknown route, unknown model       |
| 405    | invalid_request_error   | method_not_allowed       | the router                         |
| 409    | conflict_error          | null                     | admin API: duplicate, concurrent   |
| 413    | invalid_request_error   | request_too_large        | body over the size limit           |
| 415    | invalid_request_error   | unsupported_media_type   | body that is not JSON              |
| 429    | rate_limit_error        | rate_limit_exceeded      | rate limits (with Retry-After)     |
| 500    | server_error            | null                     | a bug: logged with its traceback   |
| 502    | bad_gateway             | null                     | the GPU node answered badly        |
| 503    | service_unavailable     | null                     | no node can take the request       |
| 504    | timeout                 | null                     | the request ran past its deadline  |

Any other 4xx is an ``invalid_request_error``, any other 5xx a ``server_error``. 409 is not in
the table: the gateway passes vLLM's own 409s on as ``invalid_request_error``; the admin API
raises `ApiError.conflict`, which sets ``conflict_error`` explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import msgspec
from aiohttp import hdrs, web

ERROR_TYPES: Mapping[int, tuple[str, str | None]] = MappingProxyType({
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("not_found_error", None),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("bad_gateway", None),
    503: ("service_unavailable", None),
    504: ("timeout", None),
})
"""status → (type, default code): the table in this module's docstring."""

_MAX_ECHOED_PATH = 200
_SERVER_ERROR_MESSAGE = ("The server had an error while processing your request. Retry it; if "
                         "the error persists, contact support with the request ID {request_id}.")
# Headers an aiohttp HTTPException carries that describe its own text body, not ours.
_BODY_HEADERS = frozenset({hdrs.CONTENT_TYPE.lower(), hdrs.CONTENT_LENGTH.lower(),
                           hdrs.CONTENT_ENCODING.lower(), hdrs.TRANSFER_ENCODING.lower()})


def error_kind(status: int) -> tuple[str, str | None]:
    """The OpenAI error type and default code for an HTTP status."""
    found = ERROR_TYPES.get(status)
    if found is not None:
        return found
    return ("invalid_request_error", None) if status < 500 else ("server_error", None)


class ApiError(Exception):
    """An error the client is meant to see: raise it anywhere below the middleware stack.

    `headers` go out with the response (``Retry-After``, ``x-ratelimit-*``, ``Allow``).
    """

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type if type is not None else error_kind(status)[0]
        self.param = param
        self.code = code
        self.headers: Mapping[str, str] = headers if headers is not None else {}

    def __repr__(self) -> str:
        return (f"ApiError({self.status}, {self.message!r}, type={self.type!r}, "
                f"code={self.code!r})")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_status(cls, status: int, message: str, *,
                    headers: Mapping[str, str] | None = None) -> ApiError:
        """An error with the table's type and default code for `status`."""
        type_, code = error_kind(status)
        return cls(status, message, type=type_, code=code, headers=headers)

    @classmethod
    def invalid_request(cls, message: str, param: str | None = None,
                        code: str | None = None) -> ApiError:
        return cls(400, message, param=param, code=code)

    @classmethod
    def authentication(cls, message: str = "Incorrect API key provided.",
                       code: str | None = "invalid_api_key") -> ApiError:
        # OpenAI sends no WWW-Authenticate; neither do we (SDKs do not use it).
        return cls(401, message, code=code)

    @classmethod
    def permission(cls, message: str, code: str | None = None) -> ApiError:
        return cls(403, message, code=code)

    @classmethod
    def not_found(cls, message: str, param: str | None = None,
                  code: str | None = None) -> ApiError:
        return cls(404, message, param=param, code=code)

    @classmethod
    def conflict(cls, message: str, param: str | None = None,
                 code: str | None = None) -> ApiError:
        return cls(409, message, type="conflict_error", param=param, code=code)

    @classmethod
    def request_too_large(cls, limit: int) -> ApiError:
        return cls(413, f"Request body too large: at most {limit} bytes are accepted.",
                   code="request_too_large")

    @classmethod
    def unsupported_media_type(cls, content_type: str | None) -> ApiError:
        given = (content_type or "none")[:100]
        return cls(415, f"Unsupported Content-Type {given!r}: send the body as "
                        "application/json.", code="unsupported_media_type")

    @classmethod
    def rate_limited(cls, message: str, headers: Mapping[str, str] | None = None,
                     code: str | None = "rate_limit_exceeded") -> ApiError:
        """429; `headers` should carry ``Retry-After`` and the ``x-ratelimit-*`` set."""
        return cls(429, message, code=code, headers=headers)

    @classmethod
    def internal(cls, request_id: str) -> ApiError:
        """500 for a bug: says nothing about it but the request id to quote."""
        return cls(500, _SERVER_ERROR_MESSAGE.format(request_id=request_id))

    @classmethod
    def bad_gateway(cls, message: str = "The model server returned an invalid response.",
                    code: str | None = None) -> ApiError:
        return cls(502, message, code=code)

    @classmethod
    def unavailable(cls, message: str = "No capacity is available for this model right now.",
                    headers: Mapping[str, str] | None = None,
                    code: str | None = None) -> ApiError:
        return cls(503, message, code=code, headers=headers)

    @classmethod
    def timeout(cls, message: str = "The request timed out.",
                code: str | None = None) -> ApiError:
        return cls(504, message, code=code)

    # ------------------------------------------------------------------ rendering

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def encode(self) -> bytes:
        return msgspec.json.encode(self.body())


def error_response(err: ApiError) -> web.Response:
    """The JSON response for `err`, its headers included."""
    return web.Response(body=err.encode(), status=err.status, content_type="application/json",
                        headers=err.headers or None)


def sse_error_event(err: ApiError) -> bytes:
    """An error as a server-sent event: how a stream that already sent its 200 reports a
    failure. The OpenAI SDKs raise `APIError` when a data event holds an ``error`` key."""
    return b"data: " + err.encode() + b"\n\n"


def _echo(path: str) -> str:
    return path if len(path) <= _MAX_ECHOED_PATH else path[:_MAX_ECHOED_PATH] + "..."


def api_error_for_http(exc: web.HTTPException, method: str, path: str, *,
                       max_body_bytes: int | None = None) -> ApiError:
    """aiohttp's own HTTP exceptions (404, 405, 413 from `request.read()`, handlers' `raise
    web.HTTPBadRequest(text=...)`) translated into the same error shape."""
    status = exc.status
    if status == 404:
        message = f"Invalid URL ({method} {_echo(path)})"
    elif status == 405:
        message = f"Method {method} is not allowed for {_echo(path)}."
    elif status == 413:
        if max_body_bytes is not None:
            return ApiError.request_too_large(max_body_bytes)
        message = "Request body too large."
    else:
        text = exc.text
        default = f"{status}: {exc.reason}"
        message = text if text and text != default else exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
    return ApiError.from_status(status, message, headers=headers)
