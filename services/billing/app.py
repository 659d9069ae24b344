"""The billing service: `python -m services.billing` (or `crosslogic serve billing`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from schemas.subjects import USAGE
from services.billing.prices import PriceBook
from services.billing.pricing import parse_multipliers
from services.billing.projection import UsageRecordsProjection
from services.billing.settings import BillingSettings
from services.core.bus import ConsumerSpec
from services.core.http import BUS, DB, EVENTLOG, REGISTRY, WAKER, Needs, create_app
from services.core.projections import ProjectionRunner
from services.core.recorder import Recorder

BILLING_SETTINGS = web.AppKey("billing_settings", BillingSettings)

USAGE_RECORDER = ConsumerSpec(durable="billing-usage", stream=USAGE.name,
                              subjects=("usage.recorded.*",), batch=512)


async def _billing_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[BILLING_SETTINGS]
    prices = PriceBook(app[DB], parse_multipliers(s.region_multipliers),
                       refresh_seconds=s.model_refresh_seconds)
    await prices.refresh()
    recorder = Recorder(app[EVENTLOG], app[BUS], USAGE_RECORDER, transform=prices.transform,
                        registry=app[REGISTRY])
    runner = ProjectionRunner(app[EVENTLOG], UsageRecordsProjection(), batch_size=2000,
                              waker=app[WAKER])
    tasks = [asyncio.create_task(recorder.run(), name="usage-recorder"),
             asyncio.create_task(runner.run(), name="usage-records")]
    yield
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def create_billing_app(settings: BillingSettings) -> web.Application:
    parse_multipliers(settings.region_multipliers)  # a bad setting fails at start, not later
    app = create_app(settings, needs=Needs(postgres=True, redis=False, nats=True))
    app[BILLING_SETTINGS] = settings
    app.cleanup_ctx.append(_billing_ctx)
    return app
