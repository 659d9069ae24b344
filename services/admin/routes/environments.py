"""Environments of a tenant (production, staging…): region, quota, status."""

from __future__ import annotations

from aiohttp import web

from schemas.events import EntityStatus
from services.admin.bodies import (
    EnvironmentPatch,
)
from services.admin.routing import PAGE_QUERY, Route, add
from services.admin.web_io import (
    catalog,
    changes,
    db,
    given,
    json_response,
    page_query,
    path_id,
    read_body,
    require,
)
from services.domain.catalog import queries as q
from services.domain.catalog.bodies import (
    EnvironmentCreate,
    EnvironmentList,
)
from services.domain.catalog.queries import EnvironmentRecord
from services.infra.request_checks import next_cursor


async def create_environment(request: web.Request) -> web.Response:
    tenant_id = path_id(request, "tenant_id", "tenant")
    body = await read_body(request, EnvironmentCreate)
    env_id = await catalog(request).create_environment(tenant_id, body.name, body.region,
                                                       body.quota.quota())
    return json_response(require(await q.get_environment(db(request), env_id), "environment",
                                 env_id), 201)


async def list_environments(request: web.Request) -> web.Response:
    tenant_id = path_id(request, "tenant_id", "tenant")
    page = page_query(request)
    require(await q.get_tenant(db(request), tenant_id), "tenant", tenant_id)
    rows = await q.list_environments(db(request), tenant_id, after=page.after,
                                     limit=page.limit + 1)
    return json_response(EnvironmentList(
        data=rows[:page.limit], next_cursor=next_cursor([r.id for r in rows], page.limit)))


async def get_environment(request: web.Request) -> web.Response:
    env_id = path_id(request, "environment_id", "environment")
    return json_response(require(await q.get_environment(db(request), env_id), "environment",
                                 env_id))


async def update_environment(request: web.Request) -> web.Response:
    env_id = path_id(request, "environment_id", "environment")
    body = await read_body(request, EnvironmentPatch)
    status = given(body.status)
    await catalog(request).update_environment(
        env_id, name=given(body.name), region=given(body.region), quota=changes(body.quota),
        status=None if status is None else EntityStatus(status))
    return await get_environment(request)


TAG = "environments"
ROUTES = (
    Route("POST", "/tenants/{tenant_id}/environments", create_environment,
          "Create an environment of a tenant", TAG, body=EnvironmentCreate,
          response=EnvironmentRecord, status=201),
    Route("GET", "/tenants/{tenant_id}/environments", list_environments,
          "List a tenant's environments", TAG, response=EnvironmentList, query=PAGE_QUERY),
    Route("GET", "/environments/{environment_id}", get_environment, "Read an environment",
          TAG, response=EnvironmentRecord),
    Route("PATCH", "/environments/{environment_id}", update_environment,
          "Change an environment: name, region, quota (fields given are set, null clears "
          "one), status", TAG, body=EnvironmentPatch, response=EnvironmentRecord,
          errors=(409,)),
)


def add_routes(app: web.Application) -> None:
    add(app, ROUTES)
