"""A lean HTTP/1.1 client for the gateway's one upstream job: POST a JSON body to a vLLM node
and relay the answer, whole or as it streams.

aiohttp's client was the largest cost left on the gateway's hot path (a task per request, a
timer per read, generic machinery). This one keeps idle keep-alive connections per node, writes
each request in one call, parses with httptools (C) and hands body pieces over as they arrive.
Deadlines cost one timer per request, moved lazily rather than rescheduled per chunk.

Errors say what a caller may do:
- ConnectFailed: no byte of an answer came back (refused, reset, a pooled connection the node
  had closed): the request can go to another node.
- ReadTimeout: the node went silent for longer than the read budget.
- Dropped: the node hung up in the middle of its answer.
"""

from __future__ import annotations

import asyncio
import collections
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import cast

import httptools


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    pass


class ReadTimeout(UpstreamError):
    pass


class Dropped(UpstreamError):
    pass


NEVER_TOOK = 1.0
"""A node that closes the connection this soon after the request, without a byte of answer,
never took it (an idle keep-alive closing as it was picked, a process going down): sending
it again is safe. Later, it was working on the request when it went: that is a failure
mid-request (Dropped), which the proxy resumes elsewhere as such."""


HIGH_WATER = 1 << 20
"""Bytes of body buffered before reading from the node pauses (a slow client)."""


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.got_bytes = False
        self.complete = False
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.headers_ready: asyncio.Future[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.read_timeout = 0.0
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.sent_at = 0.0

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but behave as ones.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.deadline = self.pool.loop.time() + self.read_timeout
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Dropped(f"unreadable answer from the node: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete:
            return
        if not self.got_bytes and self.pool.loop.time() - self.sent_at < NEVER_TOOK:
            self._fail(ConnectFailed(f"the node closed the connection: {exc or 'EOF'}"))
        elif not self.got_bytes:
            self._fail(Dropped(f"the node closed the connection before answering: "
                               f"{exc or 'EOF'}"))
        else:
            self._fail(Dropped(f"the node hung up mid-answer: {exc or 'EOF'}"))

    # ---------------------------------------------------------------- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.headers_ready is not None and not self.headers_ready.done():
            self.headers_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        # Asked now: once the parser moves past the message it no longer knows.
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True
        self._cancel_timer()
        self._wake()

    # ---------------------------------------------------------------- the request

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._cancel_timer()
        for future in (self.headers_ready, self.waiter):
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # retrieved here: the caller may already have gone
        self.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        now = self.pool.loop.time()
        if now < self.deadline:  # data came meanwhile: look again at the new deadline
            self.timer = self.pool.loop.call_at(self.deadline, self._on_timer)
            return
        self.timer = None
        self._fail(ReadTimeout(f"the node sent nothing for {self.read_timeout:.0f}s"))

    def send(self, request: bytes, read_timeout: float) -> asyncio.Future[None]:
        assert self.transport is not None
        self._reset()
        loop = self.pool.loop
        self.read_timeout = read_timeout
        self.deadline = loop.time() + read_timeout
        self.timer = loop.call_at(self.deadline, self._on_timer)
        self.headers_ready = loop.create_future()
        self.sent_at = loop.time()
        self.transport.write(request)
        return self.headers_ready

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


@dataclass
class UpstreamResponse:
    status: int
    headers: dict[str, str]
    _conn: _Connection = field(repr=False)
    _done: bool = False

    async def next_chunk(self) -> bytes:
        """Whatever body has arrived since the last call (b"" at the end); waits if none."""
        c = self._conn
        while True:
            if c.chunks:
                data = b"".join(c.chunks)
                c.chunks.clear()
                c.buffered = 0
                if c.paused and c.transport is not None:
                    c.paused = False
                    c.transport.resume_reading()
                return data
            if c.complete:
                self._done = True
                return b""
            if c.error is not None:
                raise c.error
            c.waiter = c.pool.loop.create_future()
            await c.waiter

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.next_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with it: a fully read answer returns its connection to the pool."""
        c = self._conn
        if self._done and c.complete and c.keep_alive and not c.closed:
            c.pool._idle_return(c)
        else:
            c._cancel_timer()
            c.abort()

    def close(self) -> None:
        """Abandon the answer (the client went away): the node sees the connection close."""
        self._conn._cancel_timer()
        self._conn.abort()


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    host_header: bytes


class UpstreamPool:
    def __init__(self, *, connect_timeout: float = 5.0, idle_timeout: float = 4.0,
                 max_idle_per_node: int = 256) -> None:
        self.connect_timeout = connect_timeout
        # Below uvicorn's 5 s keep-alive (vLLM's server), so we rarely pick a connection the
        # node is about to close.
        self.idle_timeout = idle_timeout
        self.max_idle_per_node = max_idle_per_node
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _target(self, base_url: str) -> _Target:
        target = self._targets.get(base_url)
        if target is None:
            parts = urllib.parse.urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise ConnectFailed(f"unsupported node address {base_url!r}")
            port = parts.port or 80
            target = _Target(parts.hostname, port, f"{parts.hostname}:{port}".encode())
            self._targets[base_url] = target
        return target

    async def post(self, base_url: str, path: str, body: bytes,
                   headers: dict[str, str], read_timeout: float) -> UpstreamResponse:
        return await self.request("POST", base_url, path, body, headers, read_timeout)

    async def request(self, method: str, base_url: str, path: str, body: bytes,
                      headers: dict[str, str], read_timeout: float) -> UpstreamResponse:
        target = self._target(base_url)
        key = (target.host, target.port)
        head = [method.encode(), b" ", path.encode(), b" HTTP/1.1\r\nHost: ", target.host_header,
                b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        for name, value in headers.items():
            head += [name.encode(), b": ", value.encode(), b"\r\n"]
        head.append(b"\r\n")
        request = b"".join(head) + body
        conn = self._idle_take(key)
        if conn is not None:
            try:
                return await self._exchange(conn, request, read_timeout)
            except ConnectFailed:
                # The node closed this idle connection as we picked it (its keep-alive ran
                # out): nothing was answered, so a fresh connection to the same node is safe,
                # and the only way when the model has no other node.
                pass
        return await self._exchange(await self._connect(key), request, read_timeout)

    @staticmethod
    async def _exchange(conn: _Connection, request: bytes,
                        read_timeout: float) -> UpstreamResponse:
        try:
            await conn.send(request, read_timeout)
        except BaseException:
            # Cut off while waiting for the head (a deadline, a client gone) or failed: close
            # it, so the node stops generating an answer nobody will read.
            conn._cancel_timer()
            conn.abort()
            raise
        return UpstreamResponse(conn.status, {k.decode(): v.decode(errors="replace")
                                              for k, v in conn.headers}, conn)

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(lambda: _Connection(self, key),
                                                            key[0], key[1])
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect to {key[0]}:{key[1]}: "
                                f"{exc or type(exc).__name__}") from exc
        return conn

    def _idle_take(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        horizon = time.monotonic() - self.idle_timeout
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > horizon and conn.transport is not None \
                    and not conn.transport.is_closing():
                return conn
            conn.abort()
        return None

    def _idle_return(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle_per_node:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()

