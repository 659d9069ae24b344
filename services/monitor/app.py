"""The monitor service: `python -m services.monitor` (or `crosslogic serve monitor`)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Collection, Sequence

import msgspec
import structlog
from aiohttp import web

from schemas.commands import RegistrationAck
from schemas.events import Event, NodeRegistered
from schemas.subjects import HEARTBEATS, NODES, node_ack_subject
from services.domain.fleet import Fleet, NodesProjection
from services.infra.aio import stop_tasks
from services.infra.bus import Bus
from services.infra.consumer import ConsumerSpec
from services.infra.http import BUS, EVENTLOG, REDIS, REGISTRY, WAKER, create_app
from services.infra.leadership import Leadership
from services.infra.natsauth.identities import MONITOR_HEARTBEATS_DLQ
from services.infra.projections import ProjectionRunner
from services.infra.recorder import Recorder
from services.monitor.intake import NodeIntake
from services.monitor.settings import MonitorSettings
from services.monitor.watcher import NodeWatcher, WatchSettings, status_of

log = structlog.get_logger("monitor")

MONITOR_SETTINGS = web.AppKey("monitor_settings", MonitorSettings)
WATCHER = web.AppKey("node_watcher", NodeWatcher)
LEADERSHIP = web.AppKey("monitor_leadership", Leadership)

NODE_RECORDER = ConsumerSpec(durable="monitor-nodes", stream=NODES.name, subjects=("node.>",))


def to_remember(events: Sequence[Event], fresh: Collection[uuid.UUID],
                written_here: Collection[uuid.UUID]) -> list[Event]:
    """The events whose status the cache takes: those just recorded, and those the control
    plane's own writers appended (relayed from the log: the orchestrator's, another monitor's).
    Not a second copy of what an agent said (a redelivery, a registration published again when
    its ack was lost): the node may have moved on since, and the copy would move it back. Pure."""
    return [e for e in events if status_of(e) is not None
            and (e.id in fresh or e.id in written_here)]


def refusal(event: NodeRegistered, reason: str) -> RegistrationAck:
    """The answer to a registration the monitor will never record: the agent stops asking."""
    return RegistrationAck(node_id=event.node_id, event_id=event.id, accepted=False,
                           reason=reason)


def intake(bus: Bus, app: web.Application) -> NodeIntake:
    async def tell_refused(event: NodeRegistered, reason: str) -> None:
        await bus.nc.publish(node_ack_subject(event.node_id),
                             msgspec.json.encode(refusal(event, reason)))

    return NodeIntake(tell_refused, registry=app[REGISTRY])


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

    async def committed(events: list[Event], fresh: frozenset[uuid.UUID]) -> None:
        # After the commit: an agent told "registered" is in the log, whatever happens next.
        # Every copy is acked again: it is there because the agent did not hear the last ack.
        for e in events:
            if isinstance(e, NodeRegistered):
                ack = RegistrationAck(node_id=e.node_id, event_id=e.id)
                await bus.nc.publish(node_ack_subject(e.node_id), msgspec.json.encode(ack))
        known = [e.id for e in events if e.id not in fresh and status_of(e) is not None]
        written_here: set[uuid.UUID] = set()
        if known:
            written_here = {r["event_id"] for r in await app[EVENTLOG].pool.fetch(
                "SELECT event_id FROM events WHERE event_id = ANY($1::uuid[]) "
                "AND origin = 'log'", known)}
        await watcher.on_node_events(to_remember(events, fresh, written_here))

    # A queue group: each heartbeat is handled by one monitor replica.
    heartbeats = await bus.subscribe_observations(HEARTBEATS.subjects[0], "monitor",
                                                  watcher.on_heartbeat,
                                                  dead_letters=MONITOR_HEARTBEATS_DLQ)
    recorder = Recorder(app[EVENTLOG], bus, NODE_RECORDER, batch_transform=intake(bus, app),
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
    await stop_tasks(tasks)


def create_monitor_app(settings: MonitorSettings) -> web.Application:
    app = create_app(settings)
    app[MONITOR_SETTINGS] = settings
    app.cleanup_ctx.append(_monitor_ctx)
    return app
