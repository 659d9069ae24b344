"""The admin API's routes, one module per resource, each with a `ROUTES` table and an
`add_routes(app)`. A new resource (nodes, usage…) is a new module here, listed in `MODULES`:
the router and the OpenAPI document both come from these tables."""

from __future__ import annotations

from types import ModuleType

from aiohttp import web

from services.admin.routes import (
    billing,
    budgets,
    deployments,
    docs,
    environments,
    events,
    keys,
    models,
    nodes,
    subscriptions,
    tenants,
    usage,
)
from services.admin.routing import Route

MODULES: tuple[ModuleType, ...] = (tenants, environments, keys, budgets, models, deployments,
                                   nodes, usage, billing, subscriptions, events, docs)


def all_routes() -> list[Route]:
    routes: list[Route] = []
    for module in MODULES:
        routes.extend(module.ROUTES)
    return routes


def add_routes(app: web.Application) -> None:
    for module in MODULES:
        module.add_routes(app)
