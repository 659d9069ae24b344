"""Event log benchmark: appends/s (single and batched), read_all events/s, projection catch-up.

Runs against an embedded PostgreSQL it starts itself (or DATABASE_URL with --external). Prints
figures; it is not a test. `python bench/eventlog.py [--events 50000] [--durable]`.
By default PostgreSQL runs with fsync off, as in the tests; `--durable` turns it on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from schemas.events import NodeHeartbeat, TenantCreated
from services.infra.db import Connection, create_pool
from services.infra.devstack import DevStack
from services.infra.event_stats import EventTypeStats
from services.infra.eventlog import EventLog
from services.infra.log_records import START, RecordedEvent
from services.infra.migrate import migrate
from services.infra.projections import Projection, ProjectionRunner


class LatestHeartbeat(Projection):
    """A row per node, upserted per batch: the shape of most real projections."""

    name = "bench_latest_heartbeat"
    tables = ("bench_latest_heartbeat",)
    event_types = ("node.heartbeat",)

    async def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        latest = {e.data["node_id"]: e for e in events}
        await conn.execute(
            """INSERT INTO bench_latest_heartbeat (node_id, sequence, health_score)
               SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::int[])
               ON CONFLICT (node_id) DO UPDATE SET sequence = EXCLUDED.sequence,
                   health_score = EXCLUDED.health_score""",
            list(latest), [e.event.sequence for e in latest.values()],  # type: ignore[attr-defined]
            [e.event.health_score for e in latest.values()])  # type: ignore[attr-defined]


def heartbeat(node: uuid.UUID, seq: int) -> NodeHeartbeat:
    return NodeHeartbeat(node_id=node, sequence=seq, health_score=80 + seq % 20,
                         vllm_healthy=True, num_requests_running=3, kv_cache_usage=0.4)


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>10,.0f}/s  ({n:,} in {seconds:.2f}s)"


async def bench(dsn: str, total: int, batch: int) -> None:
    pool = await create_pool(dsn, min_size=4, max_size=8)
    log = EventLog(pool)
    await pool.execute("CREATE TABLE IF NOT EXISTS bench_latest_heartbeat "
                       "(node_id uuid PRIMARY KEY, sequence bigint, health_score int)")
    nodes = [uuid.uuid4() for _ in range(200)]

    single = min(total // 10, 5000)
    t0 = time.perf_counter()
    for i in range(single):
        t = TenantCreated(tenant_id=uuid.uuid4(), name=f"t{i}")
        await log.append(t.stream, [t])
    t_single = time.perf_counter() - t0

    t0 = time.perf_counter()
    conc = 8

    async def worker(k: int) -> None:
        for i in range(k, single, conc):
            t = TenantCreated(tenant_id=uuid.uuid4(), name=f"c{i}")
            await log.append(t.stream, [t])

    await asyncio.gather(*(worker(k) for k in range(conc)))
    t_conc = time.perf_counter() - t0

    t0 = time.perf_counter()
    appended = 0
    seq = 0
    while appended < total:
        node = nodes[seq % len(nodes)]
        events = [heartbeat(node, seq * batch + j) for j in range(batch)]
        await log.append(events[0].stream, events)
        appended += batch
        seq += 1
    t_batch = time.perf_counter() - t0

    t0 = time.perf_counter()
    recorded = 0
    while recorded < total // 2:
        events = [heartbeat(nodes[j % len(nodes)], j) for j in range(batch)]
        recorded += len(await log.record(events))
    t_record = time.perf_counter() - t0

    count = await pool.fetchval("SELECT count(*) FROM events")
    t0 = time.perf_counter()
    after = START
    read = 0
    while True:
        page = await log.read_all(after, 1000)
        read += len(page.events)
        after = page.next
        if page.caught_up:
            break
    t_read = time.perf_counter() - t0

    t0 = time.perf_counter()
    decoded = 0
    after = START
    while True:
        page = await log.read_all(after, 1000)
        for e in page.events:
            _ = e.event
            decoded += 1
        after = page.next
        if page.caught_up:
            break
    t_decode = time.perf_counter() - t0

    stats = ProjectionRunner(log, EventTypeStats(), batch_size=2000)
    t0 = time.perf_counter()
    applied_stats = await stats.catch_up()
    t_stats = time.perf_counter() - t0

    latest = ProjectionRunner(log, LatestHeartbeat(), batch_size=2000)
    t0 = time.perf_counter()
    applied_latest = await latest.catch_up()
    t_latest = time.perf_counter() - t0
    scanned_latest = count

    print(f"event log benchmark — {count:,} events in the log, batches of {batch}")
    print(f"  append, one event per call, sequential   {rate(single, t_single)}")
    print(f"  append, one event per call, {conc} writers    {rate(single, t_conc)}")
    print(f"  append, batched ({batch} per call)          {rate(appended, t_batch)}")
    print(f"  record (NATS path, idempotent), batched  {rate(recorded, t_record)}")
    print(f"  read_all (rows, no decode)               {rate(read, t_read)}")
    print(f"  read_all + decode to typed events        {rate(decoded, t_decode)}")
    print(f"  projection catch-up: event_type_stats    {rate(applied_stats, t_stats)}")
    print(f"  projection catch-up: latest heartbeat    {rate(scanned_latest, t_latest)}"
          f"  [{applied_latest:,} applied]")
    print(f"  ratio batched/single appends: {(appended / t_batch) / (single / t_single):.1f}x;"
          f" catch-up/batched append: {(applied_stats / t_stats) / (appended / t_batch):.1f}x")
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--durable", action="store_true", help="fsync on")
    parser.add_argument("--external", action="store_true", help="use $DATABASE_URL")
    args = parser.parse_args()
    if args.external:
        asyncio.run(migrate(os.environ["DATABASE_URL"]))
        asyncio.run(bench(os.environ["DATABASE_URL"], args.events, args.batch))
        return
    with tempfile.TemporaryDirectory() as tmp:
        stack = DevStack(Path(tmp), durable=args.durable, redis=False, nats=False)
        stack.start()
        try:
            asyncio.run(migrate(stack.urls.database_url))
            asyncio.run(bench(stack.urls.database_url, args.events, args.batch))
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
