"""The fleet loop, whole: real PostgreSQL, Redis and NATS; the outbox relay, the monitor, the
orchestrator (local launcher) and the gateway served over TCP; and the local cloud, whose
machines are real simulator and agent processes. Timings are shortened, nothing else."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from agent.local_cloud import CLOUD, CloudConfig, LocalCloud, create_cloud_app
from schemas.events import NodeLaunching, NodeStatus
from schemas.ids import uuid7
from services.domain.catalog import Catalog, NewApiKey
from services.domain.fleet import Fleet as FleetCommands
from services.domain.node_states import Signal
from services.gateway.app import create_gateway_app
from services.gateway.gateway import GATEWAY, Gateway
from services.gateway.settings import GatewaySettings
from services.infra.bus import Bus
from services.infra.eventlog import EventLog
from services.infra.log_waker import LogWaker
from services.infra.natsauth.identities import Role
from services.infra.relay import OutboxRelay
from services.infra.settings import Secret
from services.monitor.app import create_monitor_app
from services.monitor.settings import MonitorSettings
from services.orchestrator.app import ORCHESTRATOR, create_orchestrator_app
from services.orchestrator.launcher import ClusterState, LaunchError, LaunchSpec, cluster_name
from services.orchestrator.orchestrator import Orchestrator
from services.orchestrator.settings import OrchestratorSettings
from tests.conftest import Servers
from tests.helpers import eventually, node_registered
from tests.integration.test_monitor_basics import serve

MODEL = "meta-llama/Llama-3.1-8B-Instruct"

# Fast enough to watch a fleet live in seconds, slow enough for two cores.
ORCHESTRATOR_TIMING: dict[str, Any] = dict(
    reconcile_every_seconds=0.3, cloud_check_every_seconds=0.3, launch_deadline_seconds=30,
    node_heartbeat_interval=0.3, unhealthy_grace_seconds=3, drain_timeout_seconds=10,
    capacity_cooldown_seconds=60, no_active_alert_after_seconds=2, leader_retry_seconds=0.2,
    scale_up_delay_seconds=1, scale_down_delay_seconds=2)


@dataclass
class Fleet:
    servers: Servers
    pool: asyncpg.Pool
    bus: Bus
    catalog: Catalog
    key: NewApiKey
    tmp: Path
    cloud_url: str = ""
    cloud_app: web.Application | None = None
    gateway_url: str = ""
    gateway_app: web.Application | None = None
    orchestrator_app: web.Application | None = None
    runners: list[tuple[str, web.AppRunner]] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    node_key_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    """NODE_API_KEY_SECRET, the same for the orchestrator (it keys nodes) and the gateway."""

    @property
    def cloud(self) -> LocalCloud:
        assert self.cloud_app is not None
        return self.cloud_app[CLOUD]

    @property
    def gw(self) -> Gateway:
        assert self.gateway_app is not None
        return self.gateway_app[GATEWAY]

    @property
    def orchestrator(self) -> Orchestrator:
        assert self.orchestrator_app is not None
        return self.orchestrator_app[ORCHESTRATOR]

    def client(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.gateway_url}/v1", api_key=self.key.plaintext,
                           max_retries=0)

    def core(self, role: Role) -> dict[str, Any]:
        """The settings every service shares; NATS as `role`, as in production."""
        return dict(database_url=Secret(self.servers.database_url),
                    redis_url=Secret(self.servers.redis_url),
                    nats_url=Secret(self.servers.nats_url),
                    nats_creds=Secret(self.servers.creds(role)), log_json=False,
                    event_poll_interval=0.1)

    async def start_cloud(self, *simulator_args: str) -> None:
        config = CloudConfig(
            simulator_args=("--ttft", "0.02", "--itl", "0.005", *simulator_args),
            agent_env=(("SPOT_POLL_INTERVAL", "0.2"), ("DRAIN_GRACE", "0.5"),
                       ("DRAIN_POLL_INTERVAL", "0.1"), ("LOG_JSON", "false")),
            log_dir=self.tmp / "machines", stop_timeout=3)
        self.cloud_app = create_cloud_app(config)
        self.cloud_url, runner = await serve(self.cloud_app)
        self.runners.append(("local cloud", runner))

    def orchestrator_settings(self, **overrides: Any) -> OrchestratorSettings:
        return OrchestratorSettings(**{**self.core(Role.ORCHESTRATOR), **ORCHESTRATOR_TIMING,
                                       "nats_node_issuer": Secret(self.servers.node_issuer()),
                                       "node_api_key_secret": Secret(self.node_key_secret),
                                       "launcher": "local", "local_cloud_url": self.cloud_url,
                                       "default_provider": "aws", **overrides})

    async def start_control_plane(self, *, orchestrator: bool = True,
                                  **orchestrator_overrides: Any) -> None:
        monitor = create_monitor_app(MonitorSettings(
            **self.core(Role.MONITOR), stale_after_seconds=5, sweep_every_seconds=0.2,
            probe_every_seconds=0.5, probe_timeout_seconds=1, probe_failures=2,
            leader_retry_seconds=0.2))
        self.runners.append(("monitor", (await serve(monitor))[1]))
        gateway = create_gateway_app(GatewaySettings(
            **self.core(Role.GATEWAY), usage_spool_dir=str(self.tmp / "spool"),
            node_api_key_secret=Secret(self.node_key_secret)))
        self.gateway_url, runner = await serve(gateway)
        self.gateway_app = gateway
        self.runners.append(("gateway", runner))
        if orchestrator:
            app = create_orchestrator_app(self.orchestrator_settings(**orchestrator_overrides))
            self.runners.append(("orchestrator", (await serve(app))[1]))
            self.orchestrator_app = app

    async def deploy(self, *, regions: Sequence[str] = ("aws/us-east-1",), spot: bool = False,
                     min_nodes: int = 1, max_nodes: int = 2,
                     allow_on_demand_fallback: bool = True) -> uuid.UUID:
        return await self.catalog.create_deployment(
            MODEL, regions=list(regions), gpu_type="A10G", spot=spot, min_nodes=min_nodes,
            max_nodes=max_nodes, allow_on_demand_fallback=allow_on_demand_fallback)

    async def nodes(self, *statuses: str) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(
            "SELECT * FROM nodes WHERE cardinality($1::text[]) = 0 OR status = ANY($1) "
            "ORDER BY registered_at", list(statuses)))

    async def wait_nodes(self, status: str, count: int, timeout: float = 30) -> list[Any]:
        async def reached() -> list[Any]:
            rows = await self.nodes(status)
            return rows if len(rows) == count else []

        return await eventually(reached, timeout=timeout, interval=0.05,
                                what=f"{count} node(s) {status}")

    async def routable(self, count: int, timeout: float = 20) -> list[str]:
        async def enough() -> list[str]:
            ids = sorted(n.node_id for n in self.gw.table.candidates(
                MODEL, time.monotonic(), self.gw.proxy.rules))
            return ids if len(ids) == count else []

        return await eventually(enough, timeout=timeout, interval=0.02,
                                what=f"{count} routable node(s)")

    async def events(self, type_: str, node_id: Any = None) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT data FROM events WHERE type = $1 AND ($2::text IS NULL OR stream = $2) "
            "ORDER BY position", type_, f"node:{node_id}" if node_id else None)
        return [dict(r["data"]) for r in rows]

    async def complete(self, max_tokens: int = 4) -> str:
        async with self.client() as client:
            reply = await client.chat.completions.create(
                model=MODEL, max_tokens=max_tokens,
                messages=[{"role": "user", "content": "hello"}])
        return reply.id

    async def preempt(self, cluster: str, notice_seconds: float) -> None:
        async with aiohttp.ClientSession() as s, s.post(
                f"{self.cloud_url}/clusters/{cluster}/preempt",
                json={"notice_seconds": notice_seconds}) as r:
            assert r.status == 202, await r.text()


@pytest.fixture
async def fleet(servers: Servers, pool: asyncpg.Pool, redis_url: str, bus: Bus,
                tmp_path: Path) -> AsyncIterator[Fleet]:
    catalog = Catalog(EventLog(pool), actor="test")
    tenant = await catalog.create_tenant("Acme")
    env = await catalog.create_environment(tenant, "production", "us-east-1")
    key = await catalog.create_api_key(env, name="test")
    await catalog.create_model(MODEL, family="llama", vram_gb=16,
                               input_price_per_million=Decimal("0.10"),
                               output_price_per_million=Decimal("0.20"), context_length=8192)
    f = Fleet(servers, pool, bus, catalog, key, tmp_path)
    waker = LogWaker(servers.database_url, poll_interval=0.1)
    await waker.start()
    relay_bus = await Bus.connect(servers.nats_url, name="relay",
                                  creds=servers.creds(Role.RELAY))
    relay = OutboxRelay(servers.database_url, relay_bus, waker=waker, leader_retry=0.1)
    f.tasks.append(asyncio.create_task(relay.run()))
    yield f
    # The orchestrator first (it launches), the cloud last (its machines die with it). A
    # service that hangs in its cleanup fails the test, but the rest are still cleaned up:
    # machines left running would heartbeat into the tests that follow.
    hung: list[str] = []
    for name, runner in reversed(f.runners):
        try:
            await asyncio.wait_for(runner.cleanup(), 30)
        except TimeoutError:
            hung.append(name)
            for task in asyncio.all_tasks():  # say what hangs rather than hang
                task.print_stack()
    for t in f.tasks:
        t.cancel()
    await asyncio.gather(*f.tasks, return_exceptions=True)
    await relay_bus.close()
    await waker.close()
    assert not hung, f"cleanup took over 30 s: {hung}"


# --------------------------------------------------------------------------- the orchestrator
# alone, against a cloud in this process


class MemoryCloud:
    """A cloud in this process, for orchestrator tests that need it to misbehave in ways the
    local cloud cannot: launches succeed at once (no machine actually starts) or fail as told
    per region; `blind` makes its status answer empty, as SkyPilot's does when asked as the
    wrong user."""

    name = "memory"

    def __init__(self) -> None:
        self.machines: dict[str, LaunchSpec] = {}
        self.launches: list[LaunchSpec] = []
        self.downs: list[str] = []
        self.errors: dict[str, LaunchError] = {}
        """region → the error its launches fail with."""
        self.blind = False

    async def launch(self, spec: LaunchSpec) -> None:
        self.launches.append(spec)
        error = self.errors.get(spec.region)
        if error is not None:
            raise error
        self.machines[spec.cluster_name] = spec

    async def down(self, cluster_name: str) -> None:
        self.downs.append(cluster_name)
        self.machines.pop(cluster_name, None)

    async def clusters(self) -> dict[str, ClusterState]:
        return {} if self.blind else dict.fromkeys(self.machines, ClusterState.UP)

    async def close(self) -> None:
        pass


@dataclass
class Rig:
    """An Orchestrator on real PostgreSQL, Redis and NATS, with a MemoryCloud; nodes are made
    by recording what agents and the monitor would."""

    pool: asyncpg.Pool
    redis: Any
    bus: Bus
    catalog: Catalog
    cloud: MemoryCloud
    servers: Servers
    orchestrators: list[Orchestrator] = field(default_factory=list)

    def orchestrator(self, **overrides: Any) -> Orchestrator:
        settings = OrchestratorSettings(**{
            "database_url": Secret(self.servers.database_url),
            "redis_url": Secret(self.servers.redis_url),
            "nats_url": Secret(self.servers.nats_url),
            "nats_creds": Secret(self.servers.creds(Role.ORCHESTRATOR)), "log_json": False,
            "node_api_key_secret": Secret(secrets.token_urlsafe(32)),
            "cloud_check_every_seconds": 0, "launcher": "local", **overrides})
        o = Orchestrator(settings, eventlog=EventLog(self.pool), redis=self.redis,
                         nc=self.bus.nc, launcher=self.cloud)
        self.orchestrators.append(o)
        return o

    async def deploy(self, *, regions: Sequence[str] = ("aws/us-east-1",), spot: bool = False,
                     min_nodes: int = 1, max_nodes: int = 1) -> uuid.UUID:
        return await self.catalog.create_deployment(
            MODEL, regions=list(regions), gpu_type="A10G", spot=spot, min_nodes=min_nodes,
            max_nodes=max_nodes)

    async def active_node(self, deployment: uuid.UUID, region: str = "us-east-1", *,
                          serving: bool = True) -> uuid.UUID:
        """A node as if launched for `deployment`, registered and (unless not `serving`)
        active, with its machine up in the cloud."""
        node_id = uuid7()
        cluster = cluster_name("crosslogic", MODEL, region, node_id)
        fleet = FleetCommands(EventLog(self.pool), actor="test")
        await fleet.launching(NodeLaunching(
            node_id=node_id, deployment_id=deployment, cluster_name=cluster, model_name=MODEL,
            provider="aws", region=region, gpu_type="A10G", spot=False,
            deadline=datetime.now(UTC) + timedelta(minutes=15)))
        registered = msgspec.structs.replace(node_registered(node_id, model=MODEL,
                                                             region=region),
                                             cluster_name=cluster)
        await EventLog(self.pool).record([registered])
        if serving:
            assert await fleet.signal(node_id, Signal.HEALTHY) == NodeStatus.ACTIVE
        else:  # bring the row up to date with the registration (the monitor's projection)
            await fleet.signal(node_id, Signal.REGISTERED)
        self.cloud.machines[cluster] = LaunchSpec(
            node_id=node_id, cluster_name=cluster, model_name=MODEL, provider="aws",
            region=region, gpu_type="A10G", spot=False)
        return node_id

    async def status(self, node_id: uuid.UUID) -> str:
        return str(await self.pool.fetchval("SELECT status FROM nodes WHERE id = $1", node_id))

    async def settle(self) -> None:
        """Let the launches and terminations the last tick started finish."""
        for o in self.orchestrators:
            await asyncio.gather(*o.launches.values(), *o.terminations.values(),
                                 return_exceptions=True)


@pytest.fixture
async def rig(servers: Servers, pool: asyncpg.Pool, redis_url: str,
              bus: Bus) -> AsyncIterator[Rig]:
    import redis.asyncio as aioredis

    catalog = Catalog(EventLog(pool), actor="test")
    await catalog.create_model(MODEL, family="llama", vram_gb=16,
                               input_price_per_million=Decimal("0.10"),
                               output_price_per_million=Decimal("0.20"), context_length=8192)
    client = aioredis.from_url(redis_url)
    r = Rig(pool, client, bus, catalog, MemoryCloud(), servers)
    yield r
    for o in r.orchestrators:
        tasks = [*o.launches.values(), *o.terminations.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()
