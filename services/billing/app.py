"""The billing service: `python -m services.billing` (or `crosslogic serve billing`).

- the usage recorder: `usage.recorded` from JetStream, checked and priced from the catalog
  (intake.py), into the log once;
- projections `usage_records` (+ `usage_hourly`) and `billing_events`;
- the Stripe pusher (one leader across replicas) when `STRIPE_SECRET_KEY` is set; its leader
  also settles held exports on the admin API's command (settle.py);
- POST /webhooks/stripe when `STRIPE_WEBHOOK_SECRET` is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from schemas.subjects import USAGE
from services.billing.budget_watch import BudgetWatch
from services.billing.intake import UsageIntake
from services.billing.prices import PriceBook
from services.billing.pusher import Clock, Pusher, PusherMetrics, utcnow
from services.billing.settings import BillingSettings, check_settings
from services.billing.settle import SettleDesk
from services.billing.webhooks import WEBHOOKS, WebhookHandler, stripe_webhook
from services.domain.billing_ledger import BillingProjection
from services.domain.pricing import parse_multipliers
from services.domain.stripe_billing import StripeBilling
from services.domain.usage_records import UsageMetrics, UsageRecordsProjection
from services.infra.aio import stop_task, stop_tasks
from services.infra.consumer import ConsumerSpec
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
from services.infra.recorder import Recorder

log = structlog.get_logger("billing")

BILLING_SETTINGS = web.AppKey("billing_settings", BillingSettings)
STRIPE = web.AppKey("stripe", StripeBilling)
PUSHER = web.AppKey("billing_pusher", Pusher)
SETTLE_DESK = web.AppKey("billing_settle_desk", SettleDesk)

USAGE_RECORDER = ConsumerSpec(durable="billing-usage", stream=USAGE.name,
                              subjects=("usage.recorded.*",), batch=512)


async def _fetch(app: web.Application, recorder: Recorder) -> None:
    consumer = await app[BUS].consumer(recorder.spec, recorder.handle)
    await consumer.run()


async def _billing_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[BILLING_SETTINGS]
    prices = PriceBook(app[DB], parse_multipliers(s.region_multipliers),
                       refresh_seconds=s.model_refresh_seconds)
    await prices.refresh()
    registry = app[REGISTRY]
    intake = UsageIntake(prices, max_tokens=s.billing_max_tokens_per_record, registry=registry)
    recorder = Recorder(app[EVENTLOG], app[BUS], USAGE_RECORDER, batch_transform=intake,
                        registry=registry)
    usage = ProjectionRunner(app[EVENTLOG], UsageRecordsProjection(UsageMetrics(registry)),
                             batch_size=2000, waker=app[WAKER],
                             metrics=app[PROJECTION_METRICS])
    ledger = ProjectionRunner(app[EVENTLOG], BillingProjection(), batch_size=500,
                              waker=app[WAKER], metrics=app[PROJECTION_METRICS])
    # Several fetchers on one durable consumer: while one batch is written to PostgreSQL the
    # next is fetched and priced (JetStream hands each message to one of them).
    tasks = [*(asyncio.create_task(_fetch(app, recorder), name=f"usage-recorder-{i}")
               for i in range(s.usage_recorder_workers)),
             asyncio.create_task(usage.run(), name="usage-records"),
             asyncio.create_task(ledger.run(), name="billing-events"),
             asyncio.create_task(BudgetWatch(app[DB], interval=s.budget_watch_seconds).run(),
                                 name="budget-watch")]
    yield
    await stop_tasks(tasks)


def _stripe_ctx(clock: Clock) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async for _ in _stripe(app, clock):
            yield

    return ctx


async def _stripe(app: web.Application, clock: Clock) -> AsyncIterator[None]:
    s = app[BILLING_SETTINGS]
    stripe_billing: StripeBilling | None = None
    task: asyncio.Task[None] | None = None
    if s.stripe.enabled:
        stripe_billing = StripeBilling(s.stripe)
        app[STRIPE] = stripe_billing
        metrics = PusherMetrics(app[REGISTRY])
        desk = SettleDesk(app[DB], stripe_billing, app[BUS].nc, metrics)
        pusher = Pusher(s, app[DB], stripe_billing, clock=clock, metrics=metrics,
                        while_leading=desk.serving)
        desk.settled = pusher.wake
        app[PUSHER], app[SETTLE_DESK] = pusher, desk
        task = asyncio.create_task(pusher.run(), name="stripe-pusher")
        log.info("pushing usage to Stripe", api_base=s.stripe_api_base or "api.stripe.com",
                 meters=s.meter_events, cost_unit=f"{s.cost_unit:f}",
                 hour_grace_seconds=s.billing_hour_grace)
    else:
        log.warning("STRIPE_SECRET_KEY is not set: usage is recorded but not pushed to Stripe")
    if not s.stripe_webhook_secret:
        log.warning("STRIPE_WEBHOOK_SECRET is not set: POST /webhooks/stripe answers 503")
    app[WEBHOOKS] = WebhookHandler(s, app[DB], app[EVENTLOG], stripe_billing,
                                   registry=app[REGISTRY])
    yield
    if task is not None:
        # Not cancel() then gather(): as it becomes leader the pusher waits for NATS to hear
        # its settle subscription (nats-py's flush, a wait_for), which can swallow a cancel.
        await stop_task(task)
    if stripe_billing is not None:
        await stripe_billing.close()


def create_billing_app(settings: BillingSettings, *, clock: Clock = utcnow) -> web.Application:
    """`clock` moves the pusher's idea of now (tests close the current hour with it)."""
    check_settings(settings)
    parse_multipliers(settings.region_multipliers)  # a bad setting fails at start, not later
    app = create_app(settings, needs=Needs(postgres=True, redis=False, nats=True))
    app[BILLING_SETTINGS] = settings
    app.cleanup_ctx.append(_billing_ctx)
    app.cleanup_ctx.append(_stripe_ctx(clock))
    app.router.add_post("/webhooks/stripe", stripe_webhook)
    return app
