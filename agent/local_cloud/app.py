"""The local cloud's HTTP API (what the local launcher calls, and tests and operators too):

    POST   /clusters                  launch {name, provider, region, spot, model_name, env,
                                      weights_source?}
    GET    /clusters                  the machines that are up
    DELETE /clusters/{name}           tear one down (404: no such cluster)
    POST   /clusters/{name}/preempt   spot notice now, machine gone in {notice_seconds}
    PUT    /capacity                  {region, spot, available}: make launches there fail
    *      /clusters/{name}/metadata/…  the machine's cloud metadata service (for its agent)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from agent.local_cloud.cloud import CloudConfig, CloudError, LocalCloud, MachineRequest
from agent.local_cloud.metadata import MetadataState, add_metadata_routes

CLOUD = web.AppKey("local_cloud", LocalCloud)

T = TypeVar("T")


class LaunchBody(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    provider: str
    region: str
    spot: bool
    model_name: str
    env: dict[str, str] = {}
    weights_source: str | None = None


class PreemptBody(msgspec.Struct, forbid_unknown_fields=True):
    notice_seconds: float = 120.0


class CapacityBody(msgspec.Struct, forbid_unknown_fields=True):
    region: str
    spot: bool
    available: bool


def _error(exc: CloudError) -> web.Response:
    return web.json_response({"error": {"message": str(exc), "type": exc.kind}},
                             status=exc.status)


async def _body(request: web.Request, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(await request.read(), type=kind)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise CloudError(f"invalid body: {exc}") from None


async def launch(request: web.Request) -> web.Response:
    cloud = request.app[CLOUD]
    try:
        body = await _body(request, LaunchBody)
        metadata_url = f"{request.scheme}://{request.host}/clusters/{body.name}/metadata"
        machine = await cloud.launch(MachineRequest(body.name, body.provider, body.region,
                                                    body.spot, body.model_name, body.env,
                                                    body.weights_source),
                                     metadata_url)
    except CloudError as exc:
        return _error(exc)
    return web.json_response(machine.describe(), status=201)


async def clusters(request: web.Request) -> web.Response:
    machines = request.app[CLOUD].machines.values()
    return web.json_response({"clusters": [m.describe() for m in machines]})


async def terminate(request: web.Request) -> web.Response:
    try:
        await request.app[CLOUD].terminate(request.match_info["name"])
    except CloudError as exc:
        return _error(exc)
    return web.json_response({"name": request.match_info["name"], "status": "terminated"})


async def preempt(request: web.Request) -> web.Response:
    try:
        body = await _body(request, PreemptBody)
        deadline = request.app[CLOUD].preempt(request.match_info["name"], body.notice_seconds)
    except CloudError as exc:
        return _error(exc)
    return web.json_response({"name": request.match_info["name"],
                              "deadline": deadline.isoformat()}, status=202)


async def capacity(request: web.Request) -> web.Response:
    try:
        body = await _body(request, CapacityBody)
    except CloudError as exc:
        return _error(exc)
    cloud = request.app[CLOUD]
    cloud.set_capacity(body.region, body.spot, body.available)
    full: list[dict[str, Any]] = [{"region": r, "spot": s} for r, s in sorted(cloud.full)]
    return web.json_response({"full": full})


def _machine_metadata(request: web.Request) -> MetadataState:
    machine = request.app[CLOUD].machines.get(request.match_info["name"])
    if machine is None:
        raise web.HTTPNotFound()
    return machine.metadata


def create_cloud_app(config: CloudConfig) -> web.Application:
    app = web.Application()

    async def cloud_ctx(app: web.Application) -> AsyncIterator[None]:
        app[CLOUD] = LocalCloud(config)
        yield
        await app[CLOUD].close()

    app.cleanup_ctx.append(cloud_ctx)
    app.router.add_post("/clusters", launch)
    app.router.add_get("/clusters", clusters)
    app.router.add_delete("/clusters/{name}", terminate)
    app.router.add_post("/clusters/{name}/preempt", preempt)
    app.router.add_put("/capacity", capacity)
    add_metadata_routes(app.router, "/clusters/{name}/metadata", _machine_metadata)
    return app
