"""A spot notice is acted on as soon as the monitor has recorded it, not at the next reconcile
tick: the leader, woken by the notice on NATS, waits for it in the log and brings the node's
row up to date itself."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.aio.msg import Msg

from schemas.events import NodeSpotWarning, decode_event
from services.infra.aio import stop_task
from services.infra.log_waker import LogWaker
from tests.helpers import eventually
from tests.integration.fleet_fixtures import Rig, rig  # noqa: F401  (fixture)
from tests.integration.test_monitor_states import start_monitor  # noqa: F401  (fixture)


async def test_a_spot_notice_is_replaced_at_once_whatever_the_interval(
        rig: Rig, start_monitor: Any) -> None:  # noqa: F811
    await start_monitor(probe_every_seconds=3600, stale_after_seconds=60)  # records node.*
    dep = await rig.deploy(min_nodes=1, max_nodes=1)
    node = await rig.active_node(dep)
    # The log's notifications only: its polling fallback is far slower than the test.
    waker = LogWaker(rig.servers.database_url, poll_interval=30)
    await waker.start()
    o = rig.orchestrator(reconcile_every_seconds=120)
    o.waker = waker

    async def observe(msg: Msg) -> None:  # what the orchestrator app subscribes
        o.observe(decode_event(msg.data))

    sub = await rig.bus.nc.subscribe("node.spot_warning.*", cb=observe)
    lead = asyncio.create_task(o.lead())
    try:
        async def ticked() -> bool:
            return o.ticks >= 1

        await eventually(ticked, what="the first tick")
        ticks = o.ticks
        started = time.monotonic()
        await rig.bus.publish(NodeSpotWarning(node_id=node, provider="aws", action="terminate",
                                              deadline=datetime.now(UTC) + timedelta(minutes=2)))

        async def replaced() -> Any:
            return await rig.pool.fetchval(
                "SELECT data->>'replacement_id' FROM events WHERE type = 'node.replaced' "
                "AND stream = $1", f"node:{node}")

        replacement = await eventually(replaced, timeout=5, what="the replacement launched")
        assert time.monotonic() - started < 5

        async def asked() -> list[str]:  # recorded first, then the cloud is asked
            return [str(s.node_id) for s in rig.cloud.launches]

        assert await eventually(asked, what="the cloud asked") == [replacement]
        assert o.ticks <= ticks + 5  # woken by the notice and by the log, not by polling
    finally:
        await stop_task(lead)
        await sub.unsubscribe()
        await waker.close()
