"""Billing → Stripe Meter Events, exactly once: the real `stripe` library against the local
Stripe-compatible server (tests/doubles/stripe_server.py), real PostgreSQL and NATS.

Usage is published to NATS as the gateway publishes it (`usage.recorded`), with `occurred_at`
in past hours so they are closed; the billing service records it, aggregates it per hour and
pushes each closed hour per tenant and meter once, whatever fails on the way."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import nats.js.errors
import pytest
from aiohttp import web

from schemas.events import UsageRecorded, encode_event
from services.billing.app import PUSHER, create_billing_app
from services.billing.hours import floor_hour, identifier
from services.billing.pusher import Pusher
from services.billing.settings import BillingSettings
from services.domain.catalog import Catalog
from services.domain.stripe_billing import StripeBilling, StripeConfig, link_tenant
from services.domain.usage_records import UsageRecordsProjection
from services.infra.bus import Bus
from services.infra.devstack import free_port
from services.infra.eventlog import EventLog
from services.infra.natsauth.identities import Role
from services.infra.projections import ProjectionRunner
from services.infra.settings import Secret
from tests.conftest import Servers
from tests.doubles.stripe_server import StripeServer, running_stripe
from tests.helpers import eventually, usage_owner

MODEL = "llama-8b"
IN, OUT = "crosslogic_input_tokens", "crosslogic_output_tokens"
WEBHOOK_SECRET = "whsec_test_0123456789abcdef"


@dataclass
class BillingRig:
    servers: Servers
    pool: asyncpg.Pool
    bus: Bus
    stripe: StripeServer
    catalog: Catalog
    runners: list[web.AppRunner] = field(default_factory=list)
    apps: list[web.Application] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """Settings every billing of the rig gets (region multipliers, say)."""

    def settings(self, **overrides: Any) -> BillingSettings:
        base: dict[str, Any] = dict(
            database_url=Secret(self.servers.database_url),
            nats_url=Secret(self.servers.nats_url), event_poll_interval=0.2, log_json=False,
            nats_creds=Secret(self.servers.creds(Role.BILLING)),
            stripe_secret_key=Secret(self.stripe.api_key), stripe_api_base=self.stripe.url,
            stripe_timeout=1.0, stripe_webhook_secret=Secret(WEBHOOK_SECRET),
            billing_hour_grace=0, billing_push_interval=0.2, billing_retry_initial=0.01,
            billing_retry_max=0.05, billing_leader_retry=0.2, db_min_connections=1,
            # Hours keep their start as timestamp, whatever the minute the test runs at; the
            # window's own test sets it.
            billing_backdate_window=3 * 86400)
        base.update(self.extra)
        base.update(overrides)
        return BillingSettings(**base)

    async def start(self, clock: Callable[[], datetime] | None = None,
                    **overrides: Any) -> web.Application:
        app = create_billing_app(self.settings(**overrides),
                                 **({"clock": clock} if clock else {}))
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self.urls.append(f"http://127.0.0.1:{port}")
        self.runners.append(runner)
        self.apps.append(app)
        return app

    async def tenant(self, name: str, *, linked: bool = True) -> uuid.UUID:
        tenant_id = await self.catalog.create_tenant(name, f"{name}@example.test")
        # The environment and key `usage()` bills to: billing refuses ids it does not know.
        await usage_owner(self.pool, tenant_id, environment_id=uuid.UUID(int=tenant_id.int ^ 1),
                          api_key_id=uuid.UUID(int=tenant_id.int ^ 2))
        if linked:
            await self.link(tenant_id)
        return tenant_id

    async def link(self, tenant_id: uuid.UUID, *, prices: tuple[str, ...] = (
            "price_in", "price_out"), cost_price: str | None = None) -> str:
        """Link to the token prices, or to the cost price (`cost_price`)."""
        async with self.stripe_client() as client:
            result = await link_tenant(self.pool, client, tenant_id, prices=prices,
                                       cost_price=cost_price)
        assert result.account.customer_id
        return result.account.customer_id

    @contextlib.asynccontextmanager
    async def stripe_client(self) -> AsyncIterator[StripeBilling]:
        client = StripeBilling(StripeConfig(Secret(self.stripe.api_key), self.stripe.url, 2.0))
        try:
            yield client
        finally:
            await client.close()

    async def publish(self, events: list[UsageRecorded]) -> None:
        for i in range(0, len(events), 200):
            await asyncio.gather(*(self.bus.publish(e) for e in events[i:i + 200]))

    async def record(self, events: list[UsageRecorded], *, total: int | None = None) -> None:
        """Usage into usage_records by a billing that does not push (so that a test can set
        the stage before the pusher sees any of it); `total`: wait for that many records
        (usage published by someone else, the gateway)."""
        app = create_billing_app(self.settings(stripe_secret_key=Secret("")))
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        try:
            before = int(await self.pool.fetchval("SELECT count(*) FROM usage_records"))
            await self.publish(events)
            await self.records(before + len(events) if total is None else total)
        finally:
            await runner.cleanup()

    async def records(self, n: int, timeout: float = 15.0) -> None:
        async def enough() -> bool:
            return int(await self.pool.fetchval("SELECT count(*) FROM usage_records")) >= n

        await eventually(enough, timeout=timeout, what=f"{n} usage records")

    async def all_exported(self, timeout: float = 15.0, until: datetime | None = None) -> None:
        """Every closed hour (before `until`, default: this hour) of linked tenants exported
        and nothing left planned: the pusher caught up."""
        until = floor_hour(until or datetime.now(UTC))

        async def done() -> bool:
            for app in self.apps:
                if PUSHER in app and app[PUSHER].is_leader:
                    pusher: Pusher = app[PUSHER]
                    pusher.wake()
            planned = await self.pool.fetchval(
                "SELECT count(*) FROM meter_exports WHERE status = 'planned'")
            # Each tenant hour on the meters of its pricing: tokens before the tenant's
            # cost_from, whole cost units (the settings' unit) from it on.
            missing = await self.pool.fetchval(
                """WITH u AS (
                       SELECT h.tenant_id, h.hour, sum(h.prompt_tokens) AS p,
                              sum(h.completion_tokens) AS c, sum(h.cost) AS cost,
                              coalesce(h.hour >= a.cost_from, false) AS by_cost
                       FROM usage_hourly h JOIN billing_accounts a USING (tenant_id)
                       WHERE h.hour < $1
                       GROUP BY 1, 2, a.cost_from
                   ), sent AS (
                       SELECT tenant_id, hour, meter, sum(value) AS value FROM meter_exports
                       WHERE status = 'exported' GROUP BY 1, 2, 3
                   )
                   SELECT count(*) FROM u
                   LEFT JOIN sent i ON (i.tenant_id, i.hour, i.meter)
                                       = (u.tenant_id, u.hour, 'input_tokens')
                   LEFT JOIN sent o ON (o.tenant_id, o.hour, o.meter)
                                       = (u.tenant_id, u.hour, 'output_tokens')
                   LEFT JOIN sent c ON (c.tenant_id, c.hour, c.meter)
                                       = (u.tenant_id, u.hour, 'cost')
                   WHERE CASE WHEN u.by_cost
                              THEN round(u.cost / $2) > coalesce(c.value, 0)
                              ELSE u.p > coalesce(i.value, 0) OR u.c > coalesce(o.value, 0)
                         END""", until, self.settings().cost_unit)
            return planned == 0 and missing == 0

        await eventually(done, timeout=timeout, interval=0.05, what="every closed hour exported")

    async def stop(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()
        self.runners.clear()
        self.apps.clear()
        self.urls.clear()


@pytest.fixture
async def rig(servers: Servers, pool: asyncpg.Pool, bus: Bus) -> AsyncIterator[BillingRig]:
    catalog = Catalog(EventLog(pool), actor="test")
    await catalog.create_model(MODEL, family="llama", vram_gb=16,
                               input_price_per_million=Decimal("0.15"),
                               output_price_per_million=Decimal("0.60"), context_length=8192)
    async with running_stripe() as stripe_server:
        r = BillingRig(servers, pool, bus, stripe_server, catalog)
        try:
            yield r
        finally:
            await r.stop()


def usage(tenant: uuid.UUID, when: datetime, prompt: int, completion: int, *,
          request_id: str | None = None) -> UsageRecorded:
    return UsageRecorded(request_id=request_id or f"req-{uuid.uuid4()}", tenant_id=tenant,
                         environment_id=uuid.UUID(int=tenant.int ^ 1),
                         api_key_id=uuid.UUID(int=tenant.int ^ 2),
                         model=MODEL, endpoint="chat", region="us-east-1", node_id=None,
                         prompt_tokens=prompt, completion_tokens=completion, latency_ms=10.0,
                         occurred_at=when)


def hours_ago(n: int, minute: int = 17) -> datetime:
    return floor_hour(datetime.now(UTC)) - timedelta(hours=n) + timedelta(minutes=minute)


async def sums(pool: asyncpg.Pool, tenant: uuid.UUID, hour: datetime) -> tuple[int, int]:
    row = await pool.fetchrow(
        """SELECT coalesce(sum(prompt_tokens), 0) AS p,
                  coalesce(sum(completion_tokens), 0) AS c
           FROM usage_records
           WHERE tenant_id = $1 AND date_trunc('hour', occurred_at, 'UTC') = $2""",
        tenant, floor_hour(hour))
    return int(row["p"]), int(row["c"])


def accepted_identifiers(stripe_server: StripeServer) -> list[str]:
    return [c.identifier for c in stripe_server.state.outcomes("accepted")]


# --------------------------------------------------------------------------- tests


async def test_closed_hours_are_pushed_once_late_usage_is_corrected(rig: BillingRig) -> None:
    acme = await rig.tenant("acme")
    beta = await rig.tenant("beta")
    loner = await rig.tenant("loner", linked=False)
    events = [usage(acme, hours_ago(2), 100, 10), usage(acme, hours_ago(2, 40), 50, 5),
              usage(acme, hours_ago(1), 7, 3), usage(beta, hours_ago(1), 1000, 2000),
              usage(loner, hours_ago(1), 9, 9),
              usage(acme, datetime.now(UTC), 999, 999)]  # the current hour: not closed yet
    await rig.record(events)
    await rig.start()
    await rig.all_exported()

    state = rig.stripe.state
    expected = {identifier(t, m, hours_ago(h)) for t, h in ((acme, 2), (acme, 1), (beta, 1))
                for m in ("input_tokens", "output_tokens")}
    assert set(state.meter_events) == expected
    assert sorted(accepted_identifiers(rig.stripe)) == sorted(expected)  # each sent once
    acme_customer = state.meter_events[identifier(acme, "input_tokens", hours_ago(2))][
        "payload"]["stripe_customer_id"]
    assert state.total(IN, acme_customer) == 157
    assert state.total(OUT, acme_customer) == 18
    event = state.meter_events[identifier(beta, "output_tokens", hours_ago(1))]
    assert event["payload"]["value"] == "2000"
    assert event["timestamp"] == int(floor_hour(hours_ago(1)).timestamp())
    assert event["event_name"] == OUT

    # The tenant without a Stripe customer: nothing sent, reported once per meter and hour.
    skipped = await rig.pool.fetch(
        "SELECT identifier, value FROM meter_exports WHERE tenant_id = $1 AND status = "
        "'skipped' ORDER BY identifier", loner)
    assert [r["value"] for r in skipped] == [9, 9]
    assert await rig.pool.fetchval(
        "SELECT count(*) FROM events WHERE type = 'billing.export_skipped'") == 2

    # Late usage for an hour already pushed: a correction for the difference, a new identifier.
    await rig.publish([usage(acme, hours_ago(2, 59), 11, 1)])
    await rig.records(len(events) + 1)
    await rig.all_exported()
    correction = state.meter_events[identifier(acme, "input_tokens", hours_ago(2), 1)]
    assert correction["payload"]["value"] == "11"
    closed = [await sums(rig.pool, acme, h) for h in (hours_ago(2), hours_ago(1))]
    assert state.total(IN, acme_customer) == 168 == sum(p for p, _ in closed)
    assert state.total(OUT, acme_customer) == 19 == sum(c for _, c in closed)

    # Linked later: the skipped hours go out under the identifiers the skips reported.
    await rig.link(loner)
    await rig.all_exported()
    assert {r["identifier"] for r in skipped} <= set(state.meter_events)
    assert await rig.pool.fetchval(
        "SELECT count(*) FROM meter_exports WHERE status <> 'exported'") == 0
    assert len(accepted_identifiers(rig.stripe)) == len(set(accepted_identifiers(rig.stripe)))
    assert state.concurrency_refusals == 0
    # Every meter event in the feed goes by the identifier Stripe holds it under.
    exported = await rig.pool.fetch("SELECT stripe_id FROM billing_events "
                                    "WHERE type = 'billing.usage_exported'")
    assert exported and {r["stripe_id"] for r in exported} <= set(state.meter_events)


async def test_hours_pushed_late_are_stamped_with_the_time_of_sending(rig: BillingRig) -> None:
    """Past the backdate window an hour's period may be invoiced already (Stripe finalizes an
    hour after a period ends): such usage is stamped when it is sent, so it is billed."""
    acme = await rig.tenant("acme")
    await rig.record([usage(acme, hours_ago(1), 10, 1), usage(acme, hours_ago(3), 20, 2)])
    started = int(datetime.now(UTC).timestamp())
    await rig.start(billing_backdate_window=7200)
    await rig.all_exported()
    events = rig.stripe.state.meter_events
    recent = events[identifier(acme, "input_tokens", hours_ago(1))]  # ended < 1 h ago
    assert recent["timestamp"] == int(floor_hour(hours_ago(1)).timestamp())
    late = events[identifier(acme, "input_tokens", hours_ago(3))]  # ended >= 2 h ago
    assert started <= late["timestamp"] <= int(datetime.now(UTC).timestamp())
    # A correction for the recent hour after its window: stamped now as well.
    await rig.stop()
    await rig.record([usage(acme, hours_ago(1, 50), 5, 0)])
    await rig.start(billing_backdate_window=0)
    await rig.all_exported()
    correction = events[identifier(acme, "input_tokens", hours_ago(1), 1)]
    assert correction["payload"]["value"] == "5"
    assert correction["timestamp"] >= started


async def test_stripe_failures_are_retried_and_never_double_count(rig: BillingRig) -> None:
    tenants = [await rig.tenant(f"t{i}") for i in range(3)]
    events = [usage(t, hours_ago(h), 10 * (h + 1), h + 1) for t in tenants for h in (1, 2, 3)]
    await rig.record(events)
    path = "/v1/billing/meter_events"
    state = rig.stripe.state
    state.fail(path, "status", status=429, times=2)
    state.fail(path, "status", status=500)
    state.fail(path, "status", status=503)
    state.fail(path, "slow", delay=1.5)           # accepted, but the answer comes too late
    state.fail(path, "drop_after_accept", times=2)  # accepted, and the answer is lost
    await rig.start()
    await rig.all_exported(timeout=20)

    assert not state.faults  # every failure was met
    assert len(state.outcomes("failed")) == 4
    accepted = accepted_identifiers(rig.stripe)
    assert len(accepted) == len(set(accepted)) == 18  # 3 tenants x 3 hours x 2 meters
    assert len(state.outcomes("duplicate")) == 3  # the resends after slow / dropped answers
    for t in tenants:
        for h in (1, 2, 3):
            p, c = await sums(rig.pool, t, hours_ago(h))
            assert state.meter_events[identifier(t, "input_tokens", hours_ago(h))][
                "payload"]["value"] == str(p)
            assert state.meter_events[identifier(t, "output_tokens", hours_ago(h))][
                "payload"]["value"] == str(c)
    duplicates = await rig.pool.fetchval(
        "SELECT count(*) FROM meter_exports WHERE duplicate AND status = 'exported'")
    assert duplicates == 3
    metrics = rig.apps[0][PUSHER].metrics
    assert metrics.exports.labels("retry")._value.get() >= 7


METER_EVENTS = "/v1/billing/meter_events"


async def exports_where(rig: BillingRig, condition: str) -> int:
    return int(await rig.pool.fetchval(f"SELECT count(*) FROM meter_exports WHERE {condition}"))


async def test_a_plan_that_may_have_reached_stripe_is_held_past_the_horizon(
        rig: BillingRig) -> None:
    """Stripe answers 500 (it may have counted the event, or not) for longer than the horizon:
    past it, Stripe may have forgotten the identifier, so a resend could count twice. The plan
    is held for an operator, and stays so once Stripe answers again."""
    acme = await rig.tenant("acme")
    await rig.record([usage(acme, hours_ago(2), 10, 3)])
    state = rig.stripe.state
    state.fail(METER_EVENTS, "status", status=500, times=10_000)
    app = await rig.start(billing_resend_horizon=1.0)

    async def held() -> bool:
        return await exports_where(rig, "status = 'held'") == 2

    await eventually(held, timeout=15, what="both meters held")
    assert state.meter_events == {}
    assert {c.outcome for c in state.calls} == {"failed"}
    events = await rig.pool.fetch(
        "SELECT data FROM billing_events WHERE type = 'billing.export_held' "
        "ORDER BY data->>'meter'")
    assert [(e["data"]["meter"], e["data"]["value"]) for e in events] == [
        ("input_tokens", 10), ("output_tokens", 3)]
    assert "500" in events[0]["data"]["reason"]
    assert app[PUSHER].metrics.exports.labels("held")._value.get() == 2

    state.faults.clear()  # Stripe answers again: still nothing resent, nothing re-planned
    calls = len(state.calls)
    await app[PUSHER].push_once()
    await app[PUSHER].push_once()
    assert len(state.calls) == calls
    assert await exports_where(rig, "true") == 2
    assert app[PUSHER].metrics.held._value.get() == 2  # standing until settled


async def test_a_plan_stripe_only_refused_is_still_resent_past_the_horizon(
        rig: BillingRig) -> None:
    """429s are answers given before Stripe did anything: resending stays safe at any age."""
    acme = await rig.tenant("acme")
    await rig.record([usage(acme, hours_ago(2), 10, 3)])
    state = rig.stripe.state
    state.fail(METER_EVENTS, "status", status=429, times=10_000)
    await rig.start(billing_resend_horizon=0.5)

    async def past_the_horizon() -> bool:
        return await exports_where(rig, "status = 'planned' AND error IS NOT NULL AND "
                                        "planned_at < now() - interval '1 second'") == 2

    await eventually(past_the_horizon, timeout=15, what="plans past the horizon")
    state.faults.clear()
    await rig.all_exported()
    assert await exports_where(rig, "status = 'held'") == 0
    assert len(state.meter_events) == 2


async def test_a_plan_left_by_a_stopped_sender_counts_as_possibly_sent(rig: BillingRig) -> None:
    """A sender that stops while Stripe holds its answer leaves the plan without a recorded
    outcome; whoever sends next must count it as possibly sent, even if Stripe then only
    refuses (429), and hold it past the horizon rather than resend it."""
    acme = await rig.tenant("acme")
    await rig.record([usage(acme, hours_ago(2), 10, 3)])
    state = rig.stripe.state
    state.fail(METER_EVENTS, "hang_after_accept")
    await rig.start()

    async def one_hangs() -> bool:
        return len(state.outcomes("accepted")) == 2 and \
            await exports_where(rig, "status = 'exported'") == 1

    await eventually(one_hangs, timeout=15, what="one accepted meter event without an answer")
    await rig.stop()
    [hung] = [r["identifier"] for r in await rig.pool.fetch(
        "SELECT identifier FROM meter_exports WHERE status = 'planned'")]

    state.fail(METER_EVENTS, "status", status=429, times=10_000)
    await rig.start(billing_resend_horizon=1.0)

    async def held() -> bool:
        return await exports_where(rig, f"identifier = '{hung}' AND status = 'held'") == 1

    await eventually(held, timeout=15, what="the left plan held")
    first, *after = [c.outcome for c in state.calls if c.identifier == hung]
    assert first == "accepted"
    assert set(after) <= {"failed"}  # only the 429s: never through to Stripe again
    flagged = await rig.pool.fetch(
        "SELECT data FROM billing_events WHERE type = 'billing.export_failed' "
        "AND data->>'identifier' = $1 AND (data->>'ambiguous')::bool", hung)
    assert len(flagged) == 1 and "earlier sender" in flagged[0]["data"]["error"]


async def test_passes_look_only_at_hours_that_changed(rig: BillingRig) -> None:
    """After its first pass a leader plans from what changed — usage arriving for an hour, an
    hour closing, a skipped tenant being linked — not from 45 days of usage every 30 s; a new
    leader (and every BILLING_FULL_SCAN_INTERVAL) looks at everything again."""
    acme = await rig.tenant("acme")
    loner = await rig.tenant("loner", linked=False)
    events = [usage(acme, hours_ago(h), 10, 1) for h in range(1, 31)]
    events.append(usage(loner, hours_ago(3), 5, 5))
    await rig.record(events)
    app = await rig.start(billing_push_interval=3600)  # passes when the test asks for them
    pusher: Pusher = app[PUSHER]

    async def first_pass_done() -> bool:
        return await exports_where(rig, "status = 'exported'") == 60 and \
            await exports_where(rig, "status = 'skipped'") == 2

    await eventually(first_pass_done, timeout=15, what="the first pass")
    assert pusher.hours_checked is None  # the first pass looked at every hour
    calls = len(rig.stripe.state.calls)
    await pusher.push_once()
    assert (pusher.hours_checked, len(rig.stripe.state.calls)) == (0, calls)

    await rig.publish([usage(acme, hours_ago(5, 40), 7, 0)])  # late usage for one hour
    await rig.records(len(events) + 1)
    await pusher.push_once()
    assert pusher.hours_checked == 1
    state = rig.stripe.state
    assert state.meter_events[identifier(acme, "input_tokens", hours_ago(5), 1)][
        "payload"]["value"] == "7"

    await rig.link(loner)  # its skipped hour is due now
    await pusher.push_once()
    assert pusher.hours_checked == 1
    assert identifier(loner, "input_tokens", hours_ago(3)) in state.meter_events

    # Usage no change marks (as a rebuild of usage_records that recovered lost rows leaves
    # it: more tokens, the same last position) waits for a pass that looks at everything.
    await rig.pool.execute(
        "UPDATE usage_hourly SET prompt_tokens = prompt_tokens + 3 "
        "WHERE tenant_id = $1 AND hour = $2", acme, floor_hour(hours_ago(7)))
    await pusher.push_once()
    assert pusher.hours_checked == 0
    await rig.stop()
    await rig.start()  # a new leader
    await rig.all_exported()
    assert state.meter_events[identifier(acme, "input_tokens", hours_ago(7), 1)][
        "payload"]["value"] == "3"


async def test_two_billing_replicas_push_each_hour_once(rig: BillingRig) -> None:
    tenants = [await rig.tenant(f"r{i}") for i in range(8)]
    events = [usage(t, hours_ago(h, m), 3, 4) for t in tenants for h in (1, 2, 3)
              for m in (5, 35)]
    await rig.record(events)
    first = await rig.start()
    second = await rig.start()
    await rig.all_exported()
    calls = [c.identifier for c in rig.stripe.state.calls]
    assert len(calls) == len(set(calls)) == 8 * 3 * 2  # not even a resend
    assert rig.stripe.state.concurrency_refusals == 0
    leaders = [app[PUSHER].is_leader for app in (first, second)]
    assert sorted(leaders) == [False, True]
    # The leader goes away: the standby takes over and pushes what comes next.
    leader = rig.runners[leaders.index(True)]
    await leader.cleanup()
    rig.runners.remove(leader)
    rig.apps = [a for a in rig.apps if a is not (first, second)[leaders.index(True)]]
    late = [usage(t, hours_ago(1, 50), 1, 1) for t in tenants]
    await rig.publish(late)
    await rig.records(len(events) + len(late))
    await rig.all_exported()
    calls = [c.identifier for c in rig.stripe.state.calls]
    assert len(calls) == len(set(calls)) == 8 * 3 * 2 + 8 * 2


async def test_thousands_of_requests_stripe_equals_usage_records(rig: BillingRig) -> None:
    """The volume run: usage published straight to NATS (as the gateway does), with the
    duplicates a gateway produces: publish retries (deduplicated by NATS on the event id) and
    a spool replayed after NATS's duplicate window (same event ids, so billing must drop them)."""
    rng = random.Random(7)
    tenants = [await rig.tenant(f"v{i}") for i in range(5)]
    events = [usage(rng.choice(tenants), hours_ago(rng.randint(1, 4), rng.randint(0, 59)),
                    rng.randint(1, 4000), rng.randint(1, 1500)) for _ in range(3000)]
    await rig.start()
    await rig.publish(events + events[:100])
    # Past the duplicate window NATS stores a replay again: only billing's key stops it.
    for e in events[:200]:
        await rig.bus.publish_raw(e.subject, encode_event(e), f"{e.id}-replayed")
    await rig.records(len(events), timeout=30)
    await rig.all_exported(timeout=20)

    state = rig.stripe.state
    sent_in = sum(int(e["payload"]["value"]) for e in state.meter_events.values()
                  if e["event_name"] == IN)
    sent_out = sum(int(e["payload"]["value"]) for e in state.meter_events.values()
                   if e["event_name"] == OUT)
    row = await rig.pool.fetchrow(
        "SELECT count(*) AS n, sum(prompt_tokens) AS p, sum(completion_tokens) AS c "
        "FROM usage_records")
    assert row["n"] == len(events)
    assert (sent_in, sent_out) == (row["p"], row["c"]) == (
        sum(e.prompt_tokens for e in events), sum(e.completion_tokens for e in events))
    hourly = await rig.pool.fetchrow(
        "SELECT sum(requests) AS n, sum(prompt_tokens) AS p, sum(completion_tokens) AS c, "
        "sum(cost) AS cost FROM usage_hourly")
    assert (hourly["n"], hourly["p"], hourly["c"]) == (len(events), row["p"], row["c"])
    assert hourly["cost"] == await rig.pool.fetchval("SELECT sum(cost) FROM usage_records")
    assert len(state.calls) == len(state.meter_events)  # one call per meter event
    async with aiohttp.ClientSession() as session, \
            session.get(rig.urls[0] + "/metrics") as r:
        metrics = await r.text()
    assert f"usage_records_created_total {float(len(events))}" in metrics
    assert f'billing_exports_total{{status="exported"}} {float(len(state.calls))}' in metrics
    tokens = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith("tokens_processed_total{"))
    assert tokens == row["p"] + row["c"]

    # A replay of the whole log gives the same records and hours; nothing more goes out.
    before = [tuple(r) for r in await rig.pool.fetch(
        "SELECT * FROM usage_records ORDER BY request_id")]
    hourly_columns = ("SELECT tenant_id, environment_id, model, hour, requests, prompt_tokens, "
                      "completion_tokens, cost, last_position FROM usage_hourly "
                      "ORDER BY tenant_id, hour, environment_id, model")
    hours_before = [tuple(r) for r in await rig.pool.fetch(hourly_columns)]
    assert all(h[-1] > 0 for h in hours_before)
    await ProjectionRunner(EventLog(rig.pool), UsageRecordsProjection()).rebuild()
    assert [tuple(r) for r in await rig.pool.fetch(
        "SELECT * FROM usage_records ORDER BY request_id")] == before
    # The same rows, their last positions included, however the rebuild batched the events.
    assert [tuple(r) for r in await rig.pool.fetch(hourly_columns)] == hours_before
    calls = len(state.calls)
    await rig.all_exported()
    assert len(state.calls) == calls

    # The whole USAGE stream consumed again from its start (a new durable consumer): the log,
    # the records and Stripe stay as they are.
    await rig.stop()
    logged = await rig.pool.fetchval("SELECT count(*) FROM events")
    await rig.bus.js.delete_consumer("USAGE", "billing-usage")
    await rig.start()

    async def consumed_again() -> bool:
        try:
            info = await rig.bus.js.consumer_info("USAGE", "billing-usage")
        except nats.js.errors.NotFoundError:
            return False  # billing has not made its consumer again yet
        return info.num_pending == 0 and info.num_ack_pending == 0 and \
            info.delivered.stream_seq == len(events) + 200

    await eventually(consumed_again, timeout=20, what="the stream consumed again")
    await rig.all_exported()
    assert await rig.pool.fetchval("SELECT count(*) FROM events") == logged
    assert [tuple(r) for r in await rig.pool.fetch(
        "SELECT * FROM usage_records ORDER BY request_id")] == before
    assert len(state.calls) == calls


async def test_killed_between_push_and_record_sends_nothing_twice(rig: BillingRig) -> None:
    """A real billing process is SIGKILLed while Stripe holds its answer to an accepted meter
    event (so the export is not recorded); the next billing sends the same identifier again,
    Stripe refuses it as a duplicate, and the ledger records the export once."""
    acme = await rig.tenant("acme")
    await rig.record([usage(acme, hours_ago(1), 40, 2), usage(acme, hours_ago(2), 30, 3)])
    state = rig.stripe.state
    state.fail("/v1/billing/meter_events", "hang_after_accept")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_")}
    env.update({"DATABASE_URL": rig.servers.database_url, "NATS_URL": rig.servers.nats_url,
                "NATS_CREDS": rig.servers.creds(Role.BILLING),
                "HTTP_PORT": str(free_port()), "LOG_JSON": "false",
                "STRIPE_SECRET_KEY": rig.stripe.api_key, "STRIPE_API_BASE": rig.stripe.url,
                "BILLING_HOUR_GRACE": "0", "BILLING_PUSH_INTERVAL": "0.2",
                "BILLING_LEADER_RETRY": "0.2", "STRIPE_TIMEOUT": "30"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.billing", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        await asyncio.wait_for(state.accepted_event.wait(), 20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        output, _ = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL, output.decode()
    hung = state.outcomes("accepted")[0].identifier
    assert await rig.pool.fetchval(
        "SELECT status FROM meter_exports WHERE identifier = $1", hung) == "planned"

    await rig.start()  # billing again
    await rig.all_exported()
    calls = [c.identifier for c in state.calls]
    assert calls.count(hung) == 2
    assert [c.outcome for c in state.calls if c.identifier == hung] == ["accepted", "duplicate"]
    accepted = accepted_identifiers(rig.stripe)
    assert len(accepted) == len(set(accepted)) == 4
    row = await rig.pool.fetchrow(
        "SELECT status, duplicate, value FROM meter_exports WHERE identifier = $1", hung)
    assert (row["status"], row["duplicate"]) == ("exported", True)
    assert str(row["value"]) == state.meter_events[hung]["payload"]["value"]
    assert await rig.pool.fetchval(
        "SELECT count(*) FROM events WHERE type = 'billing.usage_exported'") == 4


async def test_billing_without_stripe_records_usage_and_says_so(rig: BillingRig) -> None:
    from structlog.testing import capture_logs

    acme = await rig.tenant("acme")
    with capture_logs() as logs:
        app = await rig.start(stripe_secret_key=Secret(""))
    assert PUSHER not in app
    assert [entry for entry in logs if "STRIPE_SECRET_KEY is not set" in entry["event"]]
    await rig.publish([usage(acme, hours_ago(1), 5, 5)])
    await rig.records(1)
    assert rig.stripe.state.calls == []
    assert "sk_test" not in repr(rig.settings())


async def test_the_stripe_double_enforces_stripes_rules(rig: BillingRig) -> None:
    """What the other tests rely on: concurrent calls for one customer and meter are refused
    (so `concurrency_refusals == 0` above means the pusher kept to one at a time), as are
    fractional values, timestamps out of Stripe's window and reused identifiers."""
    import stripe

    from services.domain.stripe_billing import Failure, classify

    customer = rig.stripe.state.add_customer()
    client = StripeBilling(StripeConfig(Secret(rig.stripe.api_key), rig.stripe.url, 2.0))
    now = int(datetime.now(UTC).timestamp())
    try:
        results = await asyncio.gather(*(client.send_meter_event(
            event_name=IN, customer_id=customer, value=1, identifier=f"c-{i}", timestamp=now)
            for i in range(6)), return_exceptions=True)
        refused = [r for r in results if isinstance(r, stripe.StripeError)]
        assert refused and all(r.http_status == 409 and classify(r) is Failure.RETRY
                               for r in refused)
        assert rig.stripe.state.concurrency_refusals == len(refused)
        for kwargs in ({"timestamp": now - 36 * 86400}, {"timestamp": now + 600},
                       {"customer_id": "cus_nobody"}):
            args = {"event_name": IN, "customer_id": customer, "value": 1,
                    "identifier": f"x-{uuid.uuid4()}", "timestamp": now, **kwargs}
            with pytest.raises(stripe.InvalidRequestError):
                await client.send_meter_event(**args)  # type: ignore[arg-type]
        with pytest.raises(stripe.InvalidRequestError, match="whole number"):
            await client.client.v1.billing.meter_events.create_async({
                "event_name": IN, "identifier": "frac", "timestamp": now,
                "payload": {"stripe_customer_id": customer, "value": "1.5"}})
        first = await client.send_meter_event(event_name=IN, customer_id=customer, value=2,
                                              identifier="same", timestamp=now)
        again = await client.send_meter_event(event_name=IN, customer_id=customer, value=3,
                                              identifier="same", timestamp=now)
        assert (first.value, again.value) == ("sent", "duplicate")
        assert rig.stripe.state.meter_events["same"]["payload"]["value"] == "2"
    finally:
        await client.close()
