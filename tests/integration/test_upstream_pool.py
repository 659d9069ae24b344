"""The gateway's upstream HTTP client against a real HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from services.gateway.upstream import ConnectFailed, Dropped, ReadTimeout, UpstreamPool
from services.infra.devstack import free_port

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


async def test_cancelled_before_the_head_closes_the_connection() -> None:
    """A request cut off (deadline, client gone) while the node is still thinking: the node
    sees the connection close, so it stops generating an answer nobody will read."""
    arrived, gone = asyncio.Event(), asyncio.Event()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        if await reader.read(1) == b"":  # EOF: the gateway hung up
            gone.set()
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool()
    task = asyncio.create_task(pool.post(f"http://127.0.0.1:{port}", "/v1/x", b"", {}, 30))
    await asyncio.wait_for(arrived.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(gone.wait(), 5)
    await pool.close()
    server.close()


async def test_an_idle_connection_the_node_closed_is_retried_on_a_fresh_one() -> None:
    """The node's keep-alive ran out as we reused its connection: nothing was answered, so the
    same node gets the request again on a new connection (a model with one node still works)."""
    connections = 0
    ok = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n"
          b"{}")

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ok)
        await writer.drain()
        if first:
            # Keep-alive in name only: the next request on this connection finds it closing.
            await reader.readuntil(b"\r\n\r\n")
        else:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = UpstreamPool()
    for _ in range(2):
        r = await pool.post(url, "/v1/x", b"", {}, 5)
        assert r.status == 200 and await r.read() == b"{}"
        r.release()
    assert connections == 2
    await pool.close()
    server.close()
