"""The route table: each route's method, path, handler and the types of its bodies. The router
is built from it and so is the OpenAPI document (services/admin/openapi.py), so a route cannot
exist without its documentation, nor the other way round."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from services.admin.context import API_PREFIX
from services.infra.request_checks import (
    CURSOR_PATTERN,
    DEFAULT_LIMIT,
    MAX_LIMIT,
    Integer,
    QueryParam,
    Text,
)

__all__ = ["PAGE_QUERY", "ROUTE_TABLE", "QueryParam", "Route", "add", "route_of"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    """Under ``/admin/v1``: ``/tenants/{tenant_id}``."""
    handler: Handler
    summary: str
    tag: str
    body: Any = None
    """The request body's type (a msgspec Struct), or None for none."""
    body_required: bool = True
    response: Any = None
    """The response body's type, or None for an empty response (204)."""
    status: int = 200
    query: tuple[QueryParam, ...] = ()
    errors: tuple[int, ...] = ()
    """Statuses besides the ones every route of its kind may answer (400, 401, 404, 413,
    415)."""
    media_type: str = "application/json"
    public: bool = False
    """Served without the admin token (only the OpenAPI document)."""
    description: str = ""

    @property
    def full_path(self) -> str:
        return API_PREFIX + self.path

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


PAGE_QUERY = (
    QueryParam("limit", "rows per page", Integer(1, MAX_LIMIT, DEFAULT_LIMIT)),
    QueryParam("cursor", "`next_cursor` of the previous page",
               Text(max_length=22, pattern=CURSOR_PATTERN)),
)

ROUTE_TABLE = web.AppKey("admin_route_table", dict[str, Route])
"""Each route by its operation id (the aiohttp route's name): what the request checks read."""


def add(app: web.Application, routes: Iterable[Route]) -> None:
    table = app.setdefault(ROUTE_TABLE, {})
    for route in routes:
        app.router.add_route(route.method, route.full_path, route.handler,
                             name=route.operation_id)
        table[route.operation_id] = route


def route_of(request: web.Request) -> Route | None:
    """The table's route that `request` matched; None for an unknown path or method."""
    name = request.match_info.route.name
    return request.app.get(ROUTE_TABLE, {}).get(name) if name else None
