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
from services.core.fleet import Fleet, NodesProjection
from services.core.http import BUS, EVENTLOG, REDIS, REGISTRY, WAKER, create_app
from services.core.leadership import Leadership
from services.core.projections import ProjectionRunner
from services.core.recorder import Recorder
from services.monitor.registration import check_registration
from services.monitor.settings import MonitorSettings
from services.monitor.watcher import NodeWatcher, WatchSettings

log = structlog.get_logger("monitor")

MONITOR_SETTINGS = web.AppKey("monitor_settings", MonitorSettings)
WATCHER = web.AppKey("node_watcher", NodeWatcher)
LEADERSHIP = web.AppKey("monitor_leadership", Leadership)

NODE_RECORDER = ConsumerSpec(durable="monitor-nodes", stream=NODES.name, subjects=("node.>",))


async def validate(event: Event) -> Sequence[Event]:
    if isinstance(event, NodeRegistered):
        check_registration(event)
    return (event,)


async def _monitor_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[MONITOR_SETTINGS]
    bus = app[BUS]
    watcher = NodeWatcher(Fleet(app[EVENTLOG], actor="monitor"), app[REDIS], WatchSettings(
        health_threshold=s.health_score_threshold, stale_after=s.stale_after_seconds,
        sweep_every=s.sweep_every_seconds, heartbeat_ttl=s.heartbeat_ttl_seconds,
        probe_every=s.probe_every_seconds, probe_timeout=s.probe_timeout_seconds,
        probe_failures=s.probe_failures, gauges_every=s.gauges_every_seconds,
        blind_after=s.blind_after_seconds),
        registry=app[REGISTRY], connected=lambda: bus.connected)
    app[WATCHER] = watcher

    async def committed(events: list[Event]) -> None:
        # After the commit: an agent told "registered" is in the log, whatever happens next.
        for e in events:
            if isinstance(e, NodeRegistered):
                ack = RegistrationAck(node_id=e.node_id, event_id=e.id)
                await bus.nc.publish(node_ack_subject(e.node_id), msgspec.json.encode(ack))
        await watcher.on_node_events(events)

    # A queue group: each heartbeat is handled by one monitor replica.
    heartbeats = await bus.subscribe_observations(HEARTBEATS.subjects[0], "monitor",
                                                  watcher.on_heartbeat)
    recorder = Recorder(app[EVENTLOG], bus, NODE_RECORDER, transform=validate,
                        on_committed=committed, registry=app[REGISTRY])
    runner = ProjectionRunner(app[EVENTLOG], NodesProjection(), waker=app[WAKER])
    leadership = Leadership(s.database_url.reveal(), "monitor-sweeper",
                            retry=s.leader_retry_seconds)
    app[LEADERSHIP] = leadership
    tasks = [asyncio.create_task(watcher.handle_heartbeats(), name="heartbeats"),
             asyncio.create_task(recorder.run(), name="node-recorder"),
             asyncio.create_task(runner.run(), name="nodes-projection"),
             asyncio.create_task(leadership.run(watcher.lead), name="monitor-leader")]
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
