"""The admin application: the service shell (PostgreSQL, Redis, NATS), the admin
middlewares, the routes, and the OpenAPI document built once at start-up."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from services.admin.console_routes import add_console_routes
from services.admin.console_sessions import ConsoleSessions
from services.admin.context import (
    ADMIN_SETTINGS,
    CONSOLE_SESSIONS,
    EVENT_STREAMS,
    OPENAPI_DOCUMENT,
    EventStreams,
)
from services.admin.middleware import answer_errors, check_request, require_token
from services.admin.openapi import render
from services.admin.routes import add_routes
from services.admin.settings import AdminSettings, check_settings
from services.infra.http import REDIS, Needs, create_app


async def _end_event_streams(app: web.Application) -> None:
    app[EVENT_STREAMS].closing.set()


async def _console_ctx(app: web.Application) -> AsyncIterator[None]:
    app[CONSOLE_SESSIONS] = ConsoleSessions(app[REDIS])
    yield


def create_admin_app(settings: AdminSettings) -> web.Application:
    """SettingsError when the settings cannot work (no admin token): refuse, do not start."""
    check_settings(settings)
    # Redis for nodes' latest heartbeats.
    app = create_app(settings, needs=Needs(postgres=True, redis=True, nats=True),
                     middlewares=(answer_errors, require_token(settings.admin_token),
                                  check_request),
                     client_max_size=settings.max_body_bytes)
    app[ADMIN_SETTINGS] = settings
    app[OPENAPI_DOCUMENT] = render().encode()
    app[EVENT_STREAMS] = EventStreams()
    app.on_shutdown.append(_end_event_streams)
    app.cleanup_ctx.append(_console_ctx)  # after the shell's: it needs Redis
    add_routes(app)
    add_console_routes(app)
    return app
