"""Billing benchmark: usage records ingested per second.

Runs against an embedded PostgreSQL and NATS it starts itself (or DATABASE_URL / NATS_URL with
--external). Two figures, each from the billing service as it runs (recorder + priced events
into the log + projection `usage_records`/`usage_hourly`), counted when the rows are in
usage_records:

- backlog: N `usage.recorded` events already in JetStream when billing starts (catching up
  after an outage);
- live: events published by another process while billing runs (as gateways publish them),
  end to end: from the first publish to the last row.

`python bench/billing.py [--events 20000]`. Prints figures; it is not a test.

It empties what it runs against (usage and log tables TRUNCATEd, every JetStream stream
deleted): with --external it refuses a database whose event log holds anything, or a NATS
with messages in a stream, unless --i-know-this-wipes is given.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import asyncpg
from aiohttp import web

from schemas.events import UsageRecorded
from services.billing.app import create_billing_app
from services.billing.settings import BillingSettings
from services.domain.catalog import Catalog
from services.infra.bus import Bus
from services.infra.db import create_pool
from services.infra.devstack import DevStack
from services.infra.eventlog import EventLog
from services.infra.migrate import migrate
from services.infra.natsauth.identities import Role
from services.infra.settings import Secret

MODEL = "bench-model"

Owner = tuple[uuid.UUID, uuid.UUID, uuid.UUID]
"""(tenant, environment, API key): billing bills only ids the catalog has, together."""


def usage(owners: list[Owner], i: int) -> UsageRecorded:
    tenant, environment, key = owners[i % len(owners)]
    return UsageRecorded(request_id=f"bench-{uuid.uuid4()}", tenant_id=tenant,
                         environment_id=environment, api_key_id=key, model=MODEL,
                         endpoint="chat", region="us-east-1", node_id=None,
                         prompt_tokens=100 + i % 900, completion_tokens=10 + i % 300,
                         latency_ms=12.0, occurred_at=datetime.now(UTC))


async def publish(bus: Bus, events: list[UsageRecorded]) -> None:
    for i in range(0, len(events), 500):
        await asyncio.gather(*(bus.publish(e) for e in events[i:i + 500]))


def creds(auth_dir: Path, role: Role) -> str:
    """Each part connects as the identity it has in production."""
    return (auth_dir / "creds" / f"{role.value}.creds").read_text()


def gateway_process(nats_url: str, gateway_creds: str, owners: list[Owner], total: int,
                    ready: EventType, go: EventType) -> None:
    """A separate process publishing usage, as gateways do (not competing with billing for
    this process's CPU). It connects and builds its events, says `ready`, waits for `go`."""

    async def run() -> None:
        bus = await Bus.connect(nats_url, name="bench-gateway", creds=gateway_creds)
        events = [usage(owners, i) for i in range(total)]
        ready.set()
        await asyncio.to_thread(go.wait)
        await publish(bus, events)
        await bus.close()

    asyncio.run(run())


async def count(pool: asyncpg.Pool[asyncpg.Record]) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM usage_records"))


async def wait_for(pool: asyncpg.Pool[asyncpg.Record], n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while await count(pool) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {await count(pool)} of {n} records after {timeout}s")
        await asyncio.sleep(0.02)


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>10,.0f} records/s  ({n:,} in {seconds:.2f}s)"


def wipe_refusal(logged_events: int, stream_messages: Mapping[str, int]) -> str | None:
    """Why the benchmark must not run on these servers (None: they are empty). It TRUNCATEs
    the log and deletes every stream: on anything that holds data, that is data lost."""
    held = [f"the event log holds {logged_events:,} events"] if logged_events else []
    held += [f"stream {name} holds {n:,} messages"
             for name, n in sorted(stream_messages.items()) if n]
    if not held:
        return None
    return ("refusing to run: this benchmark wipes the database and NATS it is given, and "
            + "; ".join(held) + ". Point DATABASE_URL / NATS_URL at empty servers, or pass "
            "--i-know-this-wipes.")


async def check_empty(dsn: str, nats_url: str, auth_dir: Path) -> str | None:
    """`wipe_refusal` for the servers at `dsn` and `nats_url`, read without changing them."""
    conn = await asyncpg.connect(dsn)
    try:
        logged = 0
        if await conn.fetchval("SELECT to_regclass('events') IS NOT NULL"):
            logged = int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()
    bus = await Bus.connect(nats_url, name="bench-check", creds=creds(auth_dir, Role.ADMIN))
    try:
        streams = {info.config.name or "?": info.state.messages
                   for info in await bus.js.streams_info()}
    finally:
        await bus.close()
    return wipe_refusal(logged, streams)


async def bench(dsn: str, nats_url: str, total: int, auth_dir: Path) -> None:
    pool = await create_pool(dsn, min_size=1, max_size=4)
    await pool.execute("TRUNCATE usage_records, usage_hourly, events, streams, checkpoints, "
                       "models, tenants, environments, api_keys")
    catalog = Catalog(EventLog(pool))
    await catalog.create_model(
        MODEL, family="bench", vram_gb=16, input_price_per_million=Decimal("0.15"),
        output_price_per_million=Decimal("0.60"), context_length=8192)
    bus = await Bus.connect(nats_url, name="bench", creds=creds(auth_dir, Role.ADMIN))
    for info in await bus.js.streams_info():
        if info.config.name:
            await bus.js.delete_stream(info.config.name)
    await bus.ensure_streams()
    owners: list[Owner] = []
    for i in range(50):
        tenant = await catalog.create_tenant(f"bench-{i}")
        environment = await catalog.create_environment(tenant, "production", "us-east-1")
        owners.append((tenant, environment,
                       (await catalog.create_api_key(environment)).key_id))
    settings = BillingSettings(database_url=Secret(dsn), nats_url=Secret(nats_url),
                               nats_creds=Secret(creds(auth_dir, Role.BILLING)), log_json=False,
                               log_level="warning", event_poll_interval=0.2)

    backlog = [usage(owners, i) for i in range(total)]
    await publish(bus, backlog)
    runner = web.AppRunner(create_billing_app(settings), shutdown_timeout=1.0)
    t0 = time.perf_counter()
    await runner.setup()
    await wait_for(pool, total)
    t_backlog = time.perf_counter() - t0

    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    gateway = ctx.Process(target=gateway_process,
                          args=(nats_url, creds(auth_dir, Role.GATEWAY), owners, total,
                                ready, go))
    gateway.start()
    await asyncio.to_thread(ready.wait)  # its start-up is not measured
    t0 = time.perf_counter()
    go.set()
    await wait_for(pool, 2 * total)
    t_live = time.perf_counter() - t0
    await asyncio.to_thread(gateway.join)
    await runner.cleanup()

    hourly = await pool.fetchval("SELECT sum(requests) FROM usage_hourly")
    assert hourly == 2 * total, (hourly, total)
    print(f"usage records ingested, backlog in JetStream: {rate(total, t_backlog)}")
    print(f"usage records ingested, live (a gateway process publishing): "
          f"{rate(total, t_live)}")
    await bus.close()
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--external", action="store_true",
                        help="use $DATABASE_URL, $NATS_URL (they must be empty: they are "
                             "wiped) and the NATS authority in $NATS_AUTH_DIR")
    parser.add_argument("--i-know-this-wipes", action="store_true",
                        help="with --external: run even though the servers hold data, which "
                             "is deleted")
    args = parser.parse_args()
    if args.external:
        auth_dir = Path(os.environ["NATS_AUTH_DIR"])
        if not args.i_know_this_wipes:
            refusal = asyncio.run(check_empty(os.environ["DATABASE_URL"],
                                              os.environ["NATS_URL"], auth_dir))
            if refusal:
                raise SystemExit(refusal)
        asyncio.run(migrate(os.environ["DATABASE_URL"]))
        asyncio.run(bench(os.environ["DATABASE_URL"], os.environ["NATS_URL"], args.events,
                          auth_dir))
        return
    with tempfile.TemporaryDirectory() as tmp:
        stack = DevStack(Path(tmp), redis=False)
        stack.start()
        try:
            asyncio.run(migrate(stack.urls.database_url))
            assert stack.nats is not None
            asyncio.run(bench(stack.urls.database_url, stack.urls.nats_url, args.events,
                              stack.nats.auth_dir))
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
