"""Models of the catalog: what can be deployed and what a million tokens cost."""

from __future__ import annotations

from aiohttp import web

from schemas.events import EntityStatus
from services.admin.bodies import ModelCreate, ModelList, ModelPatch
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
from services.domain.catalog.queries import ModelRecord
from services.infra.request_checks import check_price, next_cursor


async def create_model(request: web.Request) -> web.Response:
    body = await read_body(request, ModelCreate)
    model_id = await catalog(request).create_model(
        body.name, family=body.family, vram_gb=body.vram_gb,
        input_price_per_million=check_price(body.input_price_per_million,
                                            "input_price_per_million"),
        output_price_per_million=check_price(body.output_price_per_million,
                                             "output_price_per_million"),
        context_length=body.context_length, weights_source=body.weights_source)
    return json_response(require(await q.get_model(db(request), model_id), "model", model_id),
                         201)


async def list_models(request: web.Request) -> web.Response:
    page = page_query(request)
    rows = await q.list_models(db(request), after=page.after, limit=page.limit + 1)
    return json_response(ModelList(data=rows[:page.limit],
                                   next_cursor=next_cursor([r.id for r in rows], page.limit)))


async def get_model(request: web.Request) -> web.Response:
    model_id = path_id(request, "model_id", "model")
    return json_response(require(await q.get_model(db(request), model_id), "model", model_id))


async def update_model(request: web.Request) -> web.Response:
    model_id = path_id(request, "model_id", "model")
    body = await read_body(request, ModelPatch)
    input_price = given(body.input_price_per_million)
    output_price = given(body.output_price_per_million)
    status = given(body.status)
    await catalog(request).update_model(
        model_id, family=given(body.family), vram_gb=given(body.vram_gb),
        input_price_per_million=None if input_price is None
        else check_price(input_price, "input_price_per_million"),
        output_price_per_million=None if output_price is None
        else check_price(output_price, "output_price_per_million"),
        context_length=given(body.context_length),
        status=None if status is None else EntityStatus(status),
        weights_source=given(body.weights_source))
    return await get_model(request)


TAG = "models"
ROUTES = (
    Route("POST", "/models", create_model, "Add a model to the catalog", TAG, body=ModelCreate,
          response=ModelRecord, status=201, errors=(409,)),
    Route("GET", "/models", list_models, "List models", TAG, response=ModelList,
          query=PAGE_QUERY),
    Route("GET", "/models/{model_id}", get_model, "Read a model", TAG, response=ModelRecord),
    Route("PATCH", "/models/{model_id}", update_model,
          "Change a model's family, VRAM, prices, context length, status or weights source", TAG,
          body=ModelPatch, response=ModelRecord, errors=(409,)),
)


def add_routes(app: web.Application) -> None:
    add(app, ROUTES)
