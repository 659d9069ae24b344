"""The OpenAPI document of this API, served without the token: it holds no data."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from services.admin.context import OPENAPI_DOCUMENT
from services.admin.routing import Route, add


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_DOCUMENT], content_type="application/json")


ROUTES = (
    Route("GET", "/openapi.json", get_openapi, "This API's OpenAPI 3.1 document", "meta",
          response=dict[str, Any], public=True),
)


def add_routes(app: web.Application) -> None:
    add(app, ROUTES)
