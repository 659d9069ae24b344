"""Invoices equal the platform's cost (issue 22): every model's price and every region's
multiplier reach Stripe, through one cost meter whose price is one cost unit.

Requests go through the real gateway to simulated nodes serving two models at very different
prices in two regions with different multipliers; billing prices them from the catalog, and the
pusher exports each tenant-hour's cost, in whole nano-dollars, to the cost meter of the local
Stripe (tests/doubles/stripe_server.py), whose invoice preview adds the meter up at the price's
unit amount. And the switch of a tenant from the token prices to the cost price, with usage on
both sides of it: no hour billed twice, none lost."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import asyncpg
import pytest
from openai import AsyncOpenAI

from schemas.events import UsageExportPlanned, UsageRecorded
from services.billing.hours import floor_hour, identifier
from services.domain.billing_ledger import PLAN_LOCK_KEY, record_billing_events
from services.domain.cost_meter import EPOCH
from services.domain.stripe_pricing import (
    CostPriceSpec,
    ensure_cost_price,
    switch_tenant,
)
from services.domain.usage_records import UsageRecordsProjection
from services.infra.eventlog import EventLog
from services.infra.natsauth.identities import Role
from services.infra.projections import ProjectionRunner
from services.infra.settings import Secret
from tests.conftest import Servers
from tests.doubles.stripe_server import StripeServer
from tests.helpers import eventually
from tests.integration.gateway_fixtures import MODEL, Platform
from tests.integration.gateway_fixtures import platform as platform
from tests.integration.test_admin_api import TOKEN, Admin, assert_error, running_admin
from tests.integration.test_billing_stripe import IN, OUT, BillingRig, hours_ago, usage
from tests.integration.test_billing_stripe import rig as rig
from tests.integration.test_cli_admin import Cli, base_env

COST = "crosslogic_cost"
NANO = Decimal("0.000000001")
SPEC = CostPriceSpec(COST, NANO, "usd")
BIG = "Qwen/Qwen2.5-72B-Instruct"
"""A model thirty times dearer than MODEL (the platform fixture's: $0.10 / $0.20 per 1M)."""
MULTIPLIERS = "eu-west-1=1.10"
# Whole cents per token, so the token invoice is exact too.
TOKEN_PRICE_CENTS = {IN: Decimal("0.00002"), OUT: Decimal("0.00008")}


def cents(amount: Decimal) -> int:
    """A line's amount as Stripe rounds it (the double's assumption: half up)."""
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


async def cost_of_hours(pool: asyncpg.Pool, tenant: uuid.UUID) -> dict[datetime, Decimal]:
    rows = await pool.fetch(
        """SELECT date_trunc('hour', occurred_at, 'UTC') AS hour, sum(cost) AS cost
           FROM usage_records WHERE tenant_id = $1 GROUP BY 1 ORDER BY 1""", tenant)
    return {r["hour"]: r["cost"] for r in rows}


def exported_by_hour(stripe: StripeServer, tenant: uuid.UUID, event_name: str
                     ) -> dict[datetime, int]:
    """What Stripe holds on a meter for the tenant, per hour (named by the identifier)."""
    out: dict[datetime, int] = {}
    for ident, event in stripe.state.meter_events.items():
        if event["event_name"] != event_name or not ident.startswith(f"{tenant}:"):
            continue
        hour = datetime.strptime(ident.split(":")[2], "%Y-%m-%dT%H").replace(tzinfo=UTC)
        out[hour] = out.get(hour, 0) + int(event["payload"]["value"])
    return out


async def token_prices(rig: BillingRig) -> tuple[str, str]:
    """The token meters and their prices in Stripe, as an operator made them before the cost
    price: real prices, so the invoice preview bills the token meters too."""
    async with rig.stripe_client() as sb:
        product = await sb.client.v1.products.create_async({"name": "tokens"})
        ids = []
        for event_name in (IN, OUT):
            meter = await sb.client.v1.billing.meters.create_async({
                "display_name": event_name, "event_name": event_name,
                "default_aggregation": {"formula": "sum"}})
            price = await sb.client.v1.prices.create_async({
                "currency": "usd", "product": product.id,
                "unit_amount_decimal": str(TOKEN_PRICE_CENTS[event_name]),  # type: ignore[typeddict-item]
                "recurring": {"interval": "month", "usage_type": "metered",
                              "meter": meter.id}})
            ids.append(price.id)
    return ids[0], ids[1]


@pytest.fixture
async def priced(platform: Platform, rig: BillingRig) -> Platform:
    """The gateway; MODEL served in us-east-1 (1x), BIG in eu-west-1 (1.10x)."""
    await platform.catalog.create_model(BIG, family="qwen", vram_gb=80,
                                        input_price_per_million=Decimal("3.00"),
                                        output_price_per_million=Decimal("15.00"),
                                        context_length=8192)
    rig.extra["region_multipliers"] = MULTIPLIERS
    await platform.start_gateway()
    await platform.add_node(model=MODEL, region="us-east-1")
    await platform.add_node(model=BIG, region="eu-west-1")
    await platform.routable(1, MODEL)
    await platform.routable(1, BIG)
    return platform


async def ask(client: AsyncOpenAI, i: int) -> None:
    model = BIG if i % 3 == 0 else MODEL
    content = "Bill me exactly, please. " * (1 + i % 4)
    if i % 4:
        await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}],
            max_tokens=4 + i % 9)
        return
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=4 + i % 9,
        stream=True, stream_options={"include_usage": True})
    async for _ in stream:
        pass


async def traffic(p: Platform, n: int, offset: int = 0) -> None:
    client = p.client()
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with gate:
            await ask(client, i)

    await asyncio.gather(*(one(offset + i) for i in range(n)))


def past(p: Platform, when: datetime, model: str, region: str, prompt: int,
         completion: int) -> UsageRecorded:
    """Usage of the platform's key in an earlier hour, as a gateway would have published it."""
    return UsageRecorded(request_id=f"req-{uuid.uuid4()}", tenant_id=p.tenant_id,
                         environment_id=p.environment_id, api_key_id=p.key.key_id,
                         model=model, endpoint="chat", region=region, node_id=None,
                         prompt_tokens=prompt, completion_tokens=completion, latency_ms=5.0,
                         occurred_at=when)


async def test_the_invoice_is_the_platform_cost_hour_by_hour(priced: Platform,
                                                             rig: BillingRig) -> None:
    p = priced
    async with rig.stripe_client() as sb:
        price = await ensure_cost_price(sb, SPEC)
    customer = await rig.link(p.tenant_id, cost_price=price.price_id)
    assert await rig.pool.fetchval("SELECT cost_from FROM billing_accounts WHERE tenant_id = $1",
                                   p.tenant_id) == EPOCH  # never on the token prices

    earlier = [past(p, hours_ago(3), MODEL, "us-east-1", 1234, 567),
               past(p, hours_ago(3, 40), BIG, "eu-west-1", 4321, 765),
               past(p, hours_ago(2), BIG, "us-east-1", 999_999, 333_333),
               past(p, hours_ago(2, 5), MODEL, "eu-west-1", 77, 7)]
    await traffic(p, 60)
    await rig.record(earlier, total=60 + len(earlier))
    # The gateway's requests happened this hour: the pusher runs an hour ahead, so it is
    # closed for it.
    ahead = timedelta(hours=1)
    await rig.start(clock=lambda: datetime.now(UTC) + ahead)
    await rig.all_exported(until=datetime.now(UTC) + ahead)

    mix = await rig.pool.fetch("SELECT DISTINCT model, region FROM usage_records")
    assert {(r["model"], r["region"]) for r in mix} == {
        (MODEL, "us-east-1"), (BIG, "eu-west-1"), (BIG, "us-east-1"), (MODEL, "eu-west-1")}
    # The catalog's price and the region's multiplier are in each record.
    record = await rig.pool.fetchrow(
        "SELECT prompt_tokens, completion_tokens, cost FROM usage_records WHERE model = $1 "
        "AND region = 'eu-west-1' AND occurred_at > now() - interval '30 minutes' LIMIT 1", BIG)
    assert record["cost"] == ((record["prompt_tokens"] * Decimal("3.00") + record[
        "completion_tokens"] * Decimal("15.00")) / 1_000_000 * Decimal("1.10")).quantize(NANO)

    # Hour by hour, and for the period: the cost meter's values times the unit = sum of cost.
    costs = await cost_of_hours(rig.pool, p.tenant_id)
    sent = exported_by_hour(rig.stripe, p.tenant_id, COST)
    assert len(costs) >= 3
    assert {h: v * NANO for h, v in sent.items()} == costs
    assert exported_by_hour(rig.stripe, p.tenant_id, IN) == {}  # the price is carried once
    # Stripe's invoice for the period: one line, exact before its rounding to the cent.
    start = int((min(costs) - timedelta(hours=1)).timestamp())
    end = int((max(costs) + timedelta(hours=2)).timestamp())
    [line] = rig.stripe.state.invoice_lines(customer, start, end)
    assert line.price == price.price_id
    total = sum(costs.values(), Decimal(0))
    assert line.amount == total * 100
    assert abs(Decimal(line.amount_rounded) - total * 100) <= Decimal("0.5")

    # Late usage for the closed hour becomes a correction; the totals still agree.
    hour = floor_hour(datetime.now(UTC))
    before = dict(rig.stripe.state.meter_events)
    await traffic(p, 12, offset=1000)
    await rig.records(60 + len(earlier) + 12)
    await rig.all_exported(until=datetime.now(UTC) + ahead)
    fresh = set(rig.stripe.state.meter_events) - set(before)
    if floor_hour(datetime.now(UTC)) == hour:  # (else the late requests fell in a new hour)
        assert identifier(p.tenant_id, "cost", hour, 1) in fresh
    costs = await cost_of_hours(rig.pool, p.tenant_id)
    assert {h: v * NANO for h, v in exported_by_hour(rig.stripe, p.tenant_id, COST).items()
            } == costs

    # A replayed log (usage_records rebuilt, a new leader's full pass) sends nothing again.
    calls = len(rig.stripe.state.calls)
    await rig.stop()
    await ProjectionRunner(EventLog(rig.pool), UsageRecordsProjection()).rebuild()
    await rig.start(clock=lambda: datetime.now(UTC) + ahead)
    await rig.all_exported(until=datetime.now(UTC) + ahead)
    assert len(rig.stripe.state.calls) == calls
    assert await cost_of_hours(rig.pool, p.tenant_id) == costs


async def test_switching_to_the_cost_price_bills_each_hour_once(rig: BillingRig) -> None:
    rig.extra["region_multipliers"] = MULTIPLIERS
    acme = await rig.tenant("acme", linked=False)
    price_in, price_out = await token_prices(rig)
    customer = await rig.link(acme, prices=(price_in, price_out))

    # Hours 8 and 7 ago, billed on the token meters.
    before = [usage(acme, hours_ago(8), 100, 10), usage(acme, hours_ago(7), 2000, 300)]
    await rig.record(before)
    await rig.start()
    await rig.all_exported()
    await rig.stop()
    # Hour 6 ago: usage, not planned yet when the switch is made.
    pending = [usage(acme, hours_ago(6), 55, 5)]
    await rig.record(pending)

    async with rig.stripe_client() as sb:
        price = await ensure_cost_price(sb, SPEC)
        # As if run 5 h ago (20 past the hour): the switch is at the next hour.
        switch_time = hours_ago(5, 20)
        done = await switch_tenant(rig.pool, sb, acme, price.price_id, now=switch_time)
        assert done.outcome == "switched"
        cost_from = floor_hour(switch_time) + timedelta(hours=1)
        assert done.cost_from == cost_from
        again = await switch_tenant(rig.pool, sb, acme, price.price_id, now=datetime.now(UTC))
        assert (again.outcome, again.cost_from) == ("already", cost_from)
    sub = rig.stripe.state.subscriptions[
        await rig.pool.fetchval("SELECT subscription_id FROM billing_accounts "
                                "WHERE tenant_id = $1", acme)]
    assert [i["price"]["id"] for i in sub["items"]["data"]] == [price_in, price_out,
                                                                price.price_id]

    # After the switch: usage of hours 4, 3 and 2 ago, and late usage for hour 7.
    after = [usage(acme, hours_ago(4), 10_000, 2_000), usage(acme, hours_ago(3), 1, 1),
             usage(acme, hours_ago(2, 59), 33_333, 1)]
    late = [usage(acme, hours_ago(7, 50), 9, 9)]
    await rig.record(after + late)
    await rig.start()
    await rig.all_exported()

    hours = {floor_hour(e.occurred_at) for e in before + pending + after + late}
    token_hours = {h for h in hours if h < cost_from}
    cost_hours = {h for h in hours if h >= cost_from}
    assert token_hours and cost_hours
    tokens_in = exported_by_hour(rig.stripe, acme, IN)
    tokens_out = exported_by_hour(rig.stripe, acme, OUT)
    by_cost = exported_by_hour(rig.stripe, acme, COST)
    # Each hour on one pricing only, and all of its usage there (late usage included).
    assert set(tokens_in) == set(tokens_out) == token_hours
    assert set(by_cost) == cost_hours
    records = await rig.pool.fetch(
        """SELECT date_trunc('hour', occurred_at, 'UTC') AS hour, sum(prompt_tokens) AS p,
                  sum(completion_tokens) AS c, sum(cost) AS cost
           FROM usage_records WHERE tenant_id = $1 GROUP BY 1""", acme)
    for r in records:
        if r["hour"] < cost_from:
            assert (tokens_in[r["hour"]], tokens_out[r["hour"]]) == (r["p"], r["c"])
        else:
            assert by_cost[r["hour"]] * NANO == r["cost"]
    assert identifier(acme, "input_tokens", hours_ago(7), 1) in rig.stripe.state.meter_events

    # The invoice: token lines for the hours before the switch, a cost line after it.
    start = int((floor_hour(hours_ago(9))).timestamp())
    end = int(datetime.now(UTC).timestamp()) + 3600
    lines = {line.event_name: line for line in
             rig.stripe.state.invoice_lines(customer, start, end)}
    assert lines[IN].quantity == sum(tokens_in.values())
    assert lines[OUT].quantity == sum(tokens_out.values())
    cost_after = sum((r["cost"] for r in records if r["hour"] >= cost_from), Decimal(0))
    assert lines[COST].amount == cost_after * 100
    assert lines[IN].amount == sum(tokens_in.values()) * TOKEN_PRICE_CENTS[IN]


async def test_a_switch_waits_for_a_plan_in_progress(rig: BillingRig) -> None:
    """The switch's hour is chosen under the pusher's planning lock: a plan committing a token
    hour meanwhile moves the switch past it, so that hour is not billed on both pricings."""
    acme = await rig.tenant("acme")
    customer = await rig.pool.fetchval(
        "SELECT customer_id FROM billing_accounts WHERE tenant_id = $1", acme)
    # A token hour planned by a pusher whose clock is ahead (the latest plan there is).
    hour = floor_hour(datetime.now(UTC)) + timedelta(hours=5)
    async with rig.stripe_client() as sb:
        price = await ensure_cost_price(sb, SPEC)
        async with rig.pool.acquire() as conn:
            plan = conn.transaction()
            await plan.start()
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PLAN_LOCK_KEY)
            await record_billing_events(conn, [UsageExportPlanned(
                tenant_id=acme, meter="input_tokens", event_name=IN, hour=hour, value=1,
                identifier=identifier(acme, "input_tokens", hour), sequence=0,
                customer_id=customer)], actor="test")
            switching = asyncio.create_task(
                switch_tenant(rig.pool, sb, acme, price.price_id, now=datetime.now(UTC)))

            async def waiting() -> bool:
                return bool(await rig.pool.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND NOT granted"))

            await eventually(waiting, timeout=30, what="the switch waiting for the plan")
            assert not switching.done()
            await plan.commit()
        done = await asyncio.wait_for(switching, 30)
    assert done.cost_from == hour + timedelta(hours=1)


# --------------------------------------------------------------------------- the admin API


@pytest.fixture
async def admin(servers: Servers, database_url: str, nats_url: str, redis_url: str,
                rig: BillingRig) -> AsyncIterator[Admin]:
    async with running_admin(database_url, nats_url, redis_url,
                             creds=servers.creds(Role.ADMIN_API),
                             stripe_secret_key=Secret(rig.stripe.api_key),
                             stripe_api_base=rig.stripe.url, stripe_timeout=2.0,
                             stripe_price_input_tokens="price_in",
                             stripe_price_output_tokens="price_out") as running:
        yield running


async def test_setup_makes_the_price_once_and_moves_tenants(admin: Admin,
                                                           rig: BillingRig) -> None:
    old = await rig.tenant("old")  # linked to the token prices before setup
    await rig.record([usage(old, hours_ago(2), 10, 10)])
    await rig.start()
    await rig.all_exported()

    first = await admin.ok("POST", "/billing/setup", {})
    assert first["created"] == ["meter", "product", "price"]
    assert (first["unit"], first["unit_amount_decimal"], first["currency"]) == (
        "0.000000001", "0.0000001", "usd")
    [moved] = first["tenants"]
    assert moved["tenant_id"] == str(old) and moved["outcome"] == "switched"
    next_hour = floor_hour(datetime.now(UTC)) + timedelta(hours=1)
    assert datetime.fromisoformat(moved["cost_from"]) in (next_hour,
                                                          next_hour + timedelta(hours=1))
    state = rig.stripe.state
    [meter] = state.meters.values()
    assert (meter["event_name"], meter["default_aggregation"]["formula"]) == (COST, "sum")
    [cost_price] = [p for p in state.prices.values() if p.get("lookup_key") == "crosslogic_cost"]
    assert cost_price["unit_amount_decimal"] == "0.0000001"

    # Another tenant, moved at a chosen time: the whole hour at or after it.
    other = await rig.tenant("other")
    await rig.record([usage(other, hours_ago(2), 1, 1)])
    await rig.all_exported()
    chosen = await admin.ok("POST", "/billing/setup",
                            {"tenant_id": str(other), "switch_at": "2030-01-01T00:30:00Z"})
    assert chosen["tenants"][0]["cost_from"] == "2030-01-01T01:00:00Z"

    # Again: everything reused, nobody moved twice.
    again = await admin.ok("POST", "/billing/setup", {})
    assert again["created"] == [] and again["price_id"] == first["price_id"]
    assert [t["outcome"] for t in again["tenants"]] == []  # only tenants not yet switched
    alone = await admin.ok("POST", "/billing/setup", {"tenant_id": str(old)})
    assert alone["tenants"][0]["outcome"] == "already"

    # A tenant linked after setup is on the cost price from its first hour.
    tenant = (await admin.ok("POST", "/tenants", {"name": "New", "email": "n@new.test"},
                             status=201))["id"]
    linked = await admin.ok("POST", f"/tenants/{tenant}/billing/customer")
    assert datetime.fromisoformat(linked["cost_from"]) == EPOCH
    sub = state.subscriptions[linked["subscription_id"]]
    assert [i["price"]["id"] for i in sub["items"]["data"]] == [first["price_id"]]

    shown = await admin.ok("GET", f"/tenants/{old}/billing")
    assert shown["totals"]["exported"] == 20 and shown["cost_unit"] == "0.000000001"
    assert shown["account"]["cost_from"] == moved["cost_from"]


async def test_cli_billing_setup_and_show(admin: Admin, rig: BillingRig,
                                          tmp_path: Path) -> None:
    tenant = await rig.tenant("zeta")
    cli = Cli({**base_env(tmp_path), "CROSSLOGIC_ADMIN_URL": admin.url,
               "CROSSLOGIC_ADMIN_TOKEN": TOKEN})
    out = await cli.ok("billing", "setup", "--no-switch")
    assert "meter, product, price" in out and "0.0000001 usd" in out
    out = await cli.ok("billing", "setup", "--tenant", str(tenant), "--at",
                       "2020-01-01T00:30:00Z")  # the next whole hour: 01:00
    assert "nothing (all was there)" in out and "switched" in out and str(tenant) in out
    await rig.record([usage(tenant, hours_ago(2), 10, 10)])
    await rig.start()
    await rig.all_exported()
    shown = await cli.ok("billing", "show", str(tenant))
    # Never billed by tokens: by cost from the hour asked for, priced by the catalog.
    assert "billed by cost from  2020-01-01 01:00:00" in shown
    assert "cost exported        0.000007500 (7500 units)" in shown  # (10 x 0.15 + 10 x 0.60)/1M
    assert "tokens exported      0" in shown


async def test_setup_refuses_a_price_of_another_unit(admin: Admin, rig: BillingRig) -> None:
    async with rig.stripe_client() as sb:
        await ensure_cost_price(sb, CostPriceSpec(COST, Decimal("0.000001"), "usd"))
    status, answer = await admin.call("POST", "/billing/setup", {})
    assert status == 409 and answer["error"]["code"] == "stripe_setup_conflict"
    assert "0.0001" in assert_error(answer, "conflict_error")
    assert rig.stripe.state.subscriptions == {}  # nobody was moved onto it
