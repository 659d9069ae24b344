"""The monitor's three signals turned into status changes, with real agents and servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from agent.node_agent import NodeAgent
from agent.settings import AgentSettings
from agent.simulator import SimulatorConfig, create_app
from schemas.ids import uuid7
from services.infra.bus import Bus
from services.infra.devstack import free_port
from services.infra.natsauth.identities import Role
from services.infra.settings import Secret
from services.monitor.app import LEADERSHIP, WATCHER, create_monitor_app
from services.monitor.settings import MonitorSettings
from tests.conftest import Servers
from tests.helpers import eventually, launched
from tests.integration.test_monitor_basics import serve


@dataclass
class Node:
    agent: NodeAgent
    task: asyncio.Task[int]
    sim_url: str
    runner: web.AppRunner


def monitor_settings(servers: Servers, database_url: str, redis_url: str,
                     **overrides: Any) -> MonitorSettings:
    base: dict[str, Any] = dict(
        database_url=Secret(database_url), redis_url=Secret(redis_url),
        nats_url=Secret(servers.nats_url), nats_creds=Secret(servers.creds(Role.MONITOR)),
        event_poll_interval=0.1, log_json=False, stale_after_seconds=0.8,
        sweep_every_seconds=0.1, probe_every_seconds=0.2,
        probe_timeout_seconds=0.5, probe_failures=2, leader_retry_seconds=0.1,
        gauges_every_seconds=0.1)
    base.update(overrides)
    return MonitorSettings(**base)


@pytest.fixture
async def start_monitor(servers: Servers, database_url: str, redis_url: str,
                        bus: Bus) -> AsyncIterator[Callable[..., Awaitable[web.AppRunner]]]:
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> web.AppRunner:
        app = create_monitor_app(monitor_settings(servers, database_url, redis_url,
                                                  **overrides))
        _, runner = await serve(app)
        runners.append(runner)
        return runner

    yield start
    for r in runners:
        await r.cleanup()


@pytest.fixture
async def start_node(servers: Servers, pool: asyncpg.Pool
                     ) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    nodes: list[Node] = []

    async def start(*, advertise: str = "") -> Node:
        url, runner = await serve(create_app(SimulatorConfig(model="m")))
        node_id = uuid7()
        await launched(pool, node_id, model="m")  # as the orchestrator does first
        agent = NodeAgent(AgentSettings(nats_url=Secret(servers.nats_url), node_id=node_id,
                                        nats_creds=Secret(servers.node_creds(node_id)),
                                        model_name="m", vllm_url=url, endpoint_url=advertise,
                                        heartbeat_interval=0.1, log_json=False))
        node = Node(agent, asyncio.create_task(agent.run()), url, runner)
        nodes.append(node)
        return node

    yield start
    for n in nodes:
        n.task.cancel()
        await asyncio.gather(n.task, return_exceptions=True)
        await n.runner.cleanup()


async def statuses(pool: asyncpg.Pool, node: Node) -> list[tuple[str | None, str, str]]:
    rows = await pool.fetch(
        "SELECT data FROM events WHERE type = 'node.status_changed' AND stream = $1 "
        "ORDER BY stream_version", f"node:{node.agent.node_id}")
    return [(r["data"]["from_status"], r["data"]["to_status"], r["data"]["reason"])
            for r in rows]


async def wait_status(pool: asyncpg.Pool, node: Node, status: str, timeout: float = 10) -> None:
    async def reached() -> bool:
        return bool(await pool.fetchval("SELECT status FROM nodes WHERE id = $1",
                                        node.agent.node_id) == status)

    await eventually(reached, timeout=timeout, what=f"node {status}")


async def fault(node: Node, **faults: Any) -> None:
    async with aiohttp.ClientSession() as s, \
            s.post(f"{node.sim_url}/admin/faults", json=faults) as r:
        assert r.status == 200


async def test_heartbeats_drive_active_unhealthy_and_back(start_monitor: Any, start_node: Any,
                                                          pool: asyncpg.Pool) -> None:
    runner = await start_monitor()
    node = await start_node()
    await wait_status(pool, node, "active")
    await fault(node, health_503=True)
    await wait_status(pool, node, "unhealthy")
    await fault(node, health_503=False)
    await wait_status(pool, node, "active")
    changes = await statuses(pool, node)
    assert [(a, b) for a, b, _ in changes] == [
        ("registered", "active"), ("active", "unhealthy"), ("unhealthy", "active")]
    assert "vllm down" in changes[1][2]
    watcher = runner.app[WATCHER]  # type: ignore[union-attr]
    seen = watcher.heartbeats

    async def more_beats() -> bool:
        return bool(watcher.heartbeats >= seen + 10)

    await eventually(more_beats, what="ten more heartbeats")
    # They changed nothing, and never reached PostgreSQL.
    assert watcher.transitions == 3


async def test_a_silent_node_goes_stale_then_comes_back(start_monitor: Any, start_node: Any,
                                                        pool: asyncpg.Pool) -> None:
    await start_monitor()
    node = await start_node()
    await wait_status(pool, node, "active")
    node.task.cancel()  # the agent dies without a word
    await asyncio.gather(node.task, return_exceptions=True)
    await wait_status(pool, node, "stale", timeout=5)
    changes = await statuses(pool, node)
    assert changes[-1][1:] == ("stale", "no heartbeat for 1s")


async def test_failing_probes_override_cheerful_heartbeats(start_monitor: Any,
                                                           start_node: Any,
                                                           pool: asyncpg.Pool) -> None:
    await start_monitor()
    # vLLM healthy for the agent next to it, unreachable at the address it advertised.
    node = await start_node(advertise=f"http://127.0.0.1:{free_port()}")
    await wait_status(pool, node, "unhealthy")
    changes = await statuses(pool, node)
    assert any("health probes failed" in reason for _, _, reason in changes)
    # Healthy heartbeats keep coming; the node stays out while the probes fail.
    start = node.agent.sequence

    async def beats() -> bool:
        return node.agent.sequence >= start + 5

    await eventually(beats, what="five more heartbeats")
    assert await pool.fetchval("SELECT status FROM nodes WHERE id = $1",
                               node.agent.node_id) == "unhealthy"


async def leader_and_standby(*runners: web.AppRunner) -> tuple[web.AppRunner, web.AppRunner]:
    """The one replica that leads, and the other."""
    async def one_leads() -> list[web.AppRunner]:
        leading = [r for r in runners if r.app is not None and r.app[LEADERSHIP].is_leader]
        return leading if len(leading) == 1 else []

    (leader,) = await eventually(one_leads, what="one monitor leads")
    (standby,) = [r for r in runners if r is not leader]
    return leader, standby


async def test_a_standby_monitor_takes_over_the_sweep(start_monitor: Any, start_node: Any,
                                                      pool: asyncpg.Pool) -> None:
    first = await start_monitor()
    second = await start_monitor()
    node = await start_node()
    await wait_status(pool, node, "active")
    leader, standby = await leader_and_standby(first, second)
    assert standby.app is not None
    watcher = standby.app[WATCHER]
    assert watcher.sweeps == 0  # a standby does not sweep

    await leader.cleanup()  # the leader dies; the standby lives on, and takes over

    async def took_over() -> bool:
        return bool(standby.app is not None and standby.app[LEADERSHIP].is_leader
                    and watcher.sweeps > 0)

    await eventually(took_over, what="the standby sweeping")
    # It hears every heartbeat now (it is the queue group's only member) ...
    beats = watcher.heartbeats

    async def hears() -> bool:
        return bool(watcher.heartbeats >= beats + 3)

    await eventually(hears, what="the standby handling the node's heartbeats")
    assert await pool.fetchval("SELECT status FROM nodes WHERE id = $1",
                               node.agent.node_id) == "active"
    # ... and a node that goes silent is declared stale by it.
    declared = watcher.transitions
    node.task.cancel()
    await asyncio.gather(node.task, return_exceptions=True)
    await wait_status(pool, node, "stale", timeout=15)

    async def counted() -> bool:  # the counter moves after the row is written
        return watcher.transitions > declared

    await eventually(counted, what="the standby counting the transition")
    assert watcher.transitions == declared + 1


async def test_fleet_metrics(start_monitor: Any, start_node: Any, pool: asyncpg.Pool) -> None:
    runner = await start_monitor()
    node = await start_node()
    await wait_status(pool, node, "active")
    site_url = next(iter(runner.addresses))

    async def scraped() -> str | None:
        async with aiohttp.ClientSession() as s, \
                s.get(f"http://{site_url[0]}:{site_url[1]}/metrics") as r:
            text = await r.text()
        return text if "nodes_active_total 1.0" in text else None

    text = await eventually(scraped, what="metrics")
    assert f'node_health_score{{node_id="{node.agent.node_id}"}} 100.0' in text
    assert f'node_heartbeat_age_seconds{{node_id="{node.agent.node_id}"}}' in text
    assert "nodes_draining_total 0.0" in text
