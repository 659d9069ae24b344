"""The gateway's upstream HTTP client against a real HTTP server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from services.core.devstack import free_port
from services.gateway.upstream import ConnectFailed, Dropped, ReadTimeout, UpstreamPool

PEERS = web.AppKey("peers", list)


async def echo(request: web.Request) -> web.Response:
    request.app[PEERS].append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
    body = await request.read()
    return web.json_response({"got": body.decode(), "rid": request.headers.get("X-Request-Id")})


async def chunks(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)  # chunked transfer encoding
    for i in range(5):
        await resp.write(f"data: {i}\n\n".encode())
        await asyncio.sleep(0.01)
    await resp.write_eof()
    return resp


async def silent(request: web.Request) -> web.Response:
    await asyncio.sleep(5)
    return web.Response(text="too late")


async def dropper(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    await resp.prepare(request)
    await resp.write(b"partial")
    assert request.transport is not None
    request.transport.close()
    return resp


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, web.Application]]:
    app = web.Application()
    app[PEERS] = []
    app.router.add_post("/echo", echo)
    app.router.add_post("/chunks", chunks)
    app.router.add_post("/silent", silent)
    app.router.add_post("/drop", dropper)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", app
    await runner.cleanup()


async def test_whole_answers_reuse_one_connection(served: tuple[str, web.Application]) -> None:
    server, app = served
    pool = UpstreamPool()
    for i in range(5):
        r = await pool.post(server, "/echo", f"body{i}".encode(),
                            {"Content-Type": "application/json", "X-Request-Id": f"r{i}"}, 5)
        assert r.status == 200 and r.headers["content-type"].startswith("application/json")
        assert await r.read() == f'{{"got": "body{i}", "rid": "r{i}"}}'.encode()
        r.release()
    peers = app[PEERS]
    assert len(set(peers)) == 1  # keep-alive: one TCP connection for all five
    await pool.close()


async def test_chunked_stream_arrives_piece_by_piece(served: tuple[str, web.Application]
                                                    ) -> None:
    server, _ = served
    pool = UpstreamPool()
    r = await pool.post(server, "/chunks", b"", {}, 5)
    got = b""
    pieces = 0
    while chunk := await r.next_chunk():
        got += chunk
        pieces += 1
    r.release()
    assert got == b"".join(f"data: {i}\n\n".encode() for i in range(5))
    assert pieces > 1
    await pool.close()


async def test_failures_say_what_the_caller_may_do(served: tuple[str, web.Application]
                                                  ) -> None:
    server, _ = served
    pool = UpstreamPool(connect_timeout=1)
    with pytest.raises(ConnectFailed):
        await pool.post(f"http://127.0.0.1:{free_port()}", "/echo", b"", {}, 5)
    with pytest.raises(ReadTimeout):
        await pool.post(server, "/silent", b"", {}, 0.2)
    r = await pool.post(server, "/drop", b"", {}, 5)
    with pytest.raises(Dropped):
        await r.read()
    r.release()
    await pool.close()
