"""The cloud's view as a safety signal, and its limits: a look that has most of the fleet gone
at once (SkyPilot asked as another user, the wrong account) is not believed; one machine gone
is acted on at once."""

from __future__ import annotations

from services.core.node_states import Signal
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
