"""Spend budgets through the real gateway (issue 21, work in progress): two gateway processes'
worth of apps, many requests at once (whole and streamed, with and without max_tokens)
against a small budget. What was spent never passes it; a refusal is OpenAI's
`insufficient_quota`, naming the budget and when it resets."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from schemas.events import UsageRecorded
from services.domain.budgets import Period, nano, period_bounds
from services.domain.pricing import cost
from services.gateway.gateway import BUDGET_RECONCILER
from services.infra.devstack import free_port
from tests.helpers import eventually
from tests.integration.gateway_fixtures import MODEL, Platform, usage_events
from tests.integration.gateway_fixtures import platform as platform
from tests.integration.test_billing_stripe import BillingRig
from tests.integration.test_billing_stripe import rig as rig
from tests.integration.test_gateway_resilience import (
    _all,
    _both_route,
    serving,
    start_gateway_process,
)

PRICE_IN, PRICE_OUT = Decimal("0.10"), Decimal("0.20")  # the platform fixture's model


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


def body_of(i: int) -> dict[str, Any]:
    """Request `i` of a mix: streamed or whole, with a small max_tokens or none (vLLM then
    generates up to the context: the worst case is the whole context)."""
    body: dict[str, Any] = {"model": MODEL,
                            "messages": [{"role": "user", "content": f"Spend {i} on me."}]}
    if i % 3:
        body["max_tokens"] = 6 + i % 5
    if i % 2:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


@dataclass
class Answer:
    status: int
    raw: bytes
    """The request body as sent: its bytes bound its prompt."""
    headers: dict[str, str]
    text: bytes


async def send(s: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any]) -> Answer:
    raw = json.dumps(body).encode()
    async with s.post(f"{url}/v1/chat/completions", data=raw, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/json"}) as r:
        return Answer(r.status, raw, dict(r.headers), await r.read())


def least_cost(raw: bytes) -> int:
    """The least a request can run with, in nano-dollars: its prompt bound (a token a byte)
    and one output token."""
    return nano(cost(len(raw), 1, PRICE_IN, PRICE_OUT))


def well_formed(answer: Answer) -> None:
    """A stream ends with usage and [DONE]; a budget-limited answer stops at its limit."""
    limit = answer.headers.get("x-budget-max-tokens")
    if answer.raw.find(b'"stream": true') < 0:
        done = json.loads(answer.text)
        assert limit is None or done["usage"]["completion_tokens"] <= int(limit)
        return
    events = [line[6:] for line in answer.text.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]", answer.text[-200:]
    chunks = [json.loads(e) for e in events[:-1]]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert reasons[-1] in ("stop", "length")
    usage = chunks[-1]["usage"]
    if limit is not None:
        assert usage["completion_tokens"] <= int(limit)
        if usage["completion_tokens"] == int(limit):
            assert reasons[-1] == "length"


async def test_a_key_budget_holds_across_two_gateway_processes(platform: Platform,
                                                               redis_url: str) -> None:
    """Demand well above a key's budget, from two gateway processes at once, then one at a
    time until the budget refuses with nothing in flight: what was billed never passes the
    budget, and ends within the refused request's least cost of it."""
    p = platform
    budget = Decimal("0.0002")
    budgeted = await p.catalog.create_api_key(p.environment_id)
    await p.catalog.set_budget("key", budgeted.key_id, budget, Period("day"))
    await p.add_node()
    ports = [free_port(), free_port()]
    procs = [await start_gateway_process(p, port) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    r = aioredis.from_url(redis_url)
    try:
        async with aiohttp.ClientSession() as s:
            await eventually(lambda: _all(serving(s, u) for u in urls), timeout=30,
                             what="both gateways ready")
            await eventually(lambda: _both_route(s, urls, p.key.plaintext), timeout=30,
                             what="both gateways route")
            answers = list(await asyncio.gather(*(
                send(s, urls[i % 2], budgeted.plaintext, body_of(i)) for i in range(60))))
            assert {a.status for a in answers} == {200, 429}  # demand was above the budget
            i = 60
            while True:  # one at a time until refused with nothing in flight
                answer = await send(s, urls[i % 2], budgeted.plaintext, body_of(i))
                answers.append(answer)
                i += 1
                if answer.status == 200:
                    continue
                served = [a for a in answers if a.status == 200]
                spent = await billed(p, budgeted.key_id, len(served))

                async def settled(spent: Decimal = spent) -> bool:
                    key = f"budget:key:{budgeted.key_id}:{{{p.tenant_id}}}"
                    return int(await r.hget(key, "n") or 0) == nano(spent)

                await eventually(settled, timeout=30, what="every request settled")
                again = await send(s, urls[i % 2], budgeted.plaintext, body_of(i - 1))
                if again.status != 200:
                    break
                answers.append(again)
    finally:
        await r.aclose()
        for proc in procs:
            proc.terminate()
            await proc.wait()
    refusal = json.loads(answer.text)["error"]
    assert refusal["type"] == "insufficient_quota", refusal
    served = [a for a in answers if a.status == 200]
    for a in served:
        well_formed(a)
    limited = [a for a in served if "x-budget-max-tokens" in a.headers]
    assert limited  # a request without max_tokens never fits this budget whole
    assert {a.status for a in answers} == {200, 429}
    assert spent <= budget, (spent, budget)
    assert nano(budget - spent) < least_cost(answer.raw), (spent, budget)


async def billed(p: Platform, key_id: uuid.UUID, served: int) -> Decimal:
    """What billing will charge the key's `served` answers (their usage events)."""
    async def recorded() -> list[UsageRecorded] | None:
        mine = [e for e in await usage_events(p, served) if e.api_key_id == key_id]
        return mine if len(mine) >= served else None

    events = await eventually(recorded, timeout=30, what=f"{served} usage events of the key")
    assert len(events) == served
    return sum((cost(e.prompt_tokens, e.completion_tokens, PRICE_IN, PRICE_OUT)
                for e in events), Decimal(0))


async def test_a_stream_stops_at_the_budget_well_formed_and_billed_what_was_sent(
        platform: Platform) -> None:
    """A budget that pays for the prompt and three tokens: a stream asking for no limit runs
    with three, ends as any stream at its limit, and is billed exactly what it was sent."""
    p = platform
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me everything."}],
            "stream": True, "stream_options": {"include_usage": True}}
    raw = json.dumps(body).encode()
    budget = cost(len(raw), 3, PRICE_IN, PRICE_OUT)
    await p.catalog.set_budget("key", p.key.key_id, budget, Period("day"))
    await p.start_gateway()
    await p.add_node()
    await p.routable(1)
    async with aiohttp.ClientSession() as s:
        answer = await send(s, p.gateway_url, p.key.plaintext, body)
        assert answer.status == 200
        assert answer.headers["x-budget-max-tokens"] == "3"
        well_formed(answer)
        events = [json.loads(line[6:]) for line in answer.text.split(b"\n")
                  if line.startswith(b"data: {")]
        assert events[-1]["usage"]["completion_tokens"] == 3
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
        refused = await send(s, p.gateway_url, p.key.plaintext, body)
        assert refused.status == 429
    [event] = await usage_events(p, 1)
    assert (event.prompt_tokens, event.completion_tokens) == \
        (events[-1]["usage"]["prompt_tokens"], 3)
    assert cost(event.prompt_tokens, 3, PRICE_IN, PRICE_OUT) <= budget
    assert p.gw.metrics.budget_limited.labels("chat")._value.get() == 1


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
        await r.flushdb()  # Redis lost every counter (a restart without persistence)...
        await r.script_flush()  # ...and the scripts the gateway had loaded
    finally:
        await r.aclose()
    # The same request is refused again: its budget came back from billing's records.
    assert await ask(client, 3 * served + 1) == "insufficient_quota"
    events = await usage_events(p, served)
    spent = sum((cost(e.prompt_tokens, e.completion_tokens, PRICE_IN, PRICE_OUT)
                 for e in events), Decimal(0))
    assert len(events) == served and spent <= budget


async def test_the_reconciler_raises_a_counter_below_billing_and_counts_the_drift(
        platform: Platform, rig: BillingRig, redis_url: str) -> None:
    """Redis lost writes (a failover to a replica that was behind): the counter holds less
    than billing recorded. One gateway takes the turn, raises the counter to the records and
    counts the drift; a counter above them (requests in flight) is kept."""
    p = platform
    await p.catalog.set_budget("environment", p.environment_id, Decimal("0.01"), Period("day"))
    # An hour's interval: the gateway's own turn never comes during the test, and the turn
    # taken below lasts (an interval of 0 would make it lapse within a millisecond).
    await p.start_gateway(budget_reconcile_seconds=3600)
    await p.add_node()
    await p.routable(1)
    client = p.client()
    for i in range(3):
        assert await ask(client, 3 * i + 1) == "ok"
    await rig.record([], total=3)
    spent = await billed(p, p.key.key_id, 3)
    key = f"budget:env:{p.environment_id}:{{{p.tenant_id}}}"
    r = aioredis.from_url(redis_url)
    try:
        async def settled() -> bool:
            return int(await r.hget(key, "n") or 0) == nano(spent)

        await eventually(settled, timeout=30, what="the counter settled")
        await r.hincrby(key, "n", -1234)  # lost writes
        reconciler = p.gateway_app[BUDGET_RECONCILER]
        assert await reconciler.take_turn()
        assert not await reconciler.take_turn()  # one gateway per interval
        assert await reconciler.reconcile_once(datetime.now(UTC)) == 1234
        assert int(await r.hget(key, "n") or 0) == nano(spent)
        assert p.gw.limiter.metrics.budget_drift.labels("reconcile")._value.get() == 1234
        await r.hincrby(key, "n", 5000)  # a reservation in flight: not billed yet
        assert await reconciler.reconcile_once(datetime.now(UTC)) == 0
        assert int(await r.hget(key, "n") or 0) == nano(spent) + 5000
    finally:
        await r.aclose()


async def test_a_tenant_reads_the_budgets_over_its_key_and_what_each_has_spent(
        platform: Platform, rig: BillingRig) -> None:
    """GET /v1/budgets: the key's own budget, its environment's and its tenant's, each with
    its current period and what billing recorded in it; another key of the tenant sees the
    environment's and tenant's only."""
    p = platform
    await p.catalog.set_budget("key", p.key.key_id, Decimal("0.5"), Period("day"))
    anchor = datetime(2026, 11, 2, 6, tzinfo=UTC)
    await p.catalog.set_budget("environment", p.environment_id, Decimal("3"),
                               Period("days", 7, anchor))
    await p.catalog.set_budget("tenant", p.tenant_id, Decimal("100"), Period("month"))
    sibling = await p.catalog.create_api_key(p.environment_id)
    await p.start_gateway()
    await p.add_node()
    await p.routable(1)
    assert await ask(p.client(), 1) == "ok"
    await rig.record([], total=1)
    spent = await billed(p, p.key.key_id, 1)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{p.gateway_url}/v1/budgets",
                         headers={"Authorization": f"Bearer {p.key.plaintext}"}) as r:
            assert r.status == 200
            body = await r.json()
        async with s.get(f"{p.gateway_url}/v1/budgets",
                         headers={"Authorization": f"Bearer {sibling.plaintext}"}) as r:
            theirs = await r.json()
    assert body["object"] == "list"
    views = {v["scope"]: v for v in body["data"]}
    assert set(views) == {"key", "environment", "tenant"}
    key, env, tenant = views["key"], views["environment"], views["tenant"]
    assert (key["scope_id"], key["amount"], key["period"]) == \
        (str(p.key.key_id), "0.500000000", "day")
    assert key["spent"] == f"{spent:.9f}" == env["spent"] == tenant["spent"]
    assert Decimal(key["remaining"]) == Decimal("0.5") - spent
    start, end = period_bounds(Period("days", 7, anchor), datetime.now(UTC))
    assert (env["every_days"], env["anchor"]) == (7, "2026-11-02T06:00:00Z")
    assert (env["period_start"], env["period_end"]) == (
        f"{start:%Y-%m-%dT%H:%M:%SZ}", f"{end:%Y-%m-%dT%H:%M:%SZ}")
    assert tenant["currency"] == "usd" and tenant["every_days"] is None
    assert {v["scope"] for v in theirs["data"]} == {"environment", "tenant"}


async def test_a_killed_gateways_reservation_comes_back_to_the_budget(
        platform: Platform) -> None:
    """A stream without max_tokens takes all that is left of a key's budget on a gateway
    that is then killed (SIGKILL: nothing settles). Once its lease expires, the key's next
    request on another gateway gives the money back and is admitted again."""
    p = platform
    budgeted = await p.catalog.create_api_key(p.environment_id)
    await p.catalog.set_budget("key", budgeted.key_id, Decimal("0.001"), Period("day"))
    await p.add_node(inter_token_latency=0.05)
    port = free_port()
    proc = await start_gateway_process(p, port, CONCURRENCY_LEASE_SECONDS="2")
    url = f"http://127.0.0.1:{port}"
    # A second gateway, in-process, sharing Redis; its reconciler off: the key's own next
    # request is what gives the money back here (the reconciler's sweep: test_ratelimit_budgets).
    await p.start_gateway(budget_reconcile_seconds=0)
    await p.routable(1)
    whole = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with aiohttp.ClientSession() as s:
            await eventually(lambda: serving(s, url), timeout=30, what="gateway ready")
            await eventually(lambda: _both_route(s, [url], p.key.plaintext), timeout=30,
                             what="gateway routes")
            doomed = asyncio.create_task(send(s, url, budgeted.plaintext, {
                **whole, "stream": True, "max_tokens": 8000}))

            async def budget_taken() -> bool:
                return (await send(s, p.gateway_url, budgeted.plaintext,
                                   {**whole, "max_tokens": 4})).status == 429

            await eventually(budget_taken, timeout=30, what="the budget is held")
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await asyncio.gather(doomed, return_exceptions=True)

            async def budget_back() -> bool:
                return (await send(s, p.gateway_url, budgeted.plaintext,
                                   {**whole, "max_tokens": 4})).status == 200

            await eventually(budget_back, timeout=60, what="the dead reservation given back")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
