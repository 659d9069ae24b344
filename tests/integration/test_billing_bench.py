"""bench/billing.py --external wipes what it is pointed at (TRUNCATE of the log and usage
tables, every JetStream stream deleted): it must refuse servers that hold anything."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from bench.billing import check_empty, wipe_refusal
from services.domain.catalog import Catalog
from services.infra.bus import Bus
from services.infra.eventlog import EventLog
from tests.conftest import Servers
from tests.integration.test_billing_stripe import usage


def test_what_counts_as_holding_data() -> None:
    assert wipe_refusal(0, {}) is None
    assert wipe_refusal(0, {"USAGE": 0, "NODES": 0}) is None
    refusal = wipe_refusal(12, {"USAGE": 3, "NODES": 0})
    assert refusal is not None
    assert "12 events" in refusal and "USAGE holds 3" in refusal and "NODES" not in refusal
    assert "--i-know-this-wipes" in refusal


async def test_external_run_refuses_servers_with_data(servers: Servers, pool: asyncpg.Pool,
                                                      bus: Bus) -> None:
    assert await check_empty(servers.database_url, servers.nats_url, servers.auth_dir) is None
    catalog = Catalog(EventLog(pool), actor="test")
    await catalog.create_model("m", family="llama", vram_gb=16,
                               input_price_per_million=Decimal("0.15"),
                               output_price_per_million=Decimal("0.60"), context_length=8192)
    tenant = await catalog.create_tenant("keep-me")
    await bus.publish(usage(tenant, datetime.now(UTC), 1, 1))
    logged = await pool.fetchval("SELECT count(*) FROM events")

    env = {**os.environ, "DATABASE_URL": servers.database_url, "NATS_URL": servers.nats_url,
           "NATS_AUTH_DIR": str(servers.auth_dir)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "bench/billing.py", "--external", "--events", "10", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, (out, err)
    assert b"refusing to run" in err and b"--i-know-this-wipes" in err
    # Nothing was touched.
    assert await pool.fetchval("SELECT count(*) FROM events") == logged
    assert await pool.fetchval("SELECT name FROM tenants WHERE id = $1", tenant) == "keep-me"
    assert (await bus.js.stream_info("USAGE")).state.messages == 1
