"""A fleet of GPU nodes on NATS, each connected as itself, for the heartbeat benchmark.

One nats-server holds at most as many connections as it may open files (20,000 here), so the
fleet connects through *leaf nodes*, as a large production fleet would: leaf servers accept
the nodes' connections and authenticate each node's own credential (same operator and
accounts as the hub, so the same permissions hold at the leaf), and forward what the nodes
say to the hub over one link each.

Each worker process holds one leaf's share of the nodes: it mints their credentials as the
orchestrator would (the scoped node key), speaks NATS's client protocol directly (a nats-py
client per node would cost the CPU the servers need), answers the servers' PINGs, and
publishes each node's heartbeat on `node.heartbeat.<its id>` every interval, spread evenly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import resource
import socket
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import msgspec

from schemas.events import NodeHeartbeat
from services.infra.devstack import ManagedProcess, free_port, wait_until
from services.infra.natsauth.authority import Authority, NodeIssuer
from services.infra.natsauth.keys import sign

LEAF_CONNECTIONS = 17_000
"""Nodes per leaf server: under the 20,000 files a process may open here."""


@dataclass
class LeafServer:
    """A nats-server in operator mode whose only link is a leaf connection to the hub."""

    root: Path
    hub_leaf_url: str
    authority: Authority
    link_creds: str
    index: int
    port: int = 0
    monitor_port: int = 0
    proc: ManagedProcess | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.monitor_port = free_port()
        creds = self.root / f"leaf{self.index}.creds"
        creds.write_text(self.link_creds)
        creds.chmod(0o600)
        a = self.authority
        conf = self.root / f"leaf{self.index}.conf"
        conf.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'http: "127.0.0.1:{self.monitor_port}"\n'
            f"server_name: leaf{self.index}\n"
            # Tens of thousands of nodes sign in at once on two shared cores.
            "authorization: { timeout: 30 }\n"
            f"max_connections: {LEAF_CONNECTIONS + 500}\n"
            f"operator: {a.operator_jwt()}\n"
            f"system_account: {a.system_account}\n"
            "resolver: MEMORY\n"
            f"resolver_preload: {{ {a.system_account}: {a.system_account_jwt()}, "
            f"{a.account}: {a.account_jwt()} }}\n"
            f'leafnodes {{ remotes: [ {{ url: "{self.hub_leaf_url}", '
            f'credentials: {json.dumps(str(creds))}, account: "{a.account}" }} ] }}\n')
        from services.infra.devstack import _venv_binary

        # The fleet's side (its leaf servers, its nodes) stands in for machines elsewhere: it
        # runs at the lowest priority, so the platform's own processes get the CPU first.
        self.proc = ManagedProcess(f"leaf{self.index}",
                                   ["nice", "-n", "19", str(_venv_binary("nats-server")), "-c",
                                    str(conf)],
                                   self.root / f"leaf{self.index}.log")
        self.proc.start()
        wait_until(self._ready, timeout=30, what=f"leaf{self.index}", alive=self.proc.alive)

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(4096).startswith(b"INFO ")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def varz(self) -> dict[str, Any]:
        return server_varz(self.monitor_port)


def server_varz(monitor_port: int) -> dict[str, Any]:
    """A nats-server's own counters (messages in and out, slow consumers)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/varz", timeout=5) as resp:
        varz: dict[str, Any] = json.loads(resp.read())
        return varz


def heartbeat_message(node: str, sequence: int) -> bytes:
    """What an agent publishes, in NATS's wire form (HPUB, with the event id as
    Nats-Msg-Id so a stream deduplicates it)."""
    event = NodeHeartbeat(node_id=uuid.UUID(node), sequence=sequence, health_score=90,
                          vllm_healthy=True, model_name="m", num_requests_running=2,
                          num_requests_waiting=0, kv_cache_usage=0.3)
    payload = msgspec.json.encode(event)
    header = f"NATS/1.0\r\nNats-Msg-Id: {event.id}\r\n\r\n".encode()
    return (f"HPUB node.heartbeat.{node} {len(header)} {len(header) + len(payload)}\r\n"
            .encode() + header + payload + b"\r\n")


class NodeConnection(asyncio.Protocol):
    """One node's connection: authenticates with its JWT and the nonce signed by its seed,
    then answers PINGs; `send` writes a message."""

    def __init__(self, node: str, jwt: str, seed: str, ready: asyncio.Future[None]) -> None:
        self.node = node
        self.jwt = jwt
        self.seed = seed
        self.ready = ready
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.connected = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if line.startswith(b"INFO ") and not self.connected:
                info = json.loads(line[5:])
                if "nonce" not in info:
                    continue
                signature = sign(self.seed, info["nonce"].encode())
                connect = {"verbose": False, "pedantic": False, "jwt": self.jwt,
                           "sig": base64.urlsafe_b64encode(signature).rstrip(b"=").decode(),
                           "lang": "bench", "version": "1", "protocol": 1, "headers": True,
                           "no_responders": True}
                assert self.transport is not None
                self.transport.write(b"CONNECT " + json.dumps(connect).encode()
                                     + b"\r\nPING\r\n")
            elif line == b"PONG" and not self.connected:
                self.connected = True
                if not self.ready.done():
                    self.ready.set_result(None)
            elif line == b"PING":
                assert self.transport is not None
                self.transport.write(b"PONG\r\n")
            elif line.startswith(b"-ERR") and not self.ready.done():
                self.ready.set_exception(ConnectionError(line.decode()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.connected = False
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed: {exc}"))

    def send(self, data: bytes) -> bool:
        if not self.connected or self.transport is None:
            return False
        self.transport.write(data)
        return True


@dataclass(frozen=True)
class Share:
    """One worker's part of the fleet."""

    port: int
    issuer_json: str
    nodes: Sequence[str]
    interval: float
    duration: float
    offset: float
    """Where this share's beats start within the interval, so the shares interleave."""


async def _fleet(share: Share, ready: EventType, go: EventType) -> dict[str, Any]:
    issuer = NodeIssuer.from_json(share.issuer_json)
    loop = asyncio.get_running_loop()
    minted_at = time.monotonic()
    creds = [issuer.node_credentials(uuid.UUID(n), ttl_seconds=3600) for n in share.nodes]
    minted = time.monotonic() - minted_at
    conns: list[NodeConnection] = []
    connect_at = time.monotonic()
    gate = asyncio.Semaphore(64)  # a few at a time: the servers verify each one's signature

    async def connect(c: Any) -> None:
        async with gate:
            ready: asyncio.Future[None] = loop.create_future()
            conn = NodeConnection(c.name, c.jwt, c.seed, ready)
            await loop.create_connection(lambda: conn, "127.0.0.1", share.port)
            await asyncio.wait_for(ready, 60)
            conns.append(conn)

    results = await asyncio.gather(*(connect(c) for c in creds), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    connected = time.monotonic() - connect_at
    ready.set()
    await asyncio.to_thread(go.wait)

    published = 0
    n = len(conns)
    tick = 0.05
    per_tick = n * tick / share.interval
    owed, cursor, sequence = share.offset * per_tick, 0, 0
    started = time.monotonic()
    next_tick = started
    while time.monotonic() - started < share.duration:
        owed += per_tick
        count = int(owed)
        owed -= count
        sequence += 1
        for _ in range(count):
            conn = conns[cursor]
            cursor = (cursor + 1) % n
            if conn.send(heartbeat_message(conn.node, sequence)):
                published += 1
        next_tick += tick
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
    alive = sum(1 for c in conns if c.connected)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return {"published": published, "connected": len(conns), "failed": len(failed),
            "first_failure": str(failed[0]) if failed else "", "still_connected": alive,
            "mint_seconds": minted, "connect_seconds": connected}


def run_share(share: Share, ready: EventType, go: EventType, out: Any) -> None:
    """A worker process's body (multiprocessing target)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.nice(19)  # a stand-in for machines elsewhere: the platform's processes go first
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out.put(asyncio.run(_fleet(share, ready, go)))
