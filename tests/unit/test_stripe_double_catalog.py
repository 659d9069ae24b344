"""The Stripe double's catalog: billing meters, products, prices, subscription items, the
meter event digit rule and the invoice preview — driven through the real `stripe` library,
as billing drives Stripe. The double runs in-process on the loopback (no other server)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

import aiohttp
import pytest
import stripe

from tests.doubles.stripe_server import (
    InvoiceLine,
    StripeServer,
    StripeState,
    decode_form,
    running_stripe,
)


@dataclass
class Rig:
    server: StripeServer
    client: stripe.StripeClient

    async def meter(self, event_name: str, formula: str = "sum") -> str:
        meter = await self.client.v1.billing.meters.create_async({
            "display_name": event_name.replace("_", " "), "event_name": event_name,
            "default_aggregation": {"formula": formula},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"}})
        return str(meter.id)

    async def product(self, name: str = "Llama 8B") -> str:
        return str((await self.client.v1.products.create_async({"name": name})).id)

    async def metered_price(self, product: str, meter: str, cents: str,
                            lookup_key: str | None = None) -> str:
        """`cents` goes on the wire as written: the library types the amount as a Decimal
        but sends str(Decimal), which is exponent notation below a millionth of a cent."""
        params: stripe.params.PriceCreateParams = {
            "currency": "usd", "product": product, "unit_amount_decimal": cast(Decimal, cents),
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter}}
        if lookup_key is not None:
            params["lookup_key"] = lookup_key
        return str((await self.client.v1.prices.create_async(params)).id)

    async def meter_event(self, event_name: str, customer: str, value: int,
                          timestamp: int) -> None:
        await self.client.v1.billing.meter_events.create_async({
            "event_name": event_name, "timestamp": timestamp,
            "payload": {"stripe_customer_id": customer, "value": str(value)}})


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with running_stripe() as server:
        http = stripe.AIOHTTPClient()
        client = stripe.StripeClient(
            server.api_key, http_client=http, max_network_retries=0,
            base_addresses={"api": server.url, "meter_events": server.url})
        try:
            yield Rig(server, client)
        finally:
            await http.close_async()  # type: ignore[no-untyped-call]


async def refused(call: Awaitable[object]) -> stripe.InvalidRequestError:
    with pytest.raises(stripe.InvalidRequestError) as info:
        await call
    assert info.value.http_status in (400, 404)
    return info.value


# --------------------------------------------------------------------------- meters


async def test_meter_is_created_listed_and_retrieved(rig: Rig) -> None:
    mid = await rig.meter("crosslogic_input_tokens")
    meter = await rig.client.v1.billing.meters.retrieve_async(mid)
    assert mid.startswith("mtr_")
    assert meter.object == "billing.meter"
    assert (meter.event_name, meter.display_name, meter.status) == (
        "crosslogic_input_tokens", "crosslogic input tokens", "active")
    assert meter.default_aggregation.formula == "sum"
    assert meter.customer_mapping.event_payload_key == "stripe_customer_id"
    assert meter.customer_mapping.type == "by_id"
    assert meter.value_settings.event_payload_key == "value"
    assert meter.livemode is False and isinstance(meter.created, int)
    listed = await rig.client.v1.billing.meters.list_async()
    assert [m.id for m in listed.data] == [mid]


async def test_one_active_meter_per_event_name(rig: Rig) -> None:
    first = await rig.meter("crosslogic_input_tokens")
    err = await refused(rig.meter("crosslogic_input_tokens", "count"))
    assert err.http_status == 400 and err.param == "event_name"
    assert "A meter with event_name `crosslogic_input_tokens` already exists" in str(
        err.user_message)
    # Once the first is inactive the name is free; the first cannot come back while the
    # second holds it.
    await rig.client.v1.billing.meters.deactivate_async(first)
    second = await rig.meter("crosslogic_input_tokens")
    err = await refused(rig.client.v1.billing.meters.reactivate_async(first))
    assert err.param == "event_name"
    active = await rig.client.v1.billing.meters.list_async({"status": "active"})
    inactive = await rig.client.v1.billing.meters.list_async({"status": "inactive"})
    assert [m.id for m in active.data] == [second]
    assert [m.id for m in inactive.data] == [first]
    assert inactive.data[0].status_transitions.deactivated_at is not None


async def test_meter_refusals(rig: Rig) -> None:
    err = await refused(rig.meter("tokens", "average"))
    assert err.param == "default_aggregation[formula]"
    err = await refused(rig.client.v1.billing.meters.create_async(cast(Any, {
        "display_name": "x", "event_name": "x", "default_aggregation": {"formula": "sum"},
        "value_settings": {"event_payload_key": "value", "key": "tokens"}})))
    assert err.code == "parameter_unknown" and err.param == "value_settings[key]"
    err = await refused(rig.client.v1.billing.meters.create_async(cast(Any, {
        "event_name": "x", "default_aggregation": {"formula": "sum"}})))
    assert err.code == "parameter_missing" and err.param == "display_name"
    err = await refused(rig.client.v1.billing.meters.retrieve_async("mtr_nope"))
    assert err.http_status == 404 and err.code == "resource_missing"


# --------------------------------------------------------------------------- products


async def test_product_is_created_and_retrieved(rig: Rig) -> None:
    made = await rig.client.v1.products.create_async(
        {"name": "Llama 8B", "metadata": {"model": "llama-8b"}})
    got = await rig.client.v1.products.retrieve_async(made.id)
    assert made.id.startswith("prod_") and got.object == "product"
    assert (got.name, got.active, got.metadata["model"]) == ("Llama 8B", True, "llama-8b")
    # A product id of the caller's is taken once.
    await rig.client.v1.products.create_async(cast(Any, {"id": "prod_llama", "name": "a"}))
    err = await refused(rig.client.v1.products.create_async(
        cast(Any, {"id": "prod_llama", "name": "b"})))
    assert err.code == "resource_already_exists"
    err = await refused(rig.client.v1.products.create_async(cast(Any, {"metadata": {}})))
    assert err.param == "name"
    err = await refused(rig.client.v1.products.retrieve_async("prod_nope"))
    assert err.http_status == 404


# --------------------------------------------------------------------------- prices


async def test_metered_price_with_a_decimal_amount(rig: Rig) -> None:
    mid = await rig.meter("crosslogic_input_tokens")
    product = await rig.product()
    price = await rig.client.v1.prices.create_async({
        "currency": "usd", "product": product, "unit_amount_decimal": Decimal("0.000015"),
        "billing_scheme": "per_unit", "nickname": "input tokens",
        "recurring": {"interval": "month", "usage_type": "metered", "meter": mid},
        "lookup_key": "llama-8b:input", "metadata": {"model": "llama-8b"}})
    got = await rig.client.v1.prices.retrieve_async(price.id)
    assert price.id.startswith("price_") and got.object == "price"
    assert (got.active, got.currency, got.product, got.type, got.billing_scheme) == (
        True, "usd", product, "recurring", "per_unit")
    assert got.unit_amount is None
    # The library hands a decimal string back as a Decimal.
    assert got.unit_amount_decimal == Decimal("0.000015")
    assert got.recurring is not None
    assert (got.recurring.interval, got.recurring.interval_count, got.recurring.usage_type,
            got.recurring.meter) == ("month", 1, "metered", mid)
    assert (got.lookup_key, got.nickname, got.metadata["model"]) == (
        "llama-8b:input", "input tokens", "llama-8b")
    assert rig.server.state.prices[price.id]["unit_amount_decimal"] == "0.000015"


async def test_whole_amount_shows_as_decimal_too(rig: Rig) -> None:
    product = await rig.product()
    price = await rig.client.v1.prices.create_async({
        "currency": "USD", "product": product, "unit_amount": 2500,
        "recurring": {"interval": "month"}})
    assert (price.unit_amount, price.unit_amount_decimal, price.currency) == (
        2500, Decimal("2500"), "usd")
    assert price.recurring is not None and price.recurring.usage_type == "licensed"
    assert price.recurring.meter is None


async def test_price_refusals(rig: Rig) -> None:
    mid = await rig.meter("tokens")
    product = await rig.product()
    base: dict[str, Any] = {"currency": "usd", "product": product,
                            "recurring": {"interval": "month", "usage_type": "metered",
                                          "meter": mid}}

    async def create(**params: Any) -> stripe.InvalidRequestError:
        return await refused(rig.client.v1.prices.create_async(cast(Any, {**base, **params})))

    # At most 12 decimal places (of a cent).
    ok = await rig.metered_price(product, mid, "0.000000000001")
    assert ok.startswith("price_")
    err = await create(unit_amount_decimal="0.0000000000001")
    assert err.param == "unit_amount_decimal" and "12 decimal places" in str(err.user_message)
    # What str(Decimal) writes below a millionth (and for a normalized whole number): the
    # library sends it as is; refused, as not a plain decimal string.
    err = await create(unit_amount_decimal=Decimal("0.0000005"))
    assert err.param == "unit_amount_decimal" and "5E-7" in str(err.user_message)
    err = await create(unit_amount_decimal=Decimal("100").normalize())
    assert "1E+2" in str(err.user_message)
    err = await create(unit_amount_decimal="-1")
    assert err.param == "unit_amount_decimal"
    err = await create(unit_amount=1, unit_amount_decimal="1")
    assert err.param == "unit_amount"
    err = await create()
    assert err.code == "parameter_missing" and err.param == "unit_amount"
    err = await create(unit_amount=1, product="prod_nope")
    assert err.code == "resource_missing" and err.param == "product"
    err = await create(unit_amount=1, recurring={"interval": "month", "usage_type": "metered"})
    assert err.param == "recurring[meter]"
    err = await create(unit_amount=1, recurring={"interval": "month", "usage_type": "metered",
                                                 "meter": "mtr_nope"})
    assert err.code == "resource_missing" and err.param == "recurring[meter]"
    err = await create(unit_amount=1, recurring={"interval": "fortnight"})
    assert err.param == "recurring[interval]"
    err = await create(unit_amount=1, recurring={"interval": "month", "aggregate_usage": "sum"})
    assert err.code == "parameter_unknown" and err.param == "recurring[aggregate_usage]"
    err = await create(unit_amount=1, billing_scheme="tiered")
    assert err.param == "billing_scheme"


async def test_lookup_key_is_held_once_and_moves_on_transfer(rig: Rig) -> None:
    mid = await rig.meter("tokens")
    product = await rig.product()
    old = await rig.metered_price(product, mid, "0.0015", lookup_key="llama-8b:input")
    err = await refused(rig.metered_price(product, mid, "0.0020", lookup_key="llama-8b:input"))
    assert err.param == "lookup_key"
    assert f"A price (`{old}`) already uses that lookup key." in str(err.user_message)
    # Archiving the old price does not free its key: only a transfer moves it.
    await rig.client.v1.prices.update_async(old, {"active": False})
    await refused(rig.metered_price(product, mid, "0.0020", lookup_key="llama-8b:input"))
    new = await rig.client.v1.prices.create_async({
        "currency": "usd", "product": product, "unit_amount_decimal": Decimal("0.0020"),
        "recurring": {"interval": "month", "usage_type": "metered", "meter": mid},
        "lookup_key": "llama-8b:input", "transfer_lookup_key": True})
    assert new.lookup_key == "llama-8b:input"
    assert (await rig.client.v1.prices.retrieve_async(old)).lookup_key is None
    found = await rig.client.v1.prices.list_async({"lookup_keys": ["llama-8b:input"]})
    assert [p.id for p in found.data] == [new.id]


async def test_price_list_filters(rig: Rig) -> None:
    mid = await rig.meter("tokens")
    llama, qwen = await rig.product("Llama"), await rig.product("Qwen")
    a = await rig.metered_price(llama, mid, "0.001", lookup_key="a")
    b = await rig.metered_price(llama, mid, "0.002", lookup_key="b")
    c = await rig.metered_price(qwen, mid, "0.003", lookup_key="c")
    await rig.client.v1.prices.update_async(b, {"active": False})
    prices = rig.client.v1.prices

    async def ids(params: stripe.params.PriceListParams) -> list[str]:
        return [p.id for p in (await prices.list_async(params)).data]

    # The library sends a list as lookup_keys[0]=a&lookup_keys[1]=c; newest first.
    assert await ids({"lookup_keys": ["a", "c"]}) == [c, a]
    assert await ids({"lookup_keys": ["a", "b", "c"], "active": True}) == [c, a]
    assert await ids({"active": False}) == [b]
    assert await ids({"product": llama}) == [b, a]
    assert await ids({"product": llama, "active": True, "lookup_keys": ["a", "b"]}) == [a]
    assert await ids({"recurring": {"meter": mid}, "limit": 100}) == [c, b, a]
    # Pages: the library follows `has_more` with starting_after.
    page = await prices.list_async({"limit": 1})
    assert page.has_more and [p.id for p in page.data] == [c]
    assert [p.id async for p in page.auto_paging_iter()] == [c, b, a]
    err = await refused(prices.list_async(cast(Any, {"lookup_key": "a"})))
    assert err.code == "parameter_unknown"


async def test_price_update_keeps_the_amount(rig: Rig) -> None:
    mid = await rig.meter("tokens")
    price = await rig.metered_price(await rig.product(), mid, "0.5")
    updated = await rig.client.v1.prices.update_async(
        price, {"nickname": "half a cent", "metadata": {"model": "llama"}})
    assert (updated.nickname, updated.metadata["model"]) == ("half a cent", "llama")
    err = await refused(rig.client.v1.prices.update_async(
        price, cast(Any, {"unit_amount_decimal": "0.6"})))
    assert err.code == "parameter_unknown" and err.param == "unit_amount_decimal"
    err = await refused(rig.client.v1.prices.retrieve_async("price_nope"))
    assert err.http_status == 404


async def test_query_lookup_keys_with_empty_brackets(rig: Rig) -> None:
    """Stripe also takes ``lookup_keys[]=a&lookup_keys[]=b`` (curl's way)."""
    mid = await rig.meter("tokens")
    product = await rig.product()
    a = await rig.metered_price(product, mid, "1", lookup_key="a&b")
    await rig.metered_price(product, mid, "1", lookup_key="c")
    assert decode_form("k[]=x&k[]=y&o[0]=z") == {"k": ["x", "y"], "o": ["z"]}
    async with aiohttp.ClientSession() as http, http.get(
            f"{rig.server.url}/v1/prices?lookup_keys[]=a%26b&lookup_keys[]=zz",
            headers={"Authorization": f"Bearer {rig.server.api_key}"}) as resp:
        body = await resp.json()
    assert resp.status == 200
    assert [p["id"] for p in body["data"]] == [a]


# --------------------------------------------------------------------------- subscriptions


async def test_subscription_carries_its_items(rig: Rig) -> None:
    mid_in, mid_out = await rig.meter("in"), await rig.meter("out")
    product = await rig.product()
    p_in = await rig.metered_price(product, mid_in, "0.0015")
    p_out = await rig.metered_price(product, mid_out, "0.006")
    customer = rig.server.state.add_customer("tenant-1")
    sub = await rig.client.v1.subscriptions.create_async(
        {"customer": customer, "items": [{"price": p_in}, {"price": p_out}],
         "metadata": {"tenant_id": "tenant-1"}})
    got = await rig.client.v1.subscriptions.retrieve_async(sub.id)
    assert got.items["object"] == "list"
    items = got.items.data
    assert [i.price.id for i in items] == [p_in, p_out]
    for item in items:
        assert item.id.startswith("si_") and item.object == "subscription_item"
        assert item.subscription == sub.id and isinstance(item.created, int)
    assert items[0].price.unit_amount_decimal == Decimal("0.0015")
    assert items[0].price.recurring is not None and items[0].price.recurring.meter == mid_in
    assert got.currency == "usd"
    listed = await rig.client.v1.subscription_items.list_async({"subscription": sub.id})
    assert [i.id for i in listed.data] == [i.id for i in items]
    err = await refused(rig.client.v1.subscriptions.retrieve_async("sub_nope"))
    assert err.http_status == 404
    # The same price twice is refused; a price the double does not know is taken on trust.
    err = await refused(rig.client.v1.subscriptions.create_async(
        {"customer": customer, "items": [{"price": p_in}, {"price": p_in}]}))
    assert err.param == "items[1][price]"
    trusted = await rig.client.v1.subscriptions.create_async(
        {"customer": customer, "items": [{"price": "price_elsewhere"}]})
    assert trusted.items.data[0].price.id == "price_elsewhere"


async def test_subscription_item_is_added_once(rig: Rig) -> None:
    mid_in, mid_out = await rig.meter("in"), await rig.meter("out")
    product = await rig.product()
    p_in = await rig.metered_price(product, mid_in, "0.0015")
    p_out = await rig.metered_price(product, mid_out, "0.006")
    customer = rig.server.state.add_customer()
    sub = await rig.client.v1.subscriptions.create_async(
        {"customer": customer, "items": [{"price": p_in}]})
    items = rig.client.v1.subscription_items
    params: stripe.params.SubscriptionItemCreateParams = {
        "subscription": sub.id, "price": p_out, "proration_behavior": "none",
        "metadata": {"model": "llama"}}
    added = await items.create_async(params, {"idempotency_key": "add-out"})
    again = await items.create_async(params, {"idempotency_key": "add-out"})
    assert again.id == added.id
    assert again.last_response is not None
    assert again.last_response.headers.get("Idempotent-Replayed") == "true"
    assert (added.subscription, added.price.id, added.metadata["model"]) == (
        sub.id, p_out, "llama")
    got = await rig.client.v1.subscriptions.retrieve_async(sub.id)
    assert [i.price.id for i in got.items.data] == [p_in, p_out]
    # The same key with other parameters is Stripe's idempotency error.
    with pytest.raises(stripe.IdempotencyError):
        await items.create_async({"subscription": sub.id, "price": p_in},
                                 {"idempotency_key": "add-out"})
    # Refusals: the price is already there, unknown price, unknown or ended subscription.
    err = await refused(items.create_async({"subscription": sub.id, "price": p_in}))
    assert err.param == "price" and "same price" in str(err.user_message)
    err = await refused(items.create_async({"subscription": sub.id, "price": "price_nope"}))
    assert err.code == "resource_missing" and err.param == "price"
    err = await refused(items.create_async({"subscription": "sub_nope", "price": p_in}))
    assert err.code == "resource_missing" and err.param == "subscription"
    p_more = await rig.metered_price(product, await rig.meter("more"), "1")
    err = await refused(items.create_async({"subscription": sub.id, "price": p_more,
                                            "quantity": 3}))
    assert err.param == "quantity" and "metered" in str(err.user_message)
    await rig.client.v1.subscriptions.cancel_async(sub.id)
    err = await refused(items.create_async({"subscription": sub.id, "price": p_more}))
    assert err.param == "subscription" and "canceled" in str(err.user_message)


async def test_subscription_item_price_must_fit(rig: Rig) -> None:
    mid = await rig.meter("tokens")
    product = await rig.product()
    p_usd = await rig.metered_price(product, mid, "1")
    customer = rig.server.state.add_customer()
    sub = await rig.client.v1.subscriptions.create_async(
        {"customer": customer, "items": [{"price": p_usd}]})
    items = rig.client.v1.subscription_items
    eur = await rig.client.v1.prices.create_async({
        "currency": "eur", "product": product, "unit_amount": 1,
        "recurring": {"interval": "month", "usage_type": "metered", "meter": mid}})
    err = await refused(items.create_async({"subscription": sub.id, "price": eur.id}))
    assert "currency" in str(err.user_message)
    yearly = await rig.client.v1.prices.create_async({
        "currency": "usd", "product": product, "unit_amount": 1,
        "recurring": {"interval": "year", "usage_type": "metered", "meter": mid}})
    err = await refused(items.create_async({"subscription": sub.id, "price": yearly.id}))
    assert "interval" in str(err.user_message)
    once = await rig.client.v1.prices.create_async(
        {"currency": "usd", "product": product, "unit_amount": 100})
    err = await refused(items.create_async({"subscription": sub.id, "price": once.id}))
    assert "one_time" in str(err.user_message)
    archived = await rig.metered_price(product, mid, "2")
    await rig.client.v1.prices.update_async(archived, {"active": False})
    err = await refused(items.create_async({"subscription": sub.id, "price": archived}))
    assert "inactive" in str(err.user_message)


# --------------------------------------------------------------------------- meter events


async def test_meter_event_value_has_at_most_15_digits(rig: Rig) -> None:
    customer = rig.server.state.add_customer()
    now = int(time.time())
    await rig.meter_event("tokens", customer, 999_999_999_999_999, now)
    with pytest.raises(stripe.InvalidRequestError) as info:
        await rig.meter_event("tokens", customer, 1_000_000_000_000_000, now)
    assert info.value.code == "meter_event_value_too_many_digits"
    assert info.value.user_message == ("The value in the event payload can have at most 15 "
                                       "digits. Received 1000000000000000.")
    assert rig.server.state.total("tokens", customer) == 999_999_999_999_999


# --------------------------------------------------------------------------- invoice preview


async def test_invoice_preview_by_hand(rig: Rig) -> None:
    """Worked by hand (amounts in cents):

    input tokens   sum   0.0015 ¢   1000 + 2345 = 3345  → 5.0175 → 5
    output tokens  sum   0.002 ¢    1250                → 2.5    → 3 (half up, not to even)
    requests       count 2 ¢        2 events            → 4      → 4
    total 12; the licensed price, the events outside [start, end), another customer's, and
    the canceled subscription's price are not billed.
    """
    state = rig.server.state
    m_in, m_out = await rig.meter("in_tokens"), await rig.meter("out_tokens")
    m_req = await rig.meter("requests", "count")
    product = await rig.product()
    p_in = await rig.metered_price(product, m_in, "0.0015")
    p_out = await rig.metered_price(product, m_out, "0.002")
    p_req = (await rig.client.v1.prices.create_async({
        "currency": "usd", "product": product, "unit_amount": 2,
        "recurring": {"interval": "month", "usage_type": "metered", "meter": m_req}})).id
    p_seat = (await rig.client.v1.prices.create_async({
        "currency": "usd", "product": product, "unit_amount": 1000,
        "recurring": {"interval": "month"}})).id
    customer, other = state.add_customer("t1"), state.add_customer("t2")
    sub = await rig.client.v1.subscriptions.create_async(
        {"customer": customer, "items": [{"price": p_in}, {"price": p_seat}]})
    await rig.client.v1.subscription_items.create_async({"subscription": sub.id,
                                                         "price": p_out})
    await rig.client.v1.subscription_items.create_async({"subscription": sub.id,
                                                         "price": p_req})
    ended = await rig.client.v1.subscriptions.create_async(
        {"customer": customer, "items": [{"price": p_in}]})
    await rig.client.v1.subscriptions.cancel_async(ended.id)
    await rig.client.v1.subscriptions.create_async(
        {"customer": other, "items": [{"price": p_in}]})

    end = int(time.time()) - 60
    start = end - 3600
    for event_name, who, value, at in [
            ("in_tokens", customer, 1000, start), ("in_tokens", customer, 2345, start + 10),
            ("in_tokens", customer, 500, end), ("in_tokens", customer, 700, start - 1),
            ("in_tokens", other, 9999, start + 5),
            ("out_tokens", customer, 1250, end - 1),
            ("requests", customer, 5, start + 1), ("requests", customer, 7, start + 2)]:
        await rig.meter_event(event_name, who, value, at)

    lines = state.invoice_lines(customer, start, end)
    assert sorted(lines, key=lambda line: line.event_name) == [
        InvoiceLine(sub.id, _item(state, sub.id, p_in), p_in, m_in, "in_tokens",
                    Decimal(3345), Decimal("5.0175"), 5),
        InvoiceLine(sub.id, _item(state, sub.id, p_out), p_out, m_out, "out_tokens",
                    Decimal(1250), Decimal("2.5"), 3),
        InvoiceLine(sub.id, _item(state, sub.id, p_req), p_req, m_req, "requests",
                    Decimal(2), Decimal(4), 4)]
    assert state.invoice_total_cents(customer, start, end) == 12
    assert state.meter_usage(m_in, other, start, end) == Decimal(9999)
    assert state.invoice_total_cents(other, start, end) == 15  # 14.9985 rounds up
    assert state.invoice_lines(customer, end, end + 60) == [
        InvoiceLine(sub.id, _item(state, sub.id, p_in), p_in, m_in, "in_tokens",
                    Decimal(500), Decimal("0.7500"), 1),
        InvoiceLine(sub.id, _item(state, sub.id, p_out), p_out, m_out, "out_tokens",
                    Decimal(0), Decimal(0), 0),
        InvoiceLine(sub.id, _item(state, sub.id, p_req), p_req, m_req, "requests",
                    Decimal(0), Decimal(0), 0)]


async def test_invoice_amounts_are_exact(rig: Rig) -> None:
    """15-digit quantities times 12-place prices: no float, no context rounding."""
    state = rig.server.state
    mid = await rig.meter("tokens")
    price = await rig.metered_price(await rig.product(), mid, "0.123456789012")
    customer = state.add_customer()
    await rig.client.v1.subscriptions.create_async(
        {"customer": customer, "items": [{"price": price}]})
    now = int(time.time())
    for _ in range(3):
        await rig.meter_event("tokens", customer, 999_999_999_999_999, now - 10)
    [line] = state.invoice_lines(customer, now - 60, now)
    assert line.quantity == Decimal(2_999_999_999_999_997)
    assert line.amount == Decimal("370370367035999.629629632964")
    assert line.amount_rounded == 370370367036000


def _item(state: StripeState, sid: str, price: str) -> str:
    return next(str(i["id"]) for i in state.subscriptions[sid]["items"]["data"]
                if i["price"]["id"] == price)
