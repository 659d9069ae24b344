"""The admin API's node and usage routes, with a real monitor, agent and simulator."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from agent.node_agent import NodeAgent
from agent.settings import AgentSettings
from agent.simulator import SimulatorConfig, create_app
from schemas.events import NodeHeartbeat, UsagePrice, UsageRecorded
from schemas.ids import uuid7
from schemas.subjects import node_command_subject
from services.domain.fleet.projection import NodesProjection
from services.domain.usage_queries import parse_usage_query
from services.domain.usage_records import UsageRecordsProjection
from services.infra.bus import Bus
from services.infra.eventlog import EventLog
from services.infra.natsauth.identities import Role
from services.infra.projections import ProjectionRunner
from services.infra.settings import Secret
from services.monitor.app import create_monitor_app
from services.monitor.settings import MonitorSettings
from tests.conftest import Servers
from tests.helpers import eventually, launched, node_registered
from tests.integration.test_admin_api import Admin, assert_error, running_admin
from tests.integration.test_monitor_basics import serve


@pytest.fixture
async def admin(servers: Servers, database_url: str, nats_url: str,
                redis_url: str) -> AsyncIterator[Admin]:
    async with running_admin(database_url, nats_url, redis_url,
                             creds=servers.creds(Role.ADMIN_API)) as running:
        yield running


@pytest.fixture
async def fleet(servers: Servers, database_url: str, redis_url: str, bus: Bus,
                pool: asyncpg.Pool) -> AsyncIterator[dict[str, Any]]:
    monitor = create_monitor_app(MonitorSettings(
        database_url=Secret(database_url), redis_url=Secret(redis_url),
        nats_url=Secret(servers.nats_url), nats_creds=Secret(servers.creds(Role.MONITOR)),
        event_poll_interval=0.2, log_json=False))
    _, monitor_runner = await serve(monitor)
    url, sim_runner = await serve(create_app(SimulatorConfig(model="m",
                                                             inter_token_latency=0.01)))
    node_id = uuid7()
    await launched(pool, node_id, model="m")  # the monitor accepts only launched nodes
    agent = NodeAgent(AgentSettings(nats_url=Secret(servers.nats_url), node_id=node_id,
                                    nats_creds=Secret(servers.node_creds(node_id)),
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
        # Listed from its launch on; registered once the monitor accepted it.
        nodes = [n for n in page["data"] if n["heartbeat"] and n["status"] != "launching"]
        return nodes or None

    (node,) = await eventually(listed, what="the node with a heartbeat")
    # Registered, and active once the monitor has seen a healthy heartbeat.
    assert node["id"] == str(agent.node_id) and node["status"] in ("registered", "active")
    assert node["model_name"] == "m" and node["heartbeat"]["vllm_healthy"]
    assert 0 <= node["heartbeat"]["age_seconds"] < 5
    assert (await admin.ok("GET", f"/nodes/{agent.node_id}"))["id"] == node["id"]
    # The status filter: the node is not draining yet (and may be active by now).
    assert (await admin.ok("GET", "/nodes", params={"status": "draining"}))["data"] == []

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
        status, node = await admin.call("GET", f"/nodes/{agent.node_id}")
        return status == 200 and node["status"] != "launching"

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
                    prompt: int = 10, completion: int = 5, cost: str = "0.001",
                    environment: uuid.UUID | None = None,
                    key: uuid.UUID | None = None, region: str = "r") -> None:
    """Usage as billing records it: the event in the log, then the real projection (both
    usage_records and usage_hourly)."""
    log = EventLog(pool)
    price = UsagePrice(input_price_per_million=Decimal("1"),
                       output_price_per_million=Decimal("1"), region_multiplier=Decimal("1"),
                       cost=Decimal(cost))
    await log.record([UsageRecorded(
        request_id=uuid.uuid4().hex, tenant_id=tenant, environment_id=environment or tenant,
        api_key_id=key or tenant, model=model, endpoint="chat", region=region, node_id=None,
        prompt_tokens=prompt, completion_tokens=completion, latency_ms=1.0, price=price,
        occurred_at=when)])
    await ProjectionRunner(log, UsageRecordsProjection()).catch_up()


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


async def _brute_force(pool: asyncpg.Pool, params: dict[str, str]) -> list[dict[str, Any]]:
    """The same totals added up from usage_records alone, in Python."""
    q = parse_usage_query(params)
    rows = [r for r in await pool.fetch("SELECT * FROM usage_records WHERE occurred_at >= $1 "
                                        "AND occurred_at < $2", q.start, q.end)
            if q.region is None or r["region"] == q.region]
    columns = {"tenant": "tenant_id", "environment": "environment_id", "key": "api_key_id",
               "model": "model", "region": "region"}
    totals: dict[tuple[Any, ...], list[Any]] = {}
    for r in rows:
        at = r["occurred_at"].astimezone(UTC)
        period = at.replace(minute=0, second=0, microsecond=0)
        if q.granularity == "day":
            period = period.replace(hour=0)
        group = (period, *(str(r[columns[d]]) for d in q.group_by))
        t = totals.setdefault(group, [0, 0, 0, Decimal(0)])
        t[0] += 1
        t[1] += r["prompt_tokens"]
        t[2] += r["completion_tokens"]
        t[3] += r["cost"]
    out = []
    for group, (n, prompt, completion, cost) in sorted(totals.items()):
        row: dict[str, Any] = {"period_start": group[0].isoformat().replace("+00:00", "Z")}
        row.update({columns[d]: v for d, v in zip(q.group_by, group[1:], strict=True)})
        row.update(requests=n, prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion, cost=f"{cost:.9f}")
        out.append(row)
    return out


async def test_usage_grouped_and_from_whole_hours_equals_adding_up_requests(
        admin: Admin, pool: asyncpg.Pool) -> None:
    tenants, envs, keys = [uuid.uuid4(), uuid.uuid4()], [uuid.uuid4(), uuid.uuid4()], \
        [uuid.uuid4(), uuid.uuid4(), uuid.uuid4()]
    base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=30)
    # Spread over 30 hours, ragged minutes, two tenants, three keys, two regions.
    for i in range(40):
        await add_usage(pool, tenants[i % 2], base + timedelta(minutes=47 * i + 13),
                        model=("m", "n")[i % 3 == 0], prompt=i, completion=2 * i,
                        cost=f"0.00{i % 7 + 1}", environment=envs[i % 2], key=keys[i % 3],
                        region=("us-east-1", "eu-west-1")[i % 5 < 2])
    assert await pool.fetchval("SELECT count(*) FROM usage_hourly") > 10
    start = (base + timedelta(minutes=95)).isoformat()  # mid-hour: ragged edges
    end = (base + timedelta(hours=27, minutes=20)).isoformat()
    for params in ({"start": start, "end": end, "granularity": "hour"},
                   {"start": start, "end": end, "granularity": "day", "group_by": "model"},
                   {"start": start, "end": end, "granularity": "hour",
                    "group_by": "tenant,environment"},
                   {"start": start, "end": end, "group_by": "key,model"},
                   {"start": start, "end": end, "granularity": "hour", "group_by": "tenant",
                    "tenant_id": str(tenants[0])},
                   {"start": start, "end": end, "group_by": "model,region"},
                   {"start": start, "end": end, "granularity": "hour", "group_by": "region",
                    "region": "eu-west-1"},
                   {"start": start, "end": end, "group_by": "tenant,model",
                    "region": "us-east-1"},
                   {"start": (base + timedelta(minutes=200)).isoformat(),
                    "end": (base + timedelta(minutes=230)).isoformat(), "group_by": "model"}):
        answer = await admin.ok("GET", "/usage", params=params)
        expected = await _brute_force(pool, params)
        if "tenant_id" in params:
            expected = [r for r in expected if r["tenant_id"] == params["tenant_id"]]
        assert answer["data"] == expected, params
        assert answer["group_by"] == params.get(
            "group_by", "tenant,environment,key,model,region").split(",")
        total = answer["total"]
        assert answer["currency"] == "usd"
        for field in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
            assert total[field] == sum(r[field] for r in expected), (params, field)
        assert Decimal(total["cost"]) == sum(Decimal(r["cost"]) for r in expected), params


async def test_usage_reads_whole_hours_from_usage_hourly(admin: Admin,
                                                         pool: asyncpg.Pool) -> None:
    tenant = uuid.uuid4()
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
    await add_usage(pool, tenant, hour + timedelta(minutes=10), completion=5)
    # What a month of requests looks like to the query: the hour's total, not its rows.
    await pool.execute("UPDATE usage_hourly SET requests = 1000, completion_tokens = 5000")
    whole = await admin.ok("GET", "/usage", params={
        "start": hour.isoformat(), "end": (hour + timedelta(hours=2)).isoformat(),
        "group_by": "tenant"})
    assert [(r["requests"], r["completion_tokens"]) for r in whole["data"]] == [(1000, 5000)]
    # A part of an hour, or a question about keys, is answered from the requests themselves.
    part = await admin.ok("GET", "/usage", params={
        "start": (hour + timedelta(minutes=5)).isoformat(),
        "end": (hour + timedelta(hours=2)).isoformat(), "group_by": "tenant"})
    by_key = await admin.ok("GET", "/usage", params={
        "start": hour.isoformat(), "end": (hour + timedelta(hours=2)).isoformat(),
        "group_by": "key"})
    for answer in (part, by_key):
        assert [(r["requests"], r["completion_tokens"]) for r in answer["data"]] == [(1, 5)]
    assert set(by_key["data"][0]) == {"period_start", "api_key_id", "requests",
                                      "prompt_tokens", "completion_tokens", "total_tokens",
                                      "cost"}


@pytest.mark.parametrize(("query", "param"), [
    ("tenant_id={a}&tenant_id={b}", "tenant_id"), ("group_by=tenant,planet", "group_by"),
    ("group_by=", "group_by"), ("granularity=hour&granularity=day", "granularity"),
    ("models=m", "models"),
])
async def test_bad_usage_queries_name_the_parameter(admin: Admin, query: str,
                                                    param: str) -> None:
    status, answer = await admin.call(
        "GET", "/usage?" + query.format(a=uuid.uuid4(), b=uuid.uuid4()))
    assert status == 400 and answer["error"]["param"] == param


async def _registered_node(pool: asyncpg.Pool) -> uuid.UUID:
    """A node in the `nodes` projection, as the monitor would have recorded it."""
    event = node_registered(uuid7(), model="m")
    log = EventLog(pool)
    await log.record([event])
    await ProjectionRunner(log, NodesProjection()).catch_up()
    return event.node_id


@pytest.mark.parametrize(("params", "param"), [
    ([("status", "bogus")], "status"), ([("status", "active"), ("status", "draining")], "status"),
    ([("model", "m"), ("model", "n")], "model"), ([("limit", "1"), ("limit", "2")], "limit"),
])
async def test_node_filters_are_checked(admin: Admin, params: list[tuple[str, str]],
                                        param: str) -> None:
    status, answer = await admin.call("GET", "/nodes", params=params)
    assert status == 400
    assert param in assert_error(answer, "invalid_request_error", param)


async def test_heartbeat_age_is_the_monitors_not_the_agents_clock(
        admin: Admin, pool: asyncpg.Pool, redis_url: str) -> None:
    node = await _registered_node(pool)
    # What the monitor keeps: the heartbeat as sent (by an agent whose clock is an hour
    # behind) and when the monitor itself received it, two seconds ago.
    beat = NodeHeartbeat(node_id=node, sequence=7, health_score=95, vllm_healthy=True,
                         occurred_at=datetime.now(UTC) - timedelta(hours=1))
    redis = aioredis.from_url(redis_url)
    try:
        await redis.set(f"node:{node}:heartbeat", msgspec.json.encode(beat))
        await redis.zadd("nodes:heard", {str(node): time.time() - 2})
        for answer in ((await admin.ok("GET", "/nodes"))["data"][0],
                       await admin.ok("GET", f"/nodes/{node}")):
            assert 2 <= answer["heartbeat"]["age_seconds"] < 10
            assert answer["heartbeat"]["health_score"] == 95
    finally:
        await redis.aclose()


async def test_a_drain_reply_the_api_cannot_read_is_a_502(admin: Admin, pool: asyncpg.Pool,
                                                          bus: Bus) -> None:
    node = await _registered_node(pool)

    async def garbled(msg: Any) -> None:
        await msg.respond(b"\x00 not a reply")

    sub = await bus.nc.subscribe(node_command_subject(node), cb=garbled)
    try:
        status, answer = await admin.call("POST", f"/nodes/{node}/drain", {})
    finally:
        await sub.unsubscribe()
    assert status == 502 and answer["error"]["code"] == "bad_agent_reply"
