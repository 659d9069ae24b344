"""The admin API's node and usage routes, with a real monitor, agent and simulator."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from agent.node_agent import NodeAgent
from agent.settings import AgentSettings
from agent.simulator import SimulatorConfig, create_app
from schemas.ids import uuid7
from services.core.bus import Bus
from services.core.settings import Secret
from services.monitor.app import create_monitor_app
from services.monitor.settings import MonitorSettings
from tests.conftest import Servers
from tests.helpers import eventually
from tests.integration.test_admin_api import Admin, assert_error, running_admin
from tests.integration.test_monitor_basics import serve


@pytest.fixture
async def admin(database_url: str, nats_url: str, redis_url: str) -> AsyncIterator[Admin]:
    async with running_admin(database_url, nats_url, redis_url) as running:
        yield running


@pytest.fixture
async def fleet(servers: Servers, database_url: str, redis_url: str,
                bus: Bus) -> AsyncIterator[dict[str, Any]]:
    monitor = create_monitor_app(MonitorSettings(
        database_url=Secret(database_url), redis_url=Secret(redis_url),
        nats_url=Secret(servers.nats_url), event_poll_interval=0.2, log_json=False))
    _, monitor_runner = await serve(monitor)
    url, sim_runner = await serve(create_app(SimulatorConfig(model="m",
                                                             inter_token_latency=0.01)))
    agent = NodeAgent(AgentSettings(nats_url=Secret(servers.nats_url), node_id=uuid7(),
                                    model_name="m", vllm_url=url, heartbeat_interval=0.2,
                                    drain_grace=0.05, log_json=False))
    task = asyncio.create_task(agent.run())
    yield {"agent": agent, "task": task}
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await sim_runner.cleanup()
    await monitor_runner.cleanup()


async def test_nodes_listed_with_heartbeats_and_drained(admin: Admin,
                                                        fleet: dict[str, Any]) -> None:
    agent: NodeAgent = fleet["agent"]

    async def listed() -> list[dict[str, Any]] | None:
        page = await admin.ok("GET", "/nodes")
        nodes = [n for n in page["data"] if n["heartbeat"]]
        return nodes or None

    (node,) = await eventually(listed, what="the node with a heartbeat")
    # Registered, and active once the monitor has seen a healthy heartbeat.
    assert node["id"] == str(agent.node_id) and node["status"] in ("registered", "active")
    assert node["model_name"] == "m" and node["heartbeat"]["vllm_healthy"]
    assert 0 <= node["heartbeat"]["age_seconds"] < 5
    assert (await admin.ok("GET", f"/nodes/{agent.node_id}"))["id"] == node["id"]
    assert (await admin.ok("GET", "/nodes", params={"status": "active"}))["data"] == []

    result = await admin.ok("POST", f"/nodes/{agent.node_id}/drain",
                            {"reason": "maintenance", "deadline_seconds": 30}, 202)
    assert result == {"accepted": True, "detail": "draining"}
    assert await asyncio.wait_for(fleet["task"], 15) == 0  # the agent drained and left

    async def terminated() -> bool:
        return (await admin.ok("GET", f"/nodes/{agent.node_id}"))["status"] == "terminated"

    await eventually(terminated, what="the node marked terminated")
    status, answer = await admin.call("POST", f"/nodes/{agent.node_id}/drain", {})
    assert status == 409 and answer["error"]["code"] == "agent_unreachable"
    status, answer = await admin.call("POST", f"/nodes/{agent.node_id}/terminate", {})
    assert status == 409 and answer["error"]["code"] == "node_gone"
    assert "terminated" in answer["error"]["message"]


async def test_termination_is_recorded_for_the_orchestrator(admin: Admin, pool: asyncpg.Pool,
                                                           fleet: dict[str, Any]) -> None:
    agent: NodeAgent = fleet["agent"]

    async def known() -> bool:
        status, _ = await admin.call("GET", f"/nodes/{agent.node_id}")
        return status == 200

    await eventually(known, what="the node registered")
    result = await admin.ok("POST", f"/nodes/{agent.node_id}/terminate",
                            {"reason": "bad GPU"}, 202)
    assert result["node_id"] == str(agent.node_id)
    assert result["status"] in ("registered", "active")
    node = await admin.ok("GET", f"/nodes/{agent.node_id}")
    assert node["terminate_requested_at"] is not None and node["deployment_id"] is None
    events = await pool.fetch("SELECT data, metadata FROM events "
                              "WHERE type = 'node.terminate_requested' AND stream = $1",
                              f"node:{agent.node_id}")
    assert [(e["data"]["reason"], e["metadata"]["actor"]) for e in events] == [
        ("bad GPU", "admin-api")]


async def test_unknown_nodes(admin: Admin) -> None:
    for method, path in (("GET", f"/nodes/{uuid.uuid4()}"),
                         ("POST", f"/nodes/{uuid.uuid4()}/drain"),
                         ("POST", f"/nodes/{uuid.uuid4()}/terminate")):
        status, answer = await admin.call(method, path, {} if method == "POST" else None)
        assert status == 404
        assert_error(answer, "not_found_error")


async def add_usage(pool: asyncpg.Pool, tenant: uuid.UUID, when: datetime, *, model: str = "m",
                    prompt: int = 10, completion: int = 5, cost: str = "0.001") -> None:
    await pool.execute(
        """INSERT INTO usage_records (request_id, event_id, tenant_id, environment_id,
               api_key_id, model, endpoint, region, node_id, prompt_tokens, completion_tokens,
               total_tokens, cost, latency_ms, ttft_ms, status, streamed, occurred_at)
           VALUES ($1, $2, $3, $4, $5, $6, 'chat', 'r', NULL, $7, $8, $9, $10, 1, NULL, 200,
                   false, $11)""",
        uuid.uuid4().hex, uuid.uuid4(), tenant, tenant, tenant, model, prompt, completion,
        prompt + completion, Decimal(cost), when)


async def test_usage_per_hour_and_day(admin: Admin, pool: asyncpg.Pool) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    for minute in (1, 2, 3):
        await add_usage(pool, a, hour + timedelta(minutes=minute))
    await add_usage(pool, a, hour + timedelta(hours=1, minutes=5), completion=7)
    await add_usage(pool, b, hour + timedelta(minutes=1))
    hourly = await admin.ok("GET", "/usage", params={"tenant_id": str(a), "granularity": "hour",
                                                    "start": "1d"})
    assert [(r["requests"], r["completion_tokens"], r["cost"]) for r in hourly["data"]] == \
        [(3, 15, "0.003000000"), (1, 7, "0.001000000")]
    everyone = await admin.ok("GET", "/usage", params={"granularity": "day", "start": "2d"})
    assert sum(r["requests"] for r in everyone["data"]) == 5
    status, answer = await admin.call("GET", "/usage", params={"granularity": "month"})
    assert status == 400 and answer["error"]["param"] == "granularity"
    status, answer = await admin.call("GET", "/usage", params={"bogus": "1"})
    assert status == 400 and answer["error"]["param"] == "bogus"
