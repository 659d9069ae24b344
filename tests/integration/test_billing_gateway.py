"""The whole path, at volume: requests through the real gateway (simulated GPU node) → NATS →
billing → Stripe Meter Events. Over thousands of requests, streamed and not, many at once: the
requests the gateway answered = usage_records = what Stripe received, token for token.
(About 15 s here: the requests go 48 at a time.)"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from openai import AsyncOpenAI

from tests.integration.gateway_fixtures import MODEL, Platform
from tests.integration.gateway_fixtures import platform as platform
from tests.integration.test_billing_stripe import IN, OUT, BillingRig
from tests.integration.test_billing_stripe import rig as rig

REQUESTS = 1500
CONCURRENCY = 48
STREAMED_EVERY = 4
"""Every fourth request is streamed (usage from the stream's last chunk)."""


def prompt(i: int) -> list[dict[str, str]]:
    # Prompts of different lengths, so prompt tokens vary too.
    return [{"role": "user", "content": "Count the tokens of this request, please. " * (1 + i % 5)}]


async def ask(client: AsyncOpenAI, i: int) -> tuple[int, int]:
    """One request; the (prompt, completion) tokens the gateway reported to the client."""
    max_tokens = 3 + i % 7
    if i % STREAMED_EVERY:
        answer = await client.chat.completions.create(
            model=MODEL, messages=prompt(i), max_tokens=max_tokens)  # type: ignore[arg-type]
        assert answer.usage is not None
        return answer.usage.prompt_tokens, answer.usage.completion_tokens
    stream = await client.chat.completions.create(
        model=MODEL, messages=prompt(i), max_tokens=max_tokens,  # type: ignore[arg-type]
        stream=True, stream_options={"include_usage": True})
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None
    return usage.prompt_tokens, usage.completion_tokens


async def test_gateway_requests_reach_stripe_exactly(platform: Platform,
                                                    rig: BillingRig) -> None:
    await platform.start_gateway()
    await platform.add_node()
    await platform.routable(1)
    customer = await rig.link(platform.tenant_id)

    client = platform.client()
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> tuple[int, int]:
        async with gate:
            return await ask(client, i)

    answers = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    prompt_tokens = sum(p for p, _ in answers)
    completion_tokens = sum(c for _, c in answers)
    assert completion_tokens == sum(3 + i % 7 for i in range(REQUESTS))
    assert len({p for p, _ in answers}) > 1

    # The requests happened this hour: the pusher is run an hour ahead, so it is closed.
    await rig.record([], total=REQUESTS)  # billing records what the gateway published
    ahead = timedelta(hours=1)
    await rig.start(clock=lambda: datetime.now(UTC) + ahead)
    await rig.all_exported(until=datetime.now(UTC) + ahead)

    row = await rig.pool.fetchrow(
        "SELECT count(*) AS n, count(DISTINCT request_id) AS ids, sum(prompt_tokens) AS p, "
        "sum(completion_tokens) AS c FROM usage_records WHERE tenant_id = $1",
        platform.tenant_id)
    assert (row["n"], row["ids"], row["p"], row["c"]) == (
        REQUESTS, REQUESTS, prompt_tokens, completion_tokens)
    assert await platform.usage_in_stream() == REQUESTS  # published once each
    hourly = await rig.pool.fetchrow(
        "SELECT sum(requests) AS n, sum(prompt_tokens) AS p, sum(completion_tokens) AS c "
        "FROM usage_hourly WHERE tenant_id = $1", platform.tenant_id)
    assert (hourly["n"], hourly["p"], hourly["c"]) == (REQUESTS, prompt_tokens,
                                                       completion_tokens)
    state = rig.stripe.state
    assert (state.total(IN, customer), state.total(OUT, customer)) == (prompt_tokens,
                                                                       completion_tokens)
    identifiers = [c.identifier for c in state.calls]
    # One hour, or two when the run straddled an hour's end: one meter event per meter each.
    assert len(identifiers) == len(set(identifiers)) in (2, 4)
