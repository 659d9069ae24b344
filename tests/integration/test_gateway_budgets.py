"""Spend budgets through the real gateway (issue 21, work in progress): two gateway processes'
worth of apps, many requests at once (whole and streamed, with and without max_tokens)
against a small budget. What was spent never passes it; a refusal is OpenAI's
`insufficient_quota`, naming the budget and when it resets."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from services.core.budgets import NANO, Period, period_bounds
from services.core.devstack import free_port
from services.core.pricing import cost
from services.gateway.app import create_gateway_app
from tests.helpers import eventually
from tests.integration.gateway_fixtures import MODEL, Platform, usage_events
from tests.integration.gateway_fixtures import platform as platform
from tests.integration.test_billing_stripe import BillingRig
from tests.integration.test_billing_stripe import rig as rig

PRICE_IN, PRICE_OUT = Decimal("0.10"), Decimal("0.20")  # the platform fixture's model


async def second_gateway(p: Platform) -> tuple[str, web.AppRunner]:
    app = create_gateway_app(p.settings())
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}", runner


async def ask(client: openai.AsyncOpenAI, i: int) -> str:
    """One request: 'ok', or the refusal's error type."""
    kwargs: dict[str, Any] = {"model": MODEL,
                              "messages": [{"role": "user", "content": f"Spend {i} on me."}]}
    if i % 3:
        kwargs["max_tokens"] = 6 + i % 5
    try:
        if i % 2:
            stream = await client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kwargs)
            async for _ in stream:
                pass
        else:
            await client.chat.completions.create(**kwargs)
    except openai.RateLimitError as exc:
        body: Any = exc.body
        return str(body["type"]) if isinstance(body, dict) else "rate_limit"
    return "ok"


async def test_a_key_budget_holds_across_two_gateways(platform: Platform,
                                                      redis_url: str) -> None:
    p = platform
    budget = Decimal("0.0002")
    await p.catalog.set_budget("key", p.key.key_id, budget, Period("day"))
    await p.start_gateway()
    await p.add_node()
    await p.routable(1)
    other_url, other = await second_gateway(p)
    try:
        clients = [p.client(), openai.AsyncOpenAI(base_url=f"{other_url}/v1",
                                                  api_key=p.key.plaintext, max_retries=0)]
        outcomes = await asyncio.gather(*(ask(clients[i % 2], i) for i in range(60)))
    finally:
        await other.cleanup()
    served = outcomes.count("ok")
    assert served >= 1
    assert set(outcomes) <= {"ok", "insufficient_quota"}, outcomes
    assert "insufficient_quota" in outcomes  # demand was above the budget

    events = await usage_events(p, served)
    spent = sum((cost(e.prompt_tokens, e.completion_tokens, PRICE_IN, PRICE_OUT)
                 for e in events), Decimal(0))
    assert spent <= budget, (spent, budget)

    # What Redis holds for the budget settles to what was spent.
    r = aioredis.from_url(redis_url)
    try:
        async def settled() -> bool:
            return int(await r.hget(f"budget:key:{p.key.key_id}", "n") or 0) == \
                int(spent / NANO)

        await eventually(settled, timeout=30, what="the budget settled to what was spent")
        _, end = period_bounds(Period("day"), datetime.now(UTC))
        assert int(await r.hget(f"budget:key:{p.key.key_id}", "w") or 0) == \
            int(end.timestamp() * 1000)
    finally:
        await r.aclose()


async def test_a_refusal_names_the_budget_and_its_reset(platform: Platform) -> None:
    p = platform
    await p.catalog.set_budget("tenant", p.tenant_id, Decimal("0.000001"), Period("month"))
    await p.start_gateway()
    await p.add_node()
    await p.routable(1)
    with pytest.raises(openai.RateLimitError) as refused:
        await p.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=50)
    body: Any = refused.value.body
    assert body["type"] == "insufficient_quota" and body["code"] == "insufficient_quota"
    _, end = period_bounds(Period("month"), datetime.now(UTC))
    assert "account's spend budget ($0.000001 per month)" in body["message"]
    assert f"{end:%Y-%m-%dT%H:%M:%SZ}" in body["message"]
    assert refused.value.response.headers["x-ratelimit-scope"] == "tenant_budget"
    # Nothing was served, nothing is owed.
    assert await p.usage_in_stream() == 0


async def test_after_redis_loses_the_counters_billing_records_bring_them_back(
        platform: Platform, rig: BillingRig, redis_url: str) -> None:
    """Spend most of a budget, let billing record it, lose Redis: the next request under the
    budget is seeded from usage_records, so what is left is what billing says is left."""
    p = platform
    budget = Decimal("0.00005")
    await p.catalog.set_budget("environment", p.environment_id, budget, Period("day"))
    await p.start_gateway()
    await p.add_node()
    await p.routable(1)
    client = p.client()
    served = 0
    while await ask(client, 3 * served + 1) == "ok":  # one at a time, until refused
        served += 1
    assert served >= 2
    await rig.record([], total=served)  # billing records what the gateway published
    r = aioredis.from_url(redis_url)
    try:
        await r.flushdb()  # Redis lost every counter
    finally:
        await r.aclose()
    # The same request is refused again: its budget came back from billing's records.
    assert await ask(client, 3 * served + 1) == "insufficient_quota"
    events = await usage_events(p, served)
    spent = sum((cost(e.prompt_tokens, e.completion_tokens, PRICE_IN, PRICE_OUT)
                 for e in events), Decimal(0))
    assert len(events) == served and spent <= budget
