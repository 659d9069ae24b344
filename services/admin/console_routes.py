"""The operator console (issue 17): served by the admin service at ``/console``, its own API
the admin API (``/admin/v1``, which a signed-in browser's session cookie opens as the token
does; services/admin/middleware.py). Here: the pages and their assets, signing in and out.

The pages are static files (services/admin/console/: HTML, one script, one style sheet, and
uPlot vendored with its checksums); nothing is rendered with data on the server, and the
script writes what it shows as text, never as HTML. A strict Content-Security-Policy allows
only this origin's scripts and styles, no framing.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Final

import structlog
from aiohttp import web

from services.admin.console_sessions import COOKIE, CSRF_HEADER, ConsoleSessions
from services.admin.context import ADMIN_SETTINGS, CONSOLE_SESSIONS

log = structlog.get_logger("admin.console")

ASSETS: Final = Path(__file__).parent / "console"
PAGE_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
MAX_TOKEN: Final = 1024


SIGN_IN_REFUSED: Final = {
    401: "That token is not the admin token.",
    429: "Too many wrong tokens from here: try again in a few minutes.",
}
"""The sign-in page's messages: fixed sentences, never anything the client sent."""


def _page(name: str, status: int = 200) -> web.Response:
    body = (ASSETS / name).read_bytes()
    if status in SIGN_IN_REFUSED:
        body = body.replace(b"<!-- message -->", b'<p class="error" role="alert">'
                            + SIGN_IN_REFUSED[status].encode() + b"</p>")
    return web.Response(body=body, status=status, content_type="text/html", charset="utf-8",
                        headers=PAGE_HEADERS)


async def console(request: web.Request) -> web.Response:
    sessions = request.app[CONSOLE_SESSIONS]
    if await sessions.find(request.cookies.get(COOKIE)) is None:
        return _page("signin.html")
    return _page("index.html")


async def sign_in(request: web.Request) -> web.Response:
    sessions = request.app[CONSOLE_SESSIONS]
    client = request.remote or "unknown"
    if await sessions.blocked(client):
        log.warning("console sign-in refused: too many wrong tokens", client=client)
        return _page("signin.html", 429)
    form = await request.post()
    given = form.get("token")
    expected = request.app[ADMIN_SETTINGS].admin_token.reveal().encode()
    if not isinstance(given, str) or len(given) > MAX_TOKEN or not hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), expected):
        await sessions.failed(client)
        log.warning("console sign-in refused: wrong token", client=client)
        return _page("signin.html", 401)
    session = await sessions.start()
    log.info("console signed in", client=client)
    response = web.HTTPSeeOther("/console")
    _set_cookie(response, request, session.session_id, sessions.ttl)
    raise response


async def sign_out(request: web.Request) -> web.Response:
    sessions = request.app[CONSOLE_SESSIONS]
    session = await sessions.find(request.cookies.get(COOKIE))
    if session is not None:
        form = await request.post()
        given = request.headers.get(CSRF_HEADER) or form.get("csrf")
        if not session.allows("POST", given if isinstance(given, str) else None):
            raise web.HTTPForbidden(text="Sign-out needs the page's CSRF token.")
        await sessions.end(session.session_id)
    response = web.HTTPSeeOther("/console")
    response.del_cookie(COOKIE, path="/")
    raise response


async def session_info(request: web.Request) -> web.Response:
    """The page's CSRF token, for its writes (readable by this origin's script only)."""
    session = await request.app[CONSOLE_SESSIONS].find(request.cookies.get(COOKIE))
    if session is None:
        raise web.HTTPUnauthorized(text="Not signed in.")
    return web.json_response({"csrf_token": session.csrf},
                             headers={"Cache-Control": "no-store"})


def _set_cookie(response: web.StreamResponse, request: web.Request, value: str,
                ttl: int) -> None:
    response.set_cookie(COOKIE, value, max_age=ttl, path="/", httponly=True,
                        samesite="Strict", secure=request.secure)


def add_console_routes(app: web.Application) -> None:
    app.router.add_get("/console", console)
    app.router.add_post("/console/sign-in", sign_in)
    app.router.add_post("/console/sign-out", sign_out)
    app.router.add_get("/console/session", session_info)
    app.router.add_static("/console/assets", ASSETS, show_index=False, follow_symlinks=False,
                          append_version=False)


__all__ = ["ConsoleSessions", "add_console_routes"]
