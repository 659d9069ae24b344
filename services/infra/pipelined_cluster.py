"""PipelinedRedis for a Redis Cluster: one pipelined connection per primary, each command sent
to the primary holding its first key's slot.

The slot map comes from `CLUSTER SLOTS` (asked of the seeds, then of any node known), and is
asked again after a `MOVED` reply (which is also followed at once: a command refused with
`MOVED` never ran, so sending it on is safe), after a connection to a node failed (its
replica may be taking over), and after `CLUSTERDOWN`/`TRYAGAIN`; at most once per `timeout`
while answers keep failing, so a dead primary does not turn every call into a refresh.
Failures look like PipelinedRedis's (redis-py's exceptions), so the limiter's outage handling
applies unchanged: a command whose primary is down fails fast until its replica is promoted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from services.infra.cluster_slots import Address, SlotMap, key_slot, redirect
from services.infra.pipelined_redis import Arg, PipelinedRedis

_REDIRECTS = 3


def parse_seeds(url: str) -> tuple[str, list[Address]]:
    """`redis://[user:password@]host:port[,host:port...][/0]` → (credentials, seeds)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "redis+cluster"):
        raise ValueError("a redis cluster URL starts redis:// or redis+cluster://")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a redis cluster has database 0 only")
    credentials, _, hosts = parts.netloc.rpartition("@")
    seeds = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        seeds.append(Address(name or "127.0.0.1", int(port or 6379)))
    return credentials, seeds


class PipelinedCluster:
    def __init__(self, url: str, *, timeout: float = 0.25) -> None:
        self._credentials, self._seeds = parse_seeds(url)
        self.timeout = timeout
        self._nodes: dict[Address, PipelinedRedis] = {}
        self._map: SlotMap | None = None
        self._stale = True
        self._refreshed_at = -1e9
        self._refreshing: asyncio.Task[SlotMap] | None = None
        self.refreshes = 0
        """Slot maps fetched (for tests and metrics)."""

    # ------------------------------------------------------------------ commands

    @staticmethod
    def key_slot(key: str) -> int:
        return key_slot(key)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Any:
        if not numkeys:
            raise ValueError("a script on a redis cluster names its keys")
        return await self._call(key_slot(str(keys_and_args[0])),
                                ("EVALSHA", sha, numkeys, *keys_and_args))

    def execute_nowait(self, *args: Arg) -> asyncio.Future[Any] | None:
        """Fire and forget an EVALSHA (a settle); None when no slot map is known yet."""
        if args[0] != "EVALSHA" or not int(args[2]):
            raise ValueError("execute_nowait sends scripts with keys only")
        if self._map is None:
            return None
        task = asyncio.ensure_future(self._call(key_slot(str(args[3])), args))
        task.add_done_callback(_consume)
        return task

    async def script_load(self, script: str) -> str:
        """Loaded on every primary: a script may run on any of them."""
        slots = await self._slots()
        shas = await asyncio.gather(*(self._client(a).script_load(script)
                                      for a in slots.primaries))
        return shas[0]

    async def ping(self) -> bool:
        slots = await self._slots()
        return all(await asyncio.gather(*(self._client(a).ping() for a in slots.primaries)))

    def get_retry(self) -> None:
        """redis-py compatibility: this client never retries a command by itself."""
        return None

    async def aclose(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for client in self._nodes.values():
            await client.aclose()

    # ------------------------------------------------------------------ routing

    async def _call(self, slot: int, args: tuple[Arg, ...]) -> Any:
        asking: Address | None = None
        for _ in range(_REDIRECTS):
            if asking is not None:
                address = asking
            else:
                slots = await self._slots()
                found = slots.node_for(slot)
                if found is None:
                    self._stale = True
                    raise RedisConnectionError(f"no redis cluster node serves slot {slot}")
                address = found
            client = self._client(address)
            try:
                if asking is not None:
                    return await client.execute_asking(*args)
                return await client.execute(*args)
            except NoScriptError:
                raise
            except ResponseError as exc:
                message = str(exc)
                moved = redirect(message, default_host=address.host)
                if moved is None:
                    if message.startswith(("CLUSTERDOWN", "TRYAGAIN")):
                        self._stale = True
                    raise
                self._stale = True
                if moved.moved:
                    assert self._map is not None
                    self._map = self._map.moved(moved.slot, moved.to)
                    asking = None
                else:
                    asking = moved.to
            except (RedisError, OSError):
                # The node is gone or slow: its replica may be taking over.
                self._stale = True
                raise
        raise RedisConnectionError(f"redis cluster: slot {slot} redirected {_REDIRECTS} times")

    async def _slots(self) -> SlotMap:
        """The slot map. Only the first is waited for: later ones are fetched in the
        background while calls keep the map they have (a primary that hangs must not slow
        the calls to the others)."""
        current = self._map
        if current is None:
            if self._refreshing is None:
                self._refreshing = asyncio.ensure_future(self._refresh())
            refreshing = self._refreshing
            try:
                return await asyncio.shield(refreshing)
            finally:
                if refreshing.done() and self._refreshing is refreshing:
                    self._refreshing = None
        if (self._stale and self._refreshing is None
                and time.monotonic() - self._refreshed_at >= self.timeout):
            self._refreshing = task = asyncio.ensure_future(self._refresh())
            task.add_done_callback(self._refreshed)
        return current

    def _refreshed(self, task: asyncio.Task[SlotMap]) -> None:
        if self._refreshing is task:
            self._refreshing = None
        _consume(task)  # nobody answered: keep routing as before, and try again later

    async def _refresh(self) -> SlotMap:
        self._refreshed_at = time.monotonic()
        candidates = list(dict.fromkeys([
            *(self._map.primaries if self._map is not None else ()), *self._seeds,
            *self._nodes]))
        errors: list[str] = []
        for address in candidates:
            try:
                reply = await self._client(address).execute("CLUSTER", "SLOTS")
                found = SlotMap.from_cluster_slots(reply, asked=address)
            except (RedisError, OSError, ValueError, TypeError, IndexError) as exc:
                errors.append(f"{address}: {type(exc).__name__}")
                continue
            if not found.covers_all():
                errors.append(f"{address}: slots not all served")
                continue
            self._map = found
            self._stale = False
            self.refreshes += 1
            return found
        raise RedisConnectionError("no redis cluster node gave a slot map: "
                                   + ", ".join(errors[:6]))

    def _client(self, address: Address) -> PipelinedRedis:
        client = self._nodes.get(address)
        if client is None:
            auth = f"{self._credentials}@" if self._credentials else ""
            client = self._nodes[address] = PipelinedRedis(
                f"redis://{auth}{address.host}:{address.port}/0", timeout=self.timeout)
        return client

    def node_of(self, key: str) -> str:
        """The primary serving `key` as last known ("" before any slot map)."""
        if self._map is None:
            return ""
        found = self._map.node_for(key_slot(key))
        return "" if found is None else str(found)

    def primaries(self) -> frozenset[str]:
        """The primaries as last known ("" before any slot map)."""
        if self._map is None:
            return frozenset({""})
        return frozenset(str(a) for a in self._map.primaries)

    @property
    def nodes(self) -> Sequence[Address]:
        return tuple(self._nodes)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        with contextlib.suppress(Exception):
            future.exception()
