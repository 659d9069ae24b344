"""A whole inference path for gateway tests: real PostgreSQL, Redis and NATS, the catalog with
a tenant, environment, key and model, simulated GPU nodes (simulator + real node agent) and the
gateway app served over real TCP. The test plays the monitor only in acknowledging agents and
announcing their acceptance (`node.accepted`, what gateways route by); nodes are launched (a
`node.launching` in the log) before their agent starts, as the orchestrator does, so a real
monitor running beside it accepts them too."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from openai import AsyncOpenAI

from agent.node_agent import NodeAgent
from agent.settings import AgentSettings
from agent.simulator import SimulatorConfig, create_app
from schemas.commands import RegistrationAck
from schemas.events import NodeRegistered, UsageRecorded, decode_event, encode_event
from schemas.ids import uuid7
from schemas.subjects import node_ack_subject
from services.domain.catalog import Catalog, NewApiKey
from services.gateway.app import create_gateway_app
from services.gateway.gateway import GATEWAY, Gateway
from services.gateway.settings import GatewaySettings
from services.infra.bus import Bus
from services.infra.devstack import free_port
from services.infra.eventlog import EventLog
from services.infra.log_waker import LogWaker
from services.infra.natsauth.identities import Role
from services.infra.node_keys import node_api_key
from services.infra.relay import OutboxRelay
from services.infra.settings import Secret
from tests.conftest import Servers
from tests.helpers import eventually, launched, node_accepted

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@dataclass
class Node:
    node_id: str
    url: str
    sim_app: web.Application
    sim_runner: web.AppRunner
    agent: NodeAgent
    agent_task: asyncio.Task[int]
    api_key: str = field(default="", repr=False)
    """The node's vLLM API key (its simulator refuses /v1 requests without it)."""

    async def faults(self, **faults: Any) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as s, \
                s.post(f"{self.url}/admin/faults", json=faults) as r:
            assert r.status == 200, await r.text()

    async def stop(self) -> None:
        if not self.agent_task.done():
            self.agent_task.cancel()
            await asyncio.gather(self.agent_task, return_exceptions=True)
        await self.sim_runner.cleanup()


@dataclass
class Platform:
    servers: Servers
    pool: asyncpg.Pool
    bus: Bus
    catalog: Catalog
    tenant_id: Any
    environment_id: Any
    key: NewApiKey
    tmp: Path
    nc: NATS
    gateway_url: str = ""
    gateway_app: web.Application | None = None
    gateway_runner: web.AppRunner | None = None
    nodes: list[Node] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    node_key_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    """NODE_API_KEY_SECRET: each node's simulator takes the key derived from it."""
    acker: Subscription | None = None
    """The test playing the monitor (None once a test runs the real one instead)."""

    async def stop_playing_the_monitor(self) -> None:
        """For a test that runs the real monitor: registrations are no longer accepted here."""
        if self.acker is not None:
            await self.acker.unsubscribe()
            self.acker = None

    @property
    def gw(self) -> Gateway:
        assert self.gateway_app is not None
        return self.gateway_app[GATEWAY]

    def client(self, key: str | None = None, **kwargs: Any) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.gateway_url}/v1",
                           api_key=key or self.key.plaintext, max_retries=0, **kwargs)

    def settings(self, **overrides: Any) -> GatewaySettings:
        base: dict[str, Any] = dict(
            database_url=Secret(self.servers.database_url),
            redis_url=Secret(self.servers.redis_url), nats_url=Secret(self.servers.nats_url),
            nats_creds=Secret(self.servers.creds(Role.GATEWAY)), http_host="127.0.0.1",
            node_api_key_secret=Secret(self.node_key_secret),
            usage_spool_dir=str(self.tmp / "spool"),
            circuit_min_requests=4, circuit_cooldown_seconds=30, log_json=False,
            event_poll_interval=0.2)
        base.update(overrides)
        return GatewaySettings(**base)

    async def start_gateway(self, **overrides: Any) -> None:
        app = create_gateway_app(self.settings(**overrides))
        # A short shutdown: a refused oversized upload keeps its connection until then.
        runner = web.AppRunner(app, handler_cancellation=False, shutdown_timeout=1.0)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self.gateway_app, self.gateway_runner = app, runner
        self.gateway_url = f"http://127.0.0.1:{port}"

    async def add_node(self, *, model: str = MODEL, advertise: str = "", launch: bool = True,
                       api_key: str | None = None, region: str = "us-east-1",
                       kv_events: bool = False, **sim: Any) -> Node:
        """A simulator and a real agent for it; `advertise` makes the agent announce another
        address than the one it watches (a node unreachable from the gateway); `launch`: record
        its launch first, as the orchestrator does (False: a node nobody launched); `api_key`
        replaces the vLLM key derived for the node (one the gateway does not know); `region`:
        where the node says it is (the gateway records the usage it serves there); `kv_events`:
        its vLLM publishes KV cache events (on a local socket) and its agent relays them."""
        node_id = uuid7()
        kv_endpoint = f"ipc://{self.tmp}/kv-{node_id}.sock" if kv_events else ""
        if kv_events:
            sim["kv_events_endpoint"] = kv_endpoint
        if launch:
            await launched(self.pool, node_id, model=model, region=region)
        if api_key is None:
            api_key = node_api_key(self.node_key_secret, node_id)
        sim_app = create_app(SimulatorConfig(model=model, **sim), api_keys=[api_key])
        runner = web.AppRunner(sim_app, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}"
        settings = AgentSettings(nats_url=Secret(self.servers.nats_url), node_id=node_id,
                                 nats_creds=Secret(self.servers.node_creds(node_id)),
                                 model_name=model, vllm_url=url, endpoint_url=advertise,
                                 heartbeat_interval=0.2, vllm_kv_events_endpoint=kv_endpoint,
                                 region=region, log_json=False)
        agent = NodeAgent(settings)
        node = Node(str(settings.node_id), url, sim_app, runner, agent,
                    asyncio.create_task(agent.run()), api_key)
        self.nodes.append(node)
        return node

    async def routable(self, count: int, model: str = MODEL) -> None:
        async def enough() -> bool:
            return len(self.gw.table.candidates(model, time.monotonic(), self.gw.proxy.rules)
                       ) >= count

        await eventually(enough, timeout=15, what=f"{count} routable node(s)")

    async def usage_in_stream(self) -> int:
        return int((await self.bus.js.stream_info("USAGE")).state.messages)


async def _ack_registrations(nc: NATS) -> Subscription:
    js = nc.jetstream()

    async def on_registration(msg: Msg) -> None:
        event = decode_event(msg.data)
        if isinstance(event, NodeRegistered):
            # What the monitor's acceptance would reach the gateways as (the relay publishes
            # it; here the test's admin identity does), under the id the monitor would give it.
            accepted = node_accepted(event)
            await js.publish(accepted.subject, encode_event(accepted),
                             headers={"Nats-Msg-Id": str(accepted.id)})
            ack = RegistrationAck(node_id=event.node_id, event_id=event.id)
            await nc.publish(node_ack_subject(event.node_id), msgspec.json.encode(ack))

    return await nc.subscribe("node.registered.*", cb=on_registration)


@pytest.fixture
async def platform(servers: Servers, pool: asyncpg.Pool, redis_url: str, bus: Bus,
                   tmp_path: Path) -> AsyncIterator[Platform]:
    catalog = Catalog(EventLog(pool), actor="test")
    tenant = await catalog.create_tenant("Acme")
    env = await catalog.create_environment(tenant, "production", "us-east-1")
    key = await catalog.create_api_key(env, name="test")
    await catalog.create_model(MODEL, family="llama", vram_gb=16,
                               input_price_per_million=Decimal("0.10"),
                               output_price_per_million=Decimal("0.20"), context_length=8192)
    nc = await servers.nats_client(max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    acker = await _ack_registrations(nc)
    p = Platform(servers, pool, bus, catalog, tenant, env, key, tmp_path, nc, acker=acker)
    waker = LogWaker(servers.database_url, poll_interval=0.2)
    await waker.start()
    relay_bus = await Bus.connect(servers.nats_url, name="relay",
                                  creds=servers.creds(Role.RELAY))
    relay = OutboxRelay(servers.database_url, relay_bus, waker=waker, leader_retry=0.1)
    p.tasks.append(asyncio.create_task(relay.run()))
    yield p
    for t in p.tasks:
        t.cancel()
    await asyncio.gather(*p.tasks, return_exceptions=True)
    await waker.close()
    if p.gateway_runner is not None:
        await p.gateway_runner.cleanup()
    for node in p.nodes:
        await node.stop()
    await nc.close()
    await relay_bus.close()


@pytest.fixture
async def ready(platform: Platform) -> Platform:
    """The platform with its gateway and one routable node."""
    await platform.start_gateway()
    await platform.add_node()
    await platform.routable(1)
    return platform


async def usage_events(p: Platform, count: int, *, timeout: float = 30.0
                       ) -> list[UsageRecorded]:
    """The USAGE stream's events, once it holds at least `count`."""
    async def enough() -> list[UsageRecorded] | None:
        info = await p.bus.js.stream_info("USAGE")
        if info.state.messages < count:
            return None
        return [decode_event((await p.bus.js.get_msg("USAGE", seq)).data or b"")  # type: ignore[misc]
                for seq in range(info.state.first_seq, info.state.last_seq + 1)]

    return await eventually(enough, timeout=timeout, what=f"{count} usage events")


async def chat_scope(p: Platform, session: aiohttp.ClientSession,
                     key: str | None = None) -> tuple[int, str | None]:
    """A one-token chat completion through the gateway with `key` (the platform's own by
    default): its status and `x-ratelimit-scope`."""
    async with session.post(f"{p.gateway_url}/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key or p.key.plaintext}"}) as resp:
        return resp.status, resp.headers.get("x-ratelimit-scope")
