"""The notifier service: `python -m services.notifier` (or `crosslogic serve notifier`).

Events from the NODES and CONTROL streams (and Alertmanager's webhooks) are queued for the
subscriptions that want them and delivered to Discord, Slack, e-mail and generic webhooks,
in event order per endpoint, retried on a schedule, politely paced. See docs/notifier.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from services.domain.notifications import NotificationSubscriptionsProjection
from services.domain.notifications.targets import Kind
from services.infra.aio import stop_tasks
from services.infra.errors import ApiError, error_response
from services.infra.http import (
    BUS,
    DB,
    EVENTLOG,
    PROJECTION_METRICS,
    REGISTRY,
    WAKER,
    Needs,
    create_app,
)
from services.infra.projections import ProjectionRunner
from services.notifier import alertmanager, store
from services.notifier.intake import Intake
from services.notifier.policy import Rules, Schedule
from services.notifier.scheduler import DATABASE_DOWN, NotifierMetrics, Scheduler
from services.notifier.senders import Sender, make_session
from services.notifier.settings import NotifierSettings, check_settings, parse_schedule

NOTIFIER_SETTINGS = web.AppKey("notifier_settings", NotifierSettings)
MAX_BODY_BYTES = 4 * 1024 * 1024
"""Alertmanager payloads: up to a thousand alerts with their labels and annotations."""


@dataclass(frozen=True)
class Notifier:
    scheduler: Scheduler
    schedule: Schedule
    session: aiohttp.ClientSession


NOTIFIER = web.AppKey("notifier", Notifier)


def rules_of(settings: NotifierSettings) -> dict[Kind, Rules]:
    schedule = Schedule(parse_schedule(settings.retry_schedule))
    intervals = {Kind.DISCORD: settings.min_interval_discord,
                 Kind.SLACK: settings.min_interval_slack,
                 Kind.EMAIL: settings.min_interval_email,
                 Kind.GENERIC: settings.min_interval_generic}
    return {kind: Rules(schedule, interval, settings.disable_after_seconds,
                        settings.max_retry_after_seconds)
            for kind, interval in intervals.items()}


async def _notifier_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[NOTIFIER_SETTINGS]
    rules = rules_of(s)
    schedule = rules[Kind.GENERIC].schedule
    session = make_session(s)
    metrics = NotifierMetrics(app[REGISTRY])
    scheduler = Scheduler(app[DB], app[EVENTLOG], Sender(s, session), rules.__getitem__,
                          metrics, concurrency=s.concurrency, lease_seconds=s.lease_seconds,
                          poll_interval=s.poll_interval)
    intake = Intake(app[BUS], app[DB], first_delay=schedule.first, batch=s.intake_batch,
                    on_queued=scheduler.wake, metrics=metrics)
    await intake.start()
    # Commands apply subscriptions inline; the runner keeps the table right should anything
    # append their events without doing so, and is how a rebuild catches up.
    runner = ProjectionRunner(app[EVENTLOG], NotificationSubscriptionsProjection(),
                              waker=app[WAKER], metrics=app[PROJECTION_METRICS])
    app[NOTIFIER] = Notifier(scheduler, schedule, session)
    followers = [asyncio.create_task(intake.run(), name="notifier-intake"),
                 asyncio.create_task(runner.run(), name="notifier-subscriptions")]
    sending = asyncio.create_task(scheduler.run(), name="notifier-scheduler")
    yield
    await stop_tasks(followers)
    await scheduler.stop(grace=max(s.http_timeout_seconds, s.smtp_timeout_seconds) + 1)
    sending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sending
    await session.close()


async def receive_alerts(request: web.Request) -> web.Response:
    s = request.app[NOTIFIER_SETTINGS]
    expected = s.alertmanager_token.reveal()
    if expected:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                   f"Bearer {expected}".encode()):
            return error_response(ApiError.authentication(
                "Missing or wrong Authorization: Bearer token for /alertmanager.",
                code="invalid_alertmanager_token"))
    try:
        payload = alertmanager.parse(await request.read())
    except ValueError as exc:
        return error_response(ApiError.invalid_request(str(exc)))
    except web.HTTPRequestEntityTooLarge:
        return error_response(ApiError.request_too_large(MAX_BODY_BYTES))
    notifier = request.app[NOTIFIER]
    event = alertmanager.to_event(payload)
    try:
        queued = await store.record_alert(request.app[DB], event, notifier.schedule.first)
    except DATABASE_DOWN:
        # Alertmanager retries a notification that was not accepted.
        return error_response(ApiError.unavailable("The event log is unavailable; retry.",
                                                   code="database_unavailable"))
    if queued:
        notifier.scheduler.wake()
    return web.json_response({"status": "accepted", "event_id": str(event.id),
                              "alerts": len(event.alerts), "deliveries": queued})


def create_notifier_app(settings: NotifierSettings) -> web.Application:
    """ValueError when the settings cannot work: refuse to start."""
    check_settings(settings)
    app = create_app(settings, needs=Needs(postgres=True, redis=False, nats=True),
                     client_max_size=MAX_BODY_BYTES)
    app[NOTIFIER_SETTINGS] = settings
    app.cleanup_ctx.append(_notifier_ctx)
    app.router.add_post("/alertmanager", receive_alerts)
    return app
