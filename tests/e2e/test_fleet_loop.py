"""The fleet loop end to end with the local cloud: a deployment comes up and serves through
the gateway; a crashed machine is replaced; a spot notice drains the node at once and a
replacement serves before the deadline; load scales the fleet up and back down; a standby
orchestrator takes over without launching twice."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import aiohttp
from openai import AsyncOpenAI

from services.infra.devstack import free_port
from services.infra.natsauth.identities import Role
from services.infra.processes import die_with_parent
from tests.helpers import eventually
from tests.integration.fleet_fixtures import MODEL, ORCHESTRATOR_TIMING, Fleet
from tests.integration.test_admin_api import running_admin


async def test_deployment_comes_up_and_serves_through_the_gateway(fleet: Fleet) -> None:
    await fleet.start_cloud()
    await fleet.start_control_plane()
    dep = await fleet.deploy(regions=("aws/us-east-1", "aws/us-west-2"), min_nodes=2,
                             max_nodes=4)
    active = await fleet.wait_nodes("active", 2)
    # One per region, each launched by the orchestrator for this deployment.
    assert sorted(r["region"] for r in active) == ["us-east-1", "us-west-2"]
    assert {r["deployment_id"] for r in active} == {dep}
    assert len(fleet.cloud.machines) == 2
    assert {r["cluster_name"] for r in active} == set(fleet.cloud.machines)
    routed = await fleet.routable(2)
    assert sorted(routed) == sorted(str(r["id"]) for r in active)
    assert (await fleet.complete()).startswith("chatcmpl-")
    launches = await fleet.events("node.launching")
    assert len(launches) == 2


async def test_a_crashed_machine_is_out_of_the_pool_and_replaced(fleet: Fleet) -> None:
    await fleet.start_cloud()
    await fleet.start_control_plane()
    await fleet.deploy(min_nodes=2, max_nodes=2)
    await fleet.wait_nodes("active", 2)
    await fleet.routable(2)
    victim = (await fleet.nodes("active"))[0]
    machine = fleet.cloud.machines[victim["cluster_name"]]
    os.kill(machine.simulator.pid, signal.SIGKILL)

    # Out of the gateway's pool, then failed by the cloud's view, then replaced.
    await eventually(lambda: _not_routable(fleet, str(victim["id"])), timeout=5,
                     what="crashed node out of the pool")
    replaced = await eventually(lambda: fleet.events("node.replaced", victim["id"]),
                                timeout=10, what="node.replaced")
    replacement = replaced[0]["replacement_id"]
    active = await fleet.wait_nodes("active", 2)
    assert replacement in {str(r["id"]) for r in active}
    assert str(victim["id"]) not in {str(r["id"]) for r in active}
    row = (await fleet.pool.fetchrow("SELECT status, status_reason FROM nodes WHERE id = $1",
                                     victim["id"]))
    assert row["status"] == "failed"
    assert "no longer has its machine" in row["status_reason"]
    await fleet.routable(2)
    assert (await fleet.complete()).startswith("chatcmpl-")
    assert len(await fleet.events("node.launching")) == 3


async def _not_routable(fleet: Fleet, node_id: str) -> bool:
    return node_id not in {n.node_id for n in fleet.gw.table.candidates(
        MODEL, time.monotonic(),
        fleet.gw.proxy.rules)}


async def _machine_gone(fleet: Fleet, cluster: str, timeout: float = 10) -> None:
    async def gone() -> bool:
        return cluster not in fleet.cloud.machines

    await eventually(gone, timeout=timeout, what=f"machine {cluster} down")


def _sent_to(fleet: Fleet, node_id: str) -> float:
    """Requests the gateway has sent to a node (its loadbalancer_requests_total)."""
    value = fleet.gw.metrics.lb_requests.labels(MODEL, node_id)._value.get()
    return float(value)


async def test_spot_notice_drains_at_once_and_a_replacement_serves_before_the_deadline(
        fleet: Fleet) -> None:
    await fleet.start_cloud()
    # Production's reconcile interval and slower: the replacement must not wait for a tick.
    await fleet.start_control_plane(reconcile_every_seconds=30)
    await fleet.deploy(regions=("aws/us-east-1",), spot=True, min_nodes=2, max_nodes=2)
    await fleet.wait_nodes("active", 2)
    await fleet.routable(2)
    victim = (await fleet.nodes("active"))[0]
    victim_id = str(victim["id"])
    warned = asyncio.get_running_loop().create_future()

    async def on_warning(msg: Any) -> None:
        if not warned.done():
            warned.set_result(time.monotonic())

    sub = await fleet.bus.nc.subscribe(f"node.spot_warning.{victim_id}", cb=on_warning)
    notice = 20.0
    deadline = time.monotonic() + notice
    await fleet.preempt(victim["cluster_name"], notice)
    t0 = await asyncio.wait_for(warned, 10)
    await sub.unsubscribe()

    # Out of the pool within a second of the notice reaching the control plane …
    await eventually(lambda: _not_routable(fleet, victim_id), timeout=1.0, interval=0.01,
                     what="spot node out of the pool")
    assert time.monotonic() - t0 < 1.0
    # … and no request reaches it from then on.
    before = _sent_to(fleet, victim_id)
    for _ in range(6):
        await fleet.complete()
    assert _sent_to(fleet, victim_id) == before

    # The replacement was launched at once and serves before the cloud takes the machine.
    replaced = await eventually(lambda: fleet.events("node.replaced", victim_id), timeout=5,
                                what="node.replaced")
    replacement = replaced[0]["replacement_id"]
    routed = await fleet.routable(2, timeout=deadline - time.monotonic())
    assert replacement in routed and victim_id not in routed
    assert time.monotonic() < deadline
    # The old node drained, left, and its machine was taken down — before the deadline too.
    await fleet.wait_nodes("terminated", 1, timeout=deadline - time.monotonic())
    await _machine_gone(fleet, victim["cluster_name"], timeout=deadline - time.monotonic())
    assert time.monotonic() < deadline
    # It drained on its own notice and left cleanly (or was ended by the orchestrator).
    drains = await fleet.events("node.draining", victim_id)
    assert drains and "spot" in drains[0]["reason"]
    assert (await fleet.events("node.deregistered", victim_id)
            or await fleet.events("node.terminated", victim_id))


async def test_load_scales_the_deployment_up_and_quiet_scales_it_back_down(
        fleet: Fleet) -> None:
    # One sequence at a time per node: concurrent requests wait in vLLM's queue.
    await fleet.start_cloud("--max-num-seqs", "1")
    await fleet.start_control_plane()
    await fleet.deploy(min_nodes=1, max_nodes=2)
    first = (await fleet.wait_nodes("active", 1))[0]
    await fleet.routable(1)
    stop = asyncio.Event()

    async def pressure() -> None:
        # Six requests in flight all the time, so five always wait: pressure that lasts. (In
        # batches of six the queue emptied at the end of each, and a heartbeat seen then
        # restarted the scale-up delay: on a slow machine, every time.)
        async def one_after_another(client: AsyncOpenAI) -> None:
            while not stop.is_set():
                await client.chat.completions.create(
                    model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "go"}])

        async with fleet.client() as client:
            await asyncio.gather(*(one_after_another(client) for _ in range(6)))

    load = asyncio.create_task(pressure())
    try:
        active = await fleet.wait_nodes("active", 2, timeout=60)
    finally:
        stop.set()
        await load
    second = next(r for r in active if r["id"] != first["id"])
    # Quiet: after the scale-down delay the newest node goes, drained; the first stays.
    await fleet.wait_nodes("terminated", 1, timeout=60)
    remaining = await fleet.wait_nodes("active", 1)
    assert remaining[0]["id"] == first["id"]
    asked = await fleet.events("node.terminate_requested", second["id"])
    assert [e["reason"] for e in asked] == ["scale down"]
    assert len(await fleet.events("node.launching")) == 2  # no flapping back up
    await _machine_gone(fleet, second["cluster_name"])


async def _spawn_orchestrator(fleet: Fleet) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    settings = fleet.orchestrator_settings()
    env = {**os.environ, "DATABASE_URL": fleet.servers.database_url,
           "REDIS_URL": fleet.servers.redis_url, "NATS_URL": fleet.servers.nats_url,
           "NATS_CREDS": fleet.servers.creds(Role.ORCHESTRATOR),
           "NATS_NODE_ISSUER": fleet.servers.node_issuer(),
           "NODE_API_KEY_SECRET": fleet.node_key_secret,
           "HTTP_PORT": str(port), "LAUNCHER": "local", "LOCAL_CLOUD_URL": fleet.cloud_url,
           "LOG_JSON": "false", "EVENT_POLL_INTERVAL": "0.1"}
    env.update({k.upper(): str(v) for k, v in ORCHESTRATOR_TIMING.items()})
    assert settings.launcher == "local"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.orchestrator", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=die_with_parent)
    return proc, f"http://127.0.0.1:{port}"


async def _leads(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
            text = await r.text()
    except aiohttp.ClientError:
        return False
    return "orchestrator_is_leader 1.0" in text


async def test_a_standby_takes_over_from_a_killed_leader_without_launching_twice(
        fleet: Fleet) -> None:
    await fleet.start_cloud()
    await fleet.start_control_plane(orchestrator=False)
    leader, leader_url = await _spawn_orchestrator(fleet)
    standby: asyncio.subprocess.Process | None = None
    try:
        await eventually(lambda: _leads(leader_url), timeout=20, interval=0.1,
                         what="first orchestrator leads")
        standby, standby_url = await _spawn_orchestrator(fleet)
        await eventually(lambda: _ready(standby_url), timeout=20, interval=0.1,
                         what="standby up")
        assert not await _leads(standby_url)
        dep = await fleet.deploy(min_nodes=2, max_nodes=3)

        # The leader dies right after asking the cloud, before the nodes registered.
        await eventually(lambda: _machines(fleet, 2), timeout=20, what="2 machines launched")
        leader.kill()
        await leader.wait()
        await eventually(lambda: _leads(standby_url), timeout=10, interval=0.05,
                         what="standby takes over")
        await fleet.wait_nodes("active", 2)
        assert len(await fleet.events("node.launching")) == 2
        assert len(fleet.cloud.machines) == 2

        # The new leader does the work from here.
        await fleet.catalog.update_deployment(dep, min_nodes=3)
        await fleet.wait_nodes("active", 3)
        assert len(await fleet.events("node.launching")) == 3
    finally:
        for proc in (leader, standby):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _ready(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/ready") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def _machines(fleet: Fleet, count: int) -> bool:
    return len(fleet.cloud.machines) >= count


async def test_an_operator_terminates_a_node_and_the_deployment_keeps_its_minimum(
        fleet: Fleet) -> None:
    await fleet.start_cloud()
    await fleet.start_control_plane()
    await fleet.deploy(min_nodes=1, max_nodes=1)
    (node,) = await fleet.wait_nodes("active", 1)
    servers = fleet.servers
    async with running_admin(servers.database_url, servers.nats_url, servers.redis_url,
                             creds=servers.creds(Role.ADMIN_API)) as admin:
        answer = await admin.ok("POST", f"/nodes/{node['id']}/terminate",
                                {"reason": "bad GPU"}, 202)
    assert answer["status"] == "active"
    # Drained (out of the pool at once), left, machine down; a new node serves in its place.
    await fleet.wait_nodes("terminated", 1)
    await _machine_gone(fleet, node["cluster_name"])
    (successor,) = await fleet.wait_nodes("active", 1)
    assert successor["id"] != node["id"]
    await fleet.routable(1)
    assert (await fleet.complete()).startswith("chatcmpl-")
    drains = await fleet.events("node.draining", node["id"])
    assert drains and "bad GPU" in drains[0]["reason"]


async def test_no_capacity_tries_the_next_region_then_on_demand(fleet: Fleet) -> None:
    await fleet.start_cloud()
    fleet.cloud.set_capacity("us-east-1", spot=True, available=False)
    await fleet.start_control_plane()
    await fleet.deploy(regions=("aws/us-east-1", "aws/us-west-2"), spot=True, min_nodes=2,
                       max_nodes=2)
    active = await fleet.wait_nodes("active", 2)
    # The refused launch failed; both nodes run as spot in the region that had room.
    assert [(r["region"], r["spot_instance"]) for r in active] == [("us-west-2", True)] * 2
    failed = await fleet.nodes("failed")
    assert [r["region"] for r in failed] == ["us-east-1"]
    assert "no spot capacity" in failed[0]["status_reason"]

    # No spot anywhere: the next node is on-demand.
    fleet.cloud.set_capacity("us-west-2", spot=True, available=False)
    await fleet.catalog.update_deployment(
        (await fleet.pool.fetchval("SELECT id FROM deployments")), min_nodes=3, max_nodes=3)
    active = await fleet.wait_nodes("active", 3)
    assert sorted(r["spot_instance"] for r in active) == [False, True, True]


async def test_a_deployment_with_no_active_node_is_reported_once_per_outage(
        fleet: Fleet) -> None:
    await fleet.start_cloud()
    for spot in (True, False):
        fleet.cloud.set_capacity("us-east-1", spot=spot, available=False)
    await fleet.start_control_plane()
    dep = await fleet.deploy(regions=("aws/us-east-1",), spot=True, min_nodes=1, max_nodes=1)

    (alert,) = await eventually(lambda: fleet.events("deployment.no_active_nodes"),
                                timeout=20, what="deployment.no_active_nodes")
    assert alert["deployment_id"] == str(dep) and alert["model_name"] == MODEL
    # The outage goes on, the reconciler keeps ticking: no second alert for the same outage.
    ticks = fleet.orchestrator.ticks

    async def ticked() -> bool:
        return fleet.orchestrator.ticks >= ticks + 5

    await eventually(ticked, timeout=10, what="five more reconciler ticks")
    assert len(await fleet.events("deployment.no_active_nodes")) == 1
    assert await fleet.nodes("active") == []
