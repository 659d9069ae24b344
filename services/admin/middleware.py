"""The admin API's three middlewares, inside the shell's request-id and metrics ones:

1. ``answer_errors``: whatever a handler raises becomes OpenAI's error shape with the right
   status (catalog errors included), and every request gets one log line — method, path,
   status, time; never a header, so never the token. A body the client sent broken (a
   ``Content-Encoding`` it is not in) is a 400 and the client's error, logged as such.
2. ``require_token``: every route under ``/admin/v1/`` but the OpenAPI document needs
   ``X-Admin-Token``, compared in constant time, or a signed-in console's session cookie
   (and, for a write, its CSRF token).
3. ``check_request``: the route table's word on the query string (each parameter declared,
   once, not empty, its value within its bounds: `request_checks.check_query`) and on the
   body (present when the route requires one), before any handler runs. The OpenAPI
   document is generated from the same declarations.
"""

from __future__ import annotations

import asyncio
import hmac
import time

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from services.admin.console_sessions import COOKIE, CSRF_HEADER
from services.admin.context import API_PREFIX, CONSOLE_SESSIONS, TOKEN_HEADER
from services.admin.routing import route_of
from services.domain.catalog import CatalogError, Conflict, Invalid, NotFound
from services.infra.errors import ApiError, api_error_for_http, error_response
from services.infra.http import REQUEST_ID
from services.infra.request_checks import FieldError, check_query
from services.infra.settings import Secret

log = structlog.get_logger("admin")

PUBLIC_PATHS = frozenset({f"{API_PREFIX}/openapi.json"})


def api_error_for(exc: Exception) -> ApiError | None:
    """The client-facing error for an exception the API expects; None for a bug."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, FieldError):
        return ApiError.invalid_request(exc.message, param=exc.param)
    if isinstance(exc, NotFound):
        return ApiError.not_found(_sentence(exc))
    if isinstance(exc, Conflict):
        return ApiError.conflict(_sentence(exc))
    if isinstance(exc, Invalid):
        return ApiError.invalid_request(_sentence(exc), param=exc.field)
    if isinstance(exc, CatalogError):
        return ApiError.invalid_request(_sentence(exc))
    return None


def _sentence(exc: Exception) -> str:
    text = str(exc)
    text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."


@web.middleware
async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    except web.RequestPayloadError as exc:
        # The body could not be read as sent (a Content-Encoding it is not in, a cut chunk):
        # the client's error. Closing the connection keeps aiohttp from reading the rest of
        # the broken body after the answer (and logging that as an unhandled exception).
        log.info("unreadable request body", error=str(exc).replace("\n", " ").strip())
        err = ApiError.invalid_request(f"The request body could not be read: "
                                       f"{str(exc).splitlines()[-1].strip()}.")
        status = err.status
        response = error_response(err)
        response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            status = exc.status
            raise
        err = api_error_for_http(exc, request.method, request.path)
        status = err.status
        return error_response(err)
    except Exception as exc:
        err_or_none = api_error_for(exc)
        if err_or_none is None:
            log.exception("admin request failed")
            err_or_none = ApiError.internal(request[REQUEST_ID])
        status = err_or_none.status
        return error_response(err_or_none)
    finally:
        level = log.info if request.method != "GET" or status >= 400 else log.debug
        level("admin request", method=request.method, path=request.path, status=status,
              ms=round((time.perf_counter() - started) * 1000, 1))


def require_token(token: Secret) -> Middleware:
    """`token` is compared as bytes with `hmac.compare_digest`: the time taken does not say
    how much of a guess was right."""
    expected = token.reveal().encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if (path == API_PREFIX or path.startswith(API_PREFIX + "/")) \
                and path not in PUBLIC_PATHS:
            given = request.headers.get(TOKEN_HEADER)
            if not given and COOKIE in request.cookies:
                # A signed-in console: its session opens the API as the token does; a write
                # must carry the session's CSRF token too (services/admin/console_sessions.py).
                session = await request.app[CONSOLE_SESSIONS].find(request.cookies[COOKIE])
                if session is not None:
                    if not session.allows(request.method, request.headers.get(CSRF_HEADER)):
                        log.warning("console write without its csrf token", path=path)
                        raise ApiError.permission(
                            f"A console write needs the {CSRF_HEADER} header of its session.",
                            code="csrf_token_missing")
                    return await handler(request)
            if not given:
                log.warning("admin token missing", path=path)
                raise ApiError.authentication(
                    f"Missing {TOKEN_HEADER} header: the admin API needs the admin token.",
                    code="missing_admin_token")
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
                log.warning("admin token rejected", path=path)
                raise ApiError.authentication(f"Invalid {TOKEN_HEADER}.",
                                              code="invalid_admin_token")
        return await handler(request)

    return check_token


@web.middleware
async def check_request(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse what the route's declaration does not allow, before its handler runs."""
    route = route_of(request)
    if route is not None:
        check_query(list(request.query.items()), route.query)
        if route.body is not None and route.body_required \
                and not (await request.read()).strip():
            raise FieldError("This route needs a JSON body (`{}` when no field is given).")
    return await handler(request)
