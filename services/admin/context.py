"""The admin app's typed keys: what handlers find on `request.app`."""

from __future__ import annotations

import asyncio

from aiohttp import web

from services.admin.console_sessions import ConsoleSessions
from services.admin.settings import AdminSettings

API_PREFIX = "/admin/v1"
TOKEN_HEADER = "X-Admin-Token"


class EventStreams:
    """Open `/events/stream` responses. Shutdown sets `closing`: each stream ends within one
    poll interval with a clean end of stream, instead of being cut when the server's
    shutdown timeout runs out."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.open = 0


ADMIN_SETTINGS = web.AppKey("admin_settings", AdminSettings)
OPENAPI_DOCUMENT = web.AppKey("admin_openapi", bytes)
EVENT_STREAMS = web.AppKey("admin_event_streams", EventStreams)
CONSOLE_SESSIONS = web.AppKey("admin_console_sessions", ConsoleSessions)
