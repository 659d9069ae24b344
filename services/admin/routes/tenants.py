"""Tenants: create, list, read, change, suspend, reactivate."""

from __future__ import annotations

from aiohttp import web

from services.admin.bodies import (
    TenantCreate,
    TenantList,
    TenantPatch,
)
from services.admin.routing import PAGE_QUERY, Route, add
from services.admin.web_io import (
    catalog,
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
    StatusChange,
)
from services.domain.catalog.queries import TenantRecord
from services.infra.request_checks import next_cursor


async def create_tenant(request: web.Request) -> web.Response:
    body = await read_body(request, TenantCreate)
    tenant_id = await catalog(request).create_tenant(body.name, body.email)
    return json_response(require(await q.get_tenant(db(request), tenant_id), "tenant",
                                 tenant_id), 201)


async def list_tenants(request: web.Request) -> web.Response:
    page = page_query(request)
    rows = await q.list_tenants(db(request), after=page.after, limit=page.limit + 1)
    return json_response(TenantList(data=rows[:page.limit],
                                    next_cursor=next_cursor([r.id for r in rows], page.limit)))


async def get_tenant(request: web.Request) -> web.Response:
    tenant_id = path_id(request, "tenant_id", "tenant")
    return json_response(require(await q.get_tenant(db(request), tenant_id), "tenant",
                                 tenant_id))


async def update_tenant(request: web.Request) -> web.Response:
    tenant_id = path_id(request, "tenant_id", "tenant")
    body = await read_body(request, TenantPatch)
    await catalog(request).update_tenant(tenant_id, name=given(body.name),
                                         email=given(body.email))
    return await get_tenant(request)


async def suspend_tenant(request: web.Request) -> web.Response:
    tenant_id = path_id(request, "tenant_id", "tenant")
    body = await read_body(request, StatusChange)
    await catalog(request).suspend_tenant(tenant_id, body.reason)
    return await get_tenant(request)


async def reactivate_tenant(request: web.Request) -> web.Response:
    tenant_id = path_id(request, "tenant_id", "tenant")
    body = await read_body(request, StatusChange)
    await catalog(request).reactivate_tenant(tenant_id, body.reason)
    return await get_tenant(request)


TAG = "tenants"
ROUTES = (
    Route("POST", "/tenants", create_tenant, "Create a tenant", TAG, body=TenantCreate,
          response=TenantRecord, status=201),
    Route("GET", "/tenants", list_tenants, "List tenants (by id, paged)", TAG,
          response=TenantList, query=PAGE_QUERY),
    Route("GET", "/tenants/{tenant_id}", get_tenant, "Read a tenant", TAG,
          response=TenantRecord),
    Route("PATCH", "/tenants/{tenant_id}", update_tenant, "Change a tenant's name or e-mail",
          TAG, body=TenantPatch, response=TenantRecord, errors=(409,)),
    Route("POST", "/tenants/{tenant_id}/suspend", suspend_tenant,
          "Suspend a tenant: its keys are refused at once", TAG, body=StatusChange,
          body_required=False, response=TenantRecord, errors=(409,)),
    Route("POST", "/tenants/{tenant_id}/reactivate", reactivate_tenant,
          "Reactivate a suspended tenant", TAG, body=StatusChange, body_required=False,
          response=TenantRecord, errors=(409,)),
)


def add_routes(app: web.Application) -> None:
    add(app, ROUTES)
