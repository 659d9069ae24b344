"""The gateway's middleware stack over real HTTP: headers, errors, limits, timeouts, streams,
CORS, logs and metrics. Small dummy handlers stand in for auth and the proxy."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from services.gateway.errors import ApiError
from services.gateway.middleware import REAL_IP, MiddlewareConfig, install_middleware
from services.infra.http import REGISTRY, REQUEST_ID, Needs, create_app
from services.infra.http import metrics as metrics_handler
from services.infra.settings import CoreSettings
from tests.helpers import eventually

SECURITY = {
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains; preload",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "X-XSS-Protection": "1; mode=block",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "strict-origin-when-cross-origin",
    "Permissions-Policy": "geolocation=(), microphone=(), camera=()",
}
LIMIT = 1024
CONFIG = MiddlewareConfig(max_body_bytes=LIMIT, request_timeout=0.5, stream_chunk_timeout=0.25)
SECRET_KEY = "clsk_live_do-not-log-me"


@dataclass
class Seen:
    """What the handlers and the stand-in auth middleware saw."""

    auth: list[str] = field(default_factory=list)
    handled: list[str] = field(default_factory=list)


SEEN = web.AppKey("seen", Seen)


@web.middleware
async def stand_in_auth(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
    """What the real auth layer does, roughly: after the stack, refuses /v1 without a key."""
    request.app[SEEN].auth.append(request.path)
    if request.path.startswith("/v1/"):
        if request.headers.get("Authorization") != f"Bearer {SECRET_KEY}":
            raise ApiError.authentication()
        structlog.contextvars.bind_contextvars(tenant_id="t-1", environment_id="e-1",
                                               key_id="k-1")
    return await handler(request)


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def thing(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response({"id": request.match_info["id"], "got": body,
                              "request_id": request[REQUEST_ID], "real_ip": request[REAL_IP]})


async def upload(request: web.Request) -> web.Response:
    request.app[SEEN].handled.append("upload")
    body = await request.read()
    return web.json_response({"size": len(body)})


async def whoami(request: web.Request) -> web.Response:
    # A handler's own security header is replaced, not doubled.
    return web.json_response({"request_id": request[REQUEST_ID], "real_ip": request[REAL_IP]},
                             headers={"X-Frame-Options": "SAMEORIGIN"})


async def rate_limited(request: web.Request) -> web.Response:
    raise ApiError.rate_limited("Slow down.", {"Retry-After": "3",
                                               "x-ratelimit-remaining-requests": "0"})


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("database password is hunter2")


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(30)  # past the 0.5 s deadline: the deadline cancels this
    return web.json_response({})


def streamer(*, chunks: int, interval: float, content_type: str = "text/event-stream",
             then: str = "done") -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        for n in range(chunks):
            await response.write(f'data: {{"n": {n}}}\n\n'.encode())
            await asyncio.sleep(interval)
        if then == "stall":
            await asyncio.sleep(30)
        elif then == "raise":
            raise RuntimeError("stream secret hunter2")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    return handler


def make_app(config: MiddlewareConfig, client_max_size: int | None) -> web.Application:
    app = web.Application(middlewares=[stand_in_auth],
                          client_max_size=client_max_size or config.max_body_bytes)
    app[SEEN] = Seen()
    r = app.router
    r.add_get("/ok", ok)
    r.add_get("/whoami", whoami)
    r.add_post("/v1/things/{id}", thing)
    r.add_post("/upload", upload)
    r.add_get("/fail/rate", rate_limited)
    r.add_get("/fail/boom", boom)
    r.add_get("/slow", slow)
    # 12 chunks 0.05 s apart: 0.6 s in all, past the 0.5 s request deadline, never 0.25 s silent.
    r.add_get("/stream/fast", streamer(chunks=12, interval=0.05))
    r.add_get("/stream/stall", streamer(chunks=2, interval=0, then="stall"))
    r.add_get("/stream/raw-stall", streamer(chunks=1, interval=0, then="stall",
                                            content_type="application/x-ndjson"))
    r.add_get("/stream/raise", streamer(chunks=1, interval=0, then="raise"))
    r.add_get("/stream/endless", streamer(chunks=10_000, interval=0.01))
    install_middleware(app, config)
    r.add_get("/metrics", metrics_handler)
    return app


Start = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    started: list[TestServer] = []

    async def _start(config: MiddlewareConfig = CONFIG, *,
                     client_max_size: int | None = None) -> TestServer:
        srv = TestServer(make_app(config, client_max_size))
        await srv.start_server()
        started.append(srv)
        return srv

    yield _start
    for srv in started:
        await srv.close()


@pytest.fixture
async def server(start: Start) -> TestServer:
    return await start()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        yield s


def assert_edge_headers(resp: aiohttp.ClientResponse) -> None:
    for name, value in SECURITY.items():
        assert resp.headers.getall(name) == [value], name
    assert len(resp.headers.getall("X-Request-ID")) == 1


async def error_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    err: dict[str, Any] = body["error"]
    return err


def metrics_text(srv: TestServer) -> str:
    return generate_latest(srv.app[REGISTRY]).decode()


def request_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "request"]


# --------------------------------------------------------------------------- headers, ids


async def test_success_carries_security_headers_and_a_request_id(
        server: TestServer, session: aiohttp.ClientSession) -> None:
    async with session.get(server.make_url("/ok")) as r:
        assert r.status == 200
        assert_edge_headers(r)
        assert len(r.headers["X-Request-ID"]) == 32
    async with session.get(server.make_url("/whoami"), headers={"X-Request-ID": "abc-123"}) as r:
        assert_edge_headers(r)
        assert r.headers["X-Request-ID"] == "abc-123"
        assert (await r.json())["request_id"] == "abc-123"
    async with session.get(server.make_url("/whoami"),
                           headers={"X-Request-ID": "bad id\twith spaces"}) as r:
        made = r.headers["X-Request-ID"]
        assert made != "bad id\twith spaces" and len(made) == 32
        assert (await r.json())["request_id"] == made


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "type_", "code"), [
    ("GET", "/nowhere/42", {}, 404, "not_found_error", None),
    ("GET", "/upload", {}, 405, "invalid_request_error", "method_not_allowed"),
    ("POST", "/v1/things/1", {"json": {}}, 401, "authentication_error", "invalid_api_key"),
    ("GET", "/fail/rate", {}, 429, "rate_limit_error", "rate_limit_exceeded"),
    ("GET", "/fail/boom", {}, 500, "server_error", None),
    ("GET", "/slow", {}, 504, "timeout", None),
    ("POST", "/upload", {"data": b"hello", "headers": {"Content-Type": "text/plain"}},
     415, "invalid_request_error", "unsupported_media_type"),
    ("POST", "/upload", {"data": b"x" * (LIMIT + 1),
                         "headers": {"Content-Type": "application/json"}},
     413, "invalid_request_error", "request_too_large"),
])
async def test_errors_are_openai_shaped_with_the_edge_headers(
        server: TestServer, session: aiohttp.ClientSession, method: str, path: str,
        kwargs: dict[str, Any], status: int, type_: str, code: str | None) -> None:
    async with session.request(method, server.make_url(path), **kwargs) as r:
        assert r.status == status
        assert_edge_headers(r)
        err = await error_of(r)
        assert (err["type"], err["code"]) == (type_, code)
        assert err["message"]


async def test_error_details(server: TestServer, session: aiohttp.ClientSession) -> None:
    async with session.get(server.make_url("/nowhere/42")) as r:
        assert (await error_of(r))["message"] == "Invalid URL (GET /nowhere/42)"
    async with session.get(server.make_url("/upload")) as r:
        assert r.headers["Allow"] == "POST"
    async with session.get(server.make_url("/fail/rate")) as r:
        assert r.headers["Retry-After"] == "3"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert (await error_of(r))["message"] == "Slow down."


async def test_a_crash_is_logged_not_shown(server: TestServer,
                                           session: aiohttp.ClientSession) -> None:
    with capture_logs() as logs:
        async with session.get(server.make_url("/fail/boom")) as r:
            text = await r.text()
            request_id = r.headers["X-Request-ID"]
    assert r.status == 500
    assert "hunter2" not in text and "RuntimeError" not in text and "Traceback" not in text
    assert request_id in json.loads(text)["error"]["message"]
    crash = [e for e in logs if e["event"] == "unhandled exception"]
    assert len(crash) == 1 and crash[0]["log_level"] == "error"
    assert isinstance(crash[0]["exc_info"], RuntimeError)


async def test_timeout_answers_504_at_the_deadline(server: TestServer,
                                                   session: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    async with session.get(server.make_url("/slow")) as r:
        assert r.status == 504
        assert (await error_of(r))["message"] == "The request did not complete within 0.5 seconds."
    assert 0.45 < time.monotonic() - started < 3


# --------------------------------------------------------------------------- body checks


async def test_json_bodies_pass_and_others_are_refused(
        server: TestServer, session: aiohttp.ClientSession) -> None:
    auth = {"Authorization": f"Bearer {SECRET_KEY}"}
    async with session.post(server.make_url("/v1/things/7"), json={"a": 1}, headers=auth) as r:
        assert r.status == 200
        assert (await r.json())["got"] == {"a": 1}
    async with session.post(server.make_url("/upload"), data=b"{}",
                            headers={"Content-Type": "Application/JSON; charset=utf-8"}) as r:
        assert r.status == 200
    async with session.post(server.make_url("/upload")) as r:  # no body: nothing to check
        assert r.status == 200
    async with session.post(server.make_url("/upload"), data=b"{}") as r:  # no Content-Type
        assert r.status == 415
        assert "application/octet-stream" in (await error_of(r))["message"]


async def test_declared_oversize_is_refused_before_the_handler(
        server: TestServer, session: aiohttp.ClientSession) -> None:
    async with session.post(server.make_url("/upload"), data=b"x" * (LIMIT + 1),
                            headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
        assert r.headers["Connection"] == "close"
    async with session.post(server.make_url("/upload"), data=b"x" * LIMIT,
                            headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200
        assert (await r.json())["size"] == LIMIT
    assert server.app[SEEN].handled == ["upload"]  # only the one within the limit


async def test_a_body_that_cannot_be_decoded_is_the_clients_fault(
        server: TestServer, session: aiohttp.ClientSession) -> None:
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    with capture_logs() as logs:
        async with session.post(server.make_url("/upload"), data=b"not gzip", headers=headers,
                                compress=None) as r:
            assert r.status == 400
            assert_edge_headers(r)
            assert (await error_of(r))["type"] == "invalid_request_error"
    assert not [e for e in logs if e["log_level"] == "error"]


@pytest.mark.parametrize("client_max_size", [None, 1024 ** 2])
async def test_a_chunked_body_is_stopped_when_it_grows_past_the_limit(
        start: Start, session: aiohttp.ClientSession, client_max_size: int | None) -> None:
    # None: the app's own limit is ours. 1 MiB: the stack must impose its smaller one.
    srv = await start(client_max_size=client_max_size)

    async def body(total: int) -> AsyncIterator[bytes]:
        for _ in range(total // 256):
            yield b"x" * 256

    headers = {"Content-Type": "application/json"}
    async with session.post(srv.make_url("/upload"), data=body(LIMIT * 2), headers=headers) as r:
        assert r.status == 413
        assert_edge_headers(r)
        err = await error_of(r)
        assert err["code"] == "request_too_large" and str(LIMIT) in err["message"]
    async with session.post(srv.make_url("/upload"), data=body(LIMIT), headers=headers) as r:
        assert r.status == 200
        assert (await r.json())["size"] == LIMIT


# --------------------------------------------------------------------------- real IP


async def test_real_ip_from_trusted_proxies_only(start: Start,
                                                 session: aiohttp.ClientSession) -> None:
    xff = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9, 10.0.0.5"}
    default = await start()  # trusts loopback only: 10.0.0.5 is the client
    behind_lb = await start(MiddlewareConfig(trusted_proxies=("127.0.0.1/32", "10.0.0.0/8")))
    trusting_nobody = await start(MiddlewareConfig(trusted_proxies=()))
    cases = [(default, xff, "10.0.0.5"), (behind_lb, xff, "203.0.113.9"),
             (trusting_nobody, xff, "127.0.0.1"),
             (default, {"X-Real-IP": "198.51.100.4"}, "198.51.100.4"),
             (default, {}, "127.0.0.1")]
    for srv, headers, expected in cases:
        async with session.get(srv.make_url("/whoami"), headers=headers) as r:
            assert (await r.json())["real_ip"] == expected, (headers, expected)


# --------------------------------------------------------------------------- streams


async def test_a_stream_lives_past_the_request_deadline_while_it_flows(
        server: TestServer, session: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    async with session.get(server.make_url("/stream/fast")) as r:
        assert r.status == 200
        assert_edge_headers(r)
        body = await r.text()
    assert time.monotonic() - started > CONFIG.request_timeout
    assert body.count("data: {") == 12 and body.endswith("data: [DONE]\n\n")


async def test_a_stalled_stream_ends_with_an_error_event(
        server: TestServer, session: aiohttp.ClientSession) -> None:
    with capture_logs() as logs:
        async with session.get(server.make_url("/stream/stall")) as r:
            assert r.status == 200
            assert_edge_headers(r)
            events = (await r.text()).split("\n\n")
        assert events[:2] == ['data: {"n": 0}', 'data: {"n": 1}']
        error = json.loads(events[2].removeprefix("data: "))["error"]
        assert (error["type"], error["code"]) == ("timeout", "stream_timeout")
        assert events[3:] == [""]
        line = (await eventually(lambda: _async(request_lines(logs)),
                                 what="the request's log line"))[0]
    assert line["status"] == 200 and line["aborted"] == "timeout"
    assert ('http_stream_aborts_total{method="GET",path="/stream/stall",reason="timeout"} 1.0'
            in metrics_text(server))


async def test_a_stalled_raw_stream_is_cut(server: TestServer,
                                           session: aiohttp.ClientSession) -> None:
    async with session.get(server.make_url("/stream/raw-stall")) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_a_crash_mid_stream_ends_it_with_a_server_error_event(
        server: TestServer, session: aiohttp.ClientSession) -> None:
    async with session.get(server.make_url("/stream/raise")) as r:
        text = await r.text()
    assert "hunter2" not in text
    error = json.loads(text.split("\n\n")[1].removeprefix("data: "))["error"]
    assert error["type"] == "server_error"


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_a_client_hanging_up_mid_stream_is_logged(
        session: aiohttp.ClientSession, handler_cancellation: bool) -> None:
    # Production runs without handler cancellation (the next write fails); tests' TestServer
    # with it (the handler is cancelled). Both must read as a client that went away.
    runner = web.AppRunner(make_app(CONFIG, None), handler_cancellation=handler_cancellation)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with capture_logs() as logs:
            async with session.get(f"http://127.0.0.1:{port}/stream/endless") as r:
                await r.content.readline()
                assert r.connection is not None and r.connection.transport is not None
                r.connection.transport.abort()
            line = (await eventually(lambda: _async(request_lines(logs)),
                                     what="the request's log line"))[0]
    finally:
        await runner.cleanup()
    assert line["aborted"] == "client_disconnected" and line["status"] == 200


async def _async(value: Any) -> Any:
    return value


# --------------------------------------------------------------------------- CORS


async def test_preflight_is_answered_before_auth(server: TestServer,
                                                 session: aiohttp.ClientSession) -> None:
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
    async with session.options(server.make_url("/v1/things/1"), headers=headers) as r:
        assert r.status == 204
        assert_edge_headers(r)
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert r.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        assert "X-Session-Id" in r.headers["Access-Control-Allow-Headers"]  # affinity
        assert r.headers["Access-Control-Max-Age"] == "600"
    assert server.app[SEEN].auth == []


async def test_cross_origin_errors_are_readable(server: TestServer,
                                                session: aiohttp.ClientSession) -> None:
    async with session.post(server.make_url("/v1/things/1"), json={},
                            headers={"Origin": "https://app.example"}) as r:
        assert r.status == 401
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        exposed = r.headers["Access-Control-Expose-Headers"]
        assert "X-Request-ID" in exposed and "x-ratelimit-remaining-requests" in exposed
        # A browser client can read why it was refused and what a budget cut its answer to.
        assert "x-ratelimit-scope" in exposed and "x-budget-max-tokens" in exposed


async def test_listed_origins(start: Start, session: aiohttp.ClientSession) -> None:
    srv = await start(MiddlewareConfig(cors_origins=("https://app.example",)))
    async with session.get(srv.make_url("/ok"), headers={"Origin": "https://app.example"}) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert r.headers["Vary"] == "Origin"
    async with session.get(srv.make_url("/ok"), headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 200
        assert "Access-Control-Allow-Origin" not in r.headers
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with session.options(srv.make_url("/ok"), headers=preflight) as r:
        assert r.status == 204
        assert "Access-Control-Allow-Origin" not in r.headers


# --------------------------------------------------------------------------- logs, metrics


async def test_one_log_line_per_request_with_route_and_tenant(
        server: TestServer, session: aiohttp.ClientSession) -> None:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with session.post(server.make_url("/v1/things/abc987"), json={"a": 1},
                                headers={"Authorization": f"Bearer {SECRET_KEY}",
                                         "X-Request-ID": "req-42",
                                         "X-Forwarded-For": "203.0.113.9"}) as r:
            assert r.status == 200
    [line] = request_lines(logs)
    assert line["log_level"] == "info"
    assert {k: line[k] for k in ("method", "route", "status", "bytes_in", "client_ip",
                                 "request_id", "tenant_id", "environment_id", "key_id")} == {
        "method": "POST", "route": "/v1/things/{id}", "status": 200, "bytes_in": 8,
        "client_ip": "203.0.113.9", "request_id": "req-42", "tenant_id": "t-1",
        "environment_id": "e-1", "key_id": "k-1"}
    assert line["bytes_out"] > 0 and line["duration_ms"] >= 0
    assert "abc987" not in str(line)
    assert SECRET_KEY not in str(logs) and "authorization" not in str(logs).lower()


async def test_metrics_use_route_templates_and_bounded_labels(
        server: TestServer, session: aiohttp.ClientSession) -> None:
    auth = {"Authorization": f"Bearer {SECRET_KEY}"}
    for thing_id in ("a1", "b2", "c3"):
        async with session.post(server.make_url(f"/v1/things/{thing_id}"), json={"n": 1},
                                headers=auth) as r:
            assert r.status == 200
    async with session.get(server.make_url("/nowhere/123")) as r:
        assert r.status == 404
    async with session.delete(server.make_url("/ok")) as r:
        assert r.status == 405
    async with session.post(server.make_url("/upload"), data=b"x" * (LIMIT + 1),
                            headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
    async with session.get(server.make_url("/metrics")) as r:
        text = await r.text()
    assert 'http_requests_total{method="POST",path="/v1/things/{id}",status="200"} 3.0' in text
    assert 'http_requests_total{method="GET",path="unmatched",status="404"} 1.0' in text
    assert 'http_requests_total{method="DELETE",path="unmatched",status="405"} 1.0' in text
    assert 'http_requests_total{method="POST",path="/upload",status="413"} 1.0' in text
    assert ('http_request_duration_seconds_count{method="POST",path="/v1/things/{id}"} 3.0'
            in text)
    assert 'http_request_size_bytes_sum{method="POST",path="/v1/things/{id}"} 24.0' in text
    assert 'http_response_size_bytes_count{method="POST",path="/v1/things/{id}"} 3.0' in text
    for raw in ("a1", "b2", "c3", "/nowhere"):
        assert raw not in text


async def test_with_the_service_shell(session: aiohttp.ClientSession) -> None:
    app = create_app(CoreSettings(service_name="gw"), needs=Needs(postgres=False, redis=False,
                                                                  nats=False))
    stack = install_middleware(app, CONFIG)
    assert tuple(app.middlewares) == stack.middlewares  # the shell's two were replaced
    srv = TestServer(app)
    await srv.start_server()
    try:
        async with session.get(srv.make_url("/health"), headers={"X-Request-ID": "r-1"}) as r:
            assert r.status == 200
            assert_edge_headers(r)
            assert r.headers["X-Request-ID"] == "r-1"
        async with session.get(srv.make_url("/metrics")) as r:
            text = await r.text()
        # Counted once: the shell's own counter middleware is gone, its metric is reused.
        assert 'http_requests_total{method="GET",path="/health",status="200"} 1.0' in text
        assert "http_request_size_bytes_bucket" in text
    finally:
        await srv.close()
