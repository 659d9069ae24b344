"""Deployments: which model runs in which regions, on which GPUs, between how many nodes."""

from __future__ import annotations

from aiohttp import web

from services.admin.bodies import DeploymentCreate, DeploymentList, DeploymentPatch
from services.admin.routing import PAGE_QUERY, Route, add
from services.admin.web_io import (
    catalog,
    db,
    given,
    json_response,
    no_content,
    page_query,
    path_id,
    read_body,
    require,
)
from services.domain.catalog import NotFound
from services.domain.catalog import queries as q
from services.domain.catalog.queries import DeploymentRecord
from services.infra.errors import ApiError
from services.infra.request_checks import check_unique, next_cursor


async def create_deployment(request: web.Request) -> web.Response:
    body = await read_body(request, DeploymentCreate)
    check_unique(body.regions, "regions")
    try:
        deployment_id = await catalog(request).create_deployment(
            body.model, regions=body.regions, gpu_type=body.gpu_type, spot=body.spot,
            min_nodes=body.min_nodes, max_nodes=body.max_nodes,
            allow_on_demand_fallback=body.allow_on_demand_fallback)
    except NotFound:
        raise ApiError.not_found(f"Model {body.model!r} is not in the catalog.", param="model",
                                 code="model_not_found") from None
    return json_response(require(await q.get_deployment(db(request), deployment_id),
                                 "deployment", deployment_id), 201)


async def list_deployments(request: web.Request) -> web.Response:
    page = page_query(request)
    rows = await q.list_deployments(db(request), after=page.after, limit=page.limit + 1)
    return json_response(DeploymentList(
        data=rows[:page.limit], next_cursor=next_cursor([r.id for r in rows], page.limit)))


async def get_deployment(request: web.Request) -> web.Response:
    deployment_id = path_id(request, "deployment_id", "deployment")
    return json_response(require(await q.get_deployment(db(request), deployment_id),
                                 "deployment", deployment_id))


async def update_deployment(request: web.Request) -> web.Response:
    deployment_id = path_id(request, "deployment_id", "deployment")
    body = await read_body(request, DeploymentPatch)
    regions = given(body.regions)
    if regions is not None:
        check_unique(regions, "regions")
    await catalog(request).update_deployment(
        deployment_id, regions=regions, gpu_type=given(body.gpu_type), spot=given(body.spot),
        min_nodes=given(body.min_nodes), max_nodes=given(body.max_nodes),
        allow_on_demand_fallback=given(body.allow_on_demand_fallback))
    return await get_deployment(request)


async def delete_deployment(request: web.Request) -> web.Response:
    deployment_id = path_id(request, "deployment_id", "deployment")
    await catalog(request).delete_deployment(deployment_id)
    return no_content()


TAG = "deployments"
ROUTES = (
    Route("POST", "/deployments", create_deployment, "Deploy a model of the catalog", TAG,
          body=DeploymentCreate, response=DeploymentRecord, status=201, errors=(404,),
          description="404 `model_not_found` when `model` names no model of the catalog; "
                      "409 when it is deleted."),
    Route("GET", "/deployments", list_deployments,
          "List deployments (deleted ones are left out)", TAG, response=DeploymentList,
          query=PAGE_QUERY),
    Route("GET", "/deployments/{deployment_id}", get_deployment,
          "Read a deployment (deleted ones too)", TAG, response=DeploymentRecord),
    Route("PATCH", "/deployments/{deployment_id}", update_deployment,
          "Change a deployment's regions, GPU type, spot use or node bounds", TAG,
          body=DeploymentPatch, response=DeploymentRecord, errors=(409,)),
    Route("DELETE", "/deployments/{deployment_id}", delete_deployment,
          "Delete a deployment (idempotent): event deployment.deleted", TAG, status=204,
          errors=(409,)),
)


def add_routes(app: web.Application) -> None:
    add(app, ROUTES)
