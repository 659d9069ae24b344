"""The whole path, smaller: requests through the real gateway (simulated GPU node) → NATS →
billing → Stripe Meter Events. Tokens the gateway reported to clients = usage_records =
what Stripe received."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from tests.integration.gateway_fixtures import MODEL, Platform
from tests.integration.gateway_fixtures import platform as platform
from tests.integration.test_billing_stripe import IN, OUT, BillingRig
from tests.integration.test_billing_stripe import rig as rig

HELLO = [{"role": "user", "content": "Count the tokens of this request, please."}]


async def test_gateway_requests_reach_stripe_exactly(platform: Platform,
                                                    rig: BillingRig) -> None:
    await platform.start_gateway()
    await platform.add_node()
    await platform.routable(1)
    customer = await rig.link(platform.tenant_id)

    client = platform.client()
    answers = await asyncio.gather(*(
        client.chat.completions.create(model=MODEL, messages=HELLO,  # type: ignore[arg-type]
                                       max_tokens=3 + i % 7) for i in range(24)))
    prompt = sum(a.usage.prompt_tokens for a in answers if a.usage)
    completion = sum(a.usage.completion_tokens for a in answers if a.usage)
    assert completion == sum(3 + i % 7 for i in range(24))

    # The requests happened this hour: the pusher is run an hour ahead, so it is closed.
    await rig.record([], total=24)  # billing records what the gateway published
    ahead = timedelta(hours=1)
    await rig.start(clock=lambda: datetime.now(UTC) + ahead)
    await rig.all_exported(until=datetime.now(UTC) + ahead)

    row = await rig.pool.fetchrow(
        "SELECT count(*) AS n, sum(prompt_tokens) AS p, sum(completion_tokens) AS c "
        "FROM usage_records WHERE tenant_id = $1", platform.tenant_id)
    assert (row["n"], row["p"], row["c"]) == (24, prompt, completion)
    state = rig.stripe.state
    assert (state.total(IN, customer), state.total(OUT, customer)) == (prompt, completion)
    identifiers = [c.identifier for c in state.calls]
    assert len(identifiers) == len(set(identifiers)) == 2
