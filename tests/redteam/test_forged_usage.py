"""A leaked gateway credential (the only one NATS lets publish usage) lies to billing: a price
of its own, negative included; token counts no request could have; another tenant's key, an
unknown one, an environment of someone else. Billing prices from the catalog, parks the rest
in the dead letters and counts them; nothing of it is billed."""

from __future__ import annotations

import uuid
from decimal import Decimal

import asyncpg
import msgspec
from aiohttp import web

from schemas.events import UsagePrice
from services.domain.pricing import cost
from services.infra.bus import Bus
from services.infra.natsauth.identities import Role
from tests.conftest import Servers
from tests.helpers import UsageOwner, eventually, usage_owner
from tests.integration.test_billing_usage import records, refused, usage


async def test_a_price_on_incoming_usage_is_ignored(servers: Servers, billing: web.Application,
                                                    pool: asyncpg.Pool,
                                                    owner: UsageOwner) -> None:
    """Published with the gateways' own credential, carrying a price of its own (a refund):
    billed at the catalog's price all the same."""
    gateway = await Bus.connect(servers.nats_url, name="gateway",
                                creds=servers.creds(Role.GATEWAY))
    try:
        cheap = msgspec.structs.replace(usage("req-priced", owner), price=UsagePrice(
            input_price_per_million=Decimal(0), output_price_per_million=Decimal(0),
            region_multiplier=Decimal(0), cost=Decimal("-1000")))
        await gateway.publish(cheap)
        (row,) = await records(pool, 1)
    finally:
        await gateway.close()
    assert row["cost"] == cost(123, 456, Decimal("0.15"), Decimal("0.60"))
    logged = await pool.fetchval("SELECT data FROM events WHERE type = 'usage.recorded'")
    assert Decimal(logged["price"]["input_price_per_million"]) == Decimal("0.15")
    assert logged["price"]["cost"] == str(row["cost"])


async def test_implausible_or_foreign_usage_is_parked_and_never_billed(
        servers: Servers, billing: web.Application, bus: Bus, pool: asyncpg.Pool,
        owner: UsageOwner) -> None:
    """Negative or absurd token counts, an API key nobody has, another tenant's key, or an
    environment of another tenant: each parked in the dead letters, counted, billed to no
    one; the honest record among them is billed."""
    someone = await usage_owner(pool)
    crossed = await usage_owner(pool, owner.tenant_id)  # another environment of the tenant
    lies = {
        "negative": (usage("neg", owner, prompt=-5_000_000), "negative_tokens"),
        "absurd": (usage("big", owner, completion=10**12), "too_many_tokens"),
        "no key": (msgspec.structs.replace(usage("nokey", owner), api_key_id=uuid.uuid4()),
                   "unknown_ids"),
        "no tenant": (msgspec.structs.replace(usage("notenant", owner),
                                              tenant_id=(t := uuid.uuid4()),
                                              stream=f"usage:{t}"), "mismatched_ids"),
        "their key": (msgspec.structs.replace(usage("theirs", owner),
                                              api_key_id=someone.api_key_id), "mismatched_ids"),
        "other environment": (msgspec.structs.replace(usage("otherenv", owner),
                                                      environment_id=crossed.environment_id),
                              "mismatched_ids"),
    }
    gateway = await Bus.connect(servers.nats_url, name="gateway",
                                creds=servers.creds(Role.GATEWAY))
    try:
        for event, _ in lies.values():
            await gateway.publish(event)
        await gateway.publish(usage("honest", owner))

        async def parked() -> bool:
            return (await bus.js.stream_info("DLQ")).state.messages == len(lies)

        await eventually(parked, what="every lie in the dead letters")
        rows = await records(pool, 1)
    finally:
        await gateway.close()
    assert [r["request_id"] for r in rows] == ["honest"]
    assert await pool.fetchval("SELECT count(*) FROM events WHERE type = 'usage.recorded'") == 1
    expected: dict[str, int] = {}
    for _, reason in lies.values():
        expected[reason] = expected.get(reason, 0) + 1
    for reason, n in expected.items():
        assert refused(billing, reason) == n, reason
    info = await bus.js.stream_info("DLQ")
    errors = [(await bus.js.get_msg("DLQ", seq)).headers or {}
              for seq in range(info.state.first_seq, info.state.last_seq + 1)]
    assert all(h["Crosslogic-Error"].startswith("refused: ") for h in errors)
    assert all(h["Crosslogic-Original-Subject"].startswith("usage.recorded.") for h in errors)
