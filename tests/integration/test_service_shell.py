"""The service shell every service is built on: health, readiness, metrics, request ids."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.infra.http import BUS, DB, EVENTLOG, REDIS, REQUEST_ID, Needs, create_app
from services.infra.natsauth.identities import Role
from services.infra.settings import CoreSettings, Secret, load_settings
from tests.conftest import Servers
from tests.helpers import tenant_created


def settings_for(servers: Servers, **overrides: object) -> CoreSettings:
    env = {"DATABASE_URL": servers.database_url, "REDIS_URL": servers.redis_url,
           "NATS_URL": servers.nats_url, "NATS_CREDS": servers.creds(Role.OBSERVER),
           "SERVICE_NAME": "shell-test"}
    return load_settings(CoreSettings, env, **overrides)


async def echo(request: web.Request) -> web.Response:
    t = tenant_created()
    await request.app[EVENTLOG].append(t.stream, [t])
    return web.json_response({"request_id": request[REQUEST_ID]})


@pytest.fixture
async def server(servers: Servers, database_url: str, redis_url: str,
                 nats_url: str) -> AsyncIterator[TestServer]:
    app = create_app(settings_for(servers))
    app.router.add_post("/echo/{thing}", echo)
    srv = TestServer(app)
    await srv.start_server()
    yield srv
    await srv.close()


async def test_health_ready_and_resources(server: TestServer) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(server.make_url("/health")) as r:
            assert r.status == 200
            assert await r.json() == {"status": "ok", "service": "shell-test"}
        async with s.get(server.make_url("/ready")) as r:
            assert r.status == 200
            body = await r.json()
            assert body == {"status": "ready",
                            "checks": {"postgres": "ok", "redis": "ok", "nats": "ok"}}
    app = server.app
    assert DB in app and REDIS in app and BUS in app


async def test_request_ids_are_echoed_or_made(server: TestServer) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(server.make_url("/echo/a"), headers={"X-Request-ID": "abc-123"}) as r:
            assert r.headers["X-Request-ID"] == "abc-123"
            assert (await r.json())["request_id"] == "abc-123"
        async with s.post(server.make_url("/echo/b"),
                          headers={"X-Request-ID": "bad id\twith spaces"}) as r:
            made = r.headers["X-Request-ID"]
            assert made != "bad id\twith spaces" and len(made) == 32
        async with s.get(server.make_url("/nowhere")) as r:
            assert r.status == 404
            assert r.headers["X-Request-ID"]


async def test_metrics_use_route_templates_not_raw_paths(server: TestServer) -> None:
    async with aiohttp.ClientSession() as s:
        for thing in ("a", "b", "c"):
            async with s.post(server.make_url(f"/echo/{thing}")) as r:
                assert r.status == 200
        async with s.get(server.make_url("/metrics")) as r:
            text = await r.text()
    assert 'http_requests_total{method="POST",path="/echo/{thing}",status="200"} 3.0' in text
    assert "/echo/a" not in text


async def test_ready_says_which_dependency_is_down(servers: Servers, database_url: str) -> None:
    # Redis on a port nobody listens on; Postgres fine; no NATS in this service.
    settings = settings_for(servers, redis_url=Secret("redis://127.0.0.1:1/0"))
    app = create_app(settings, needs=Needs(postgres=True, redis=True, nats=False))
    srv = TestServer(app)
    await srv.start_server()
    try:
        async with aiohttp.ClientSession() as s, s.get(srv.make_url("/ready")) as r:
            assert r.status == 503
            body = await r.json()
            assert body["checks"]["postgres"] == "ok"
            assert body["checks"]["redis"].startswith("error")
            assert "nats" not in body["checks"]
    finally:
        await srv.close()
