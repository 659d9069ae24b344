"""The cloud's view as a safety signal, and its limits: a look that has most of the fleet gone
at once (SkyPilot asked as another user, the wrong account) is not believed; one machine gone
is acted on at once. A cloud that fails a launch for another reason than capacity is not
asked again in the same place at every tick, and a node that registers but never serves does
not count as capacity for ever."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from services.domain.node_states import Signal
from services.infra.aio import stop_task
from services.orchestrator.launcher import LaunchError
from tests.helpers import eventually
from tests.integration.fleet_fixtures import Rig, rig  # noqa: F401  (fixture)


async def test_a_blind_look_at_the_cloud_fails_nobody(rig: Rig) -> None:  # noqa: F811
    dep = await rig.deploy(min_nodes=4, max_nodes=4)
    nodes = [await rig.active_node(dep) for _ in range(4)]
    o = rig.orchestrator()
    await o.tick()
    await rig.settle()
    assert rig.cloud.launches == [] and rig.cloud.downs == []

    rig.cloud.blind = True  # every machine missing from the answer
    await o.tick()
    await rig.settle()
    assert [await rig.status(n) for n in nodes] == ["active"] * 4
    assert rig.cloud.launches == [] and rig.cloud.downs == []
    assert o.metrics.cloud_doubted._value.get() == 1

    # One machine really gone: that is believed, and the node replaced at once.
    rig.cloud.blind = False
    lost = nodes[0]
    del rig.cloud.machines[next(c for c, s in rig.cloud.machines.items() if s.node_id == lost)]
    await o.tick()
    await rig.settle()
    assert await rig.status(lost) == "failed"
    assert [await rig.status(n) for n in nodes[1:]] == ["active"] * 3
    assert len(rig.cloud.launches) == 1
    assert o.metrics.cloud_doubted._value.get() == 1


async def test_a_whole_small_fleet_gone_is_left_to_the_heartbeats(rig: Rig) -> None:  # noqa: F811
    dep = await rig.deploy(min_nodes=2, max_nodes=2)
    nodes = [await rig.active_node(dep) for _ in range(2)]
    o = rig.orchestrator()
    rig.cloud.machines.clear()
    await o.tick()
    await rig.settle()
    assert [await rig.status(n) for n in nodes] == ["active"] * 2
    # When the machines really are gone, their silence says so: the monitor marks them
    # stale, and they are replaced (a few at a time).
    for n in nodes:
        await o.fleet.signal(n, Signal.SILENT)
    await o.tick()
    await rig.settle()
    assert len(rig.cloud.launches) == 1  # a quarter of two, at least one, at once


async def test_a_launch_error_moves_on_to_the_next_region_and_backs_off(
        rig: Rig) -> None:  # noqa: F811
    rig.cloud.errors["us-east-1"] = LaunchError("VPC quota exceeded")  # not capacity
    await rig.deploy(regions=("aws/us-east-1", "aws/us-west-2"), min_nodes=1, max_nodes=1)
    o = rig.orchestrator(launch_retry_seconds=60)
    for _ in range(5):  # what five ticks in a row (each failure wakes the next) do
        await o.tick()
        await rig.settle()
    assert [s.region for s in rig.cloud.launches] == ["us-east-1", "us-west-2"]
    failed = await rig.pool.fetch("SELECT region FROM nodes WHERE status = 'failed'")
    assert [r["region"] for r in failed] == ["us-east-1"]
    assert len(await rig.pool.fetch(
        "SELECT 1 FROM events WHERE type = 'node.launching'")) == 2
    assert o.metrics.launch_failures.labels("error")._value.get() == 1


async def test_a_node_that_registers_but_never_serves_is_failed_and_replaced(
        rig: Rig) -> None:  # noqa: F811
    dep = await rig.deploy(min_nodes=1, max_nodes=1)
    stuck = await rig.active_node(dep, serving=False)
    assert await rig.status(stuck) == "registered"
    patient = rig.orchestrator()
    await patient.tick()
    await rig.settle()
    assert rig.cloud.launches == [] and await rig.status(stuck) == "registered"

    since = await rig.pool.fetchval("SELECT status_since FROM nodes WHERE id = $1", stuck)
    await rig.pool.execute("UPDATE nodes SET status_since = $2 WHERE id = $1", stuck,
                           since - timedelta(minutes=21))  # registered 21 minutes ago
    o = rig.orchestrator(activation_deadline_seconds=20 * 60)
    await o.tick()
    await rig.settle()
    assert await rig.status(stuck) == "failed"
    reason = await rig.pool.fetchval("SELECT status_reason FROM nodes WHERE id = $1", stuck)
    assert "did not become active" in reason
    assert len(rig.cloud.launches) == 1
    replaced = await rig.pool.fetchval(
        "SELECT data->>'replacement_id' FROM events WHERE type = 'node.replaced'")
    assert replaced == str(rig.cloud.launches[0].node_id)


async def test_deployment_series_are_the_leaders_and_the_live_deployments_only(
        rig: Rig) -> None:  # noqa: F811
    keep = await rig.deploy(min_nodes=1, max_nodes=1)
    gone = await rig.deploy(min_nodes=0, max_nodes=1)
    o = rig.orchestrator()
    await o.tick()
    await rig.settle()

    def series() -> set[str]:
        return {s.labels["deployment"] for m in o.metrics.desired.collect() for s in m.samples}

    assert series() == {str(keep), str(gone)}
    await rig.catalog.delete_deployment(gone)
    await o.tick()
    assert series() == {str(keep)}
    assert {s.labels["deployment"] for m in o.metrics.active.collect()
            for s in m.samples} == {str(keep)}

    lead = asyncio.create_task(o.lead())  # leads for a moment, then stops leading

    async def ticked() -> bool:
        return o.ticks >= 3

    await eventually(ticked, what="a tick as leader")
    await stop_task(lead)
    assert series() == set() and o.metrics.leader._value.get() == 0
