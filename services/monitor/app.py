"""The monitor service: `python -m services.monitor` (or `crosslogic serve monitor`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import msgspec
import structlog
from aiohttp import web

from schemas.commands import RegistrationAck
from schemas.events import Event, NodeRegistered
from schemas.subjects import HEARTBEATS, NODES, node_ack_subject
from services.core.bus import ConsumerSpec
from services.core.http import BUS, EVENTLOG, REDIS, REGISTRY, WAKER, create_app
from services.core.projections import ProjectionRunner
from services.core.recorder import Recorder
from services.monitor.heartbeats import HeartbeatStore
from services.monitor.projection import NodesProjection
from services.monitor.registration import check_registration
from services.monitor.settings import MonitorSettings

log = structlog.get_logger("monitor")

MONITOR_SETTINGS = web.AppKey("monitor_settings", MonitorSettings)
HEARTBEAT_STORE = web.AppKey("heartbeat_store", HeartbeatStore)

NODE_RECORDER = ConsumerSpec(durable="monitor-nodes", stream=NODES.name, subjects=("node.>",))


async def validate(event: Event) -> Sequence[Event]:
    if isinstance(event, NodeRegistered):
        check_registration(event)
    return (event,)


async def _monitor_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[MONITOR_SETTINGS]
    bus = app[BUS]
    store = HeartbeatStore(app[REDIS], ttl_seconds=s.heartbeat_ttl_seconds)
    app[HEARTBEAT_STORE] = store

    async def acknowledge(events: list[Event]) -> None:
        # After the commit: an agent told "registered" is in the log, whatever happens next.
        for e in events:
            if isinstance(e, NodeRegistered):
                ack = RegistrationAck(node_id=e.node_id, event_id=e.id)
                await bus.nc.publish(node_ack_subject(e.node_id), msgspec.json.encode(ack))

    # A queue group: each heartbeat is handled by one monitor replica.
    heartbeats = await bus.subscribe_observations(HEARTBEATS.subjects[0], "monitor",
                                                  store.on_heartbeat)
    recorder = Recorder(app[EVENTLOG], bus, NODE_RECORDER, transform=validate,
                        on_committed=acknowledge, registry=app[REGISTRY])
    runner = ProjectionRunner(app[EVENTLOG], NodesProjection(), waker=app[WAKER])
    tasks = [asyncio.create_task(recorder.run(), name="node-recorder"),
             asyncio.create_task(runner.run(), name="nodes-projection")]
    yield
    with contextlib.suppress(Exception):
        await heartbeats.unsubscribe()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def create_monitor_app(settings: MonitorSettings) -> web.Application:
    app = create_app(settings)
    app[MONITOR_SETTINGS] = settings
    app.cleanup_ctx.append(_monitor_ctx)
    return app
