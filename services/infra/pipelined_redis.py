"""A small Redis client for hot paths: one connection, every command pipelined.

Commands issued by concurrent callers during one turn of the event loop leave in a single
write (a command with nothing else in flight leaves at once: at low load there is nobody to
wait for); replies are matched to callers in order by one protocol object, with no task, no
connection pool and no lock per command. On this job (an EVALSHA per request, and a second one
to settle it) it costs a fraction of redis-py's per-command overhead, which profiling showed to
be the largest single cost of the gateway.

Failures look like redis-py's, so callers written for redis-py keep working:
`redis.exceptions.ConnectionError` / `TimeoutError` when Redis is unreachable or too slow (the
connection is then dropped: replies still in flight could no longer be matched), `ResponseError`
(and `NoScriptError`) for error replies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import urllib.parse
from typing import Any, cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | bytes | int | float


class _Incomplete(Exception):
    pass


def encode_command(args: tuple[Arg, ...]) -> bytes:
    """RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, bytes):
            data = a
        elif isinstance(a, str):
            data = a.encode()
        else:
            data = str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def parse_reply(buf: bytes | bytearray, pos: int) -> tuple[Any, int]:
    """One RESP2 reply from `buf` at `pos`: (value, next position); _Incomplete if it is not
    all there yet. Error replies come back as ResponseError instances, not raised."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos:pos + 1]
    line = bytes(buf[pos + 1:end])
    nxt = end + 2
    if kind == b":":
        return int(line), nxt
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, nxt
        if len(buf) < nxt + size + 2:
            raise _Incomplete
        return bytes(buf[nxt:nxt + size]), nxt + size + 2
    if kind == b"+":
        return line.decode(), nxt
    if kind == b"-":
        message = line.decode(errors="replace")
        if message.startswith("NOSCRIPT"):
            return NoScriptError(message), nxt
        return ResponseError(message), nxt
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, nxt
        items = []
        for _ in range(count):
            item, nxt = parse_reply(buf, nxt)
            items.append(item)
        return items, nxt
    raise RedisConnectionError(f"unexpected reply type {kind!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: PipelinedRedis) -> None:
        self.owner = owner
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as ones.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        waiting = self.owner._waiting
        try:
            while pos < len(buf):
                value, pos = parse_reply(buf, pos)
                if not waiting:
                    raise RedisConnectionError("a reply nobody asked for")
                future, _ = waiting.popleft()
                if future.done():
                    continue
                if isinstance(value, ResponseError):
                    future.set_exception(value)
                else:
                    future.set_result(value)
        except _Incomplete:
            pass
        except (RedisConnectionError, ValueError) as exc:
            self.owner._drop(RedisConnectionError(f"bad reply from redis: {exc}"))
            return
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self, exc)


class PipelinedRedis:
    def __init__(self, url: str, *, timeout: float = 0.25) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.password = urllib.parse.unquote(parts.password) if parts.password else None
        self.username = urllib.parse.unquote(parts.username) if parts.username else None
        self.db = int(parts.path.lstrip("/") or 0)
        self.timeout = timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = \
            collections.deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        # Kept, not looked up per command: get_running_loop costs a getpid() on 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ commands

    async def execute(self, *args: Arg) -> Any:
        proto = self._proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            proto = await self._connect()
        return await self._send(args)

    async def execute_asking(self, *args: Arg) -> Any:
        """`ASKING` then the command, in one write so no other caller's command comes
        between them (Redis Cluster, a slot being migrated: `cluster_slots.Redirect`)."""
        proto = self._proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            await self._connect()
        self._send(("ASKING",)).add_done_callback(_consume)
        return await self._send(args)

    def execute_nowait(self, *args: Arg) -> asyncio.Future[Any] | None:
        """Send without waiting (fire and forget, e.g. a settle); None when not connected."""
        if self._proto is None:
            return None
        future = self._send(args)
        future.add_done_callback(_consume)
        return future

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Any:
        return await self.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def script_load(self, script: str) -> str:
        reply = await self.execute("SCRIPT", "LOAD", script)
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    async def ping(self) -> bool:
        return bool(await self.execute("PING") == "PONG")

    def get_retry(self) -> None:
        """redis-py compatibility: this client never retries a command by itself."""
        return None

    async def aclose(self) -> None:
        self._drop(RedisConnectionError("client closed"))

    # ------------------------------------------------------------------ plumbing

    def _send(self, args: tuple[Arg, ...]) -> asyncio.Future[Any]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        idle = not self._waiting
        self._waiting.append((future, time.monotonic()))
        self._out.append(encode_command(args))
        if idle and not self._flush_scheduled:
            # Nothing in flight: nobody to share a write with, so do not wait a turn of the
            # loop for company (a request's whole latency, at low load).
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout, self._check_deadline)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        proto = self._proto
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        if proto is None or proto.transport is None or proto.transport.is_closing():
            self._drop(RedisConnectionError("not connected to redis"))
            return
        proto.transport.write(data)

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        oldest = self._waiting[0][1]
        late = time.monotonic() - oldest
        if late >= self.timeout:
            self._drop(RedisTimeoutError(f"redis did not answer within {self.timeout}s"))
            return
        assert self._loop is not None
        self._watchdog = self._loop.call_later(self.timeout - late, self._check_deadline)

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                _, proto = await loop.create_connection(lambda: _Protocol(self), self.host,
                                                        self.port)
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot reach redis at {self.host}:{self.port}: "
                                       f"{exc or type(exc).__name__}") from exc
        self._proto = proto
        try:
            if self.password:
                auth = (self.username, self.password) if self.username else (self.password,)
                await self._send(("AUTH", *auth))
            if self.db:
                await self._send(("SELECT", self.db))
        except Exception:
            self._drop(RedisConnectionError("redis refused the connection set-up"))
            raise
        return proto

    def _lost(self, proto: _Protocol, exc: Exception | None) -> None:
        if proto is self._proto:
            self._drop(RedisConnectionError(f"redis connection lost: {exc or 'closed'}"))

    def _drop(self, error: Exception) -> None:
        """Fail everything in flight and forget the connection: the next call reconnects."""
        proto, self._proto = self._proto, None
        waiting = list(self._waiting)
        self._waiting.clear()
        self._out.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error)


def _consume(future: asyncio.Future[Any]) -> None:
    # Fire-and-forget commands: read the exception so asyncio does not log it as unretrieved.
    if not future.cancelled():
        with contextlib.suppress(Exception):
            future.exception()
