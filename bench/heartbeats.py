"""Heartbeat benchmark: N simulated nodes heartbeating into NATS, one monitor process.

    python bench/heartbeats.py [--nodes 100000] [--interval 15] [--duration 90] [--silent 20]

Starts embedded PostgreSQL, Redis and NATS and a real monitor (`python -m services.monitor`,
its own process). `--silent` nodes register through the monitor like real agents (NATS,
acknowledged), heartbeat, then go quiet; the other nodes are already known and active (their
cached status is seeded in Redis: a healthy node's heartbeat never touches PostgreSQL, which
is the path this measures). Every node sends one heartbeat per `--interval`, spread evenly.

Prints the monitor's throughput against the offered rate (heartbeats handled, from its
`monitor_heartbeats_total`, over heartbeats published), the monitor's CPU, and for each silent
node how long after the `--stale-after` mark (60 s) it was declared stale. Goal: every
heartbeat handled at 100,000 nodes, stale within 60 s + 5 s. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import msgspec
import nats
import redis.asyncio as aioredis

from schemas.commands import RegistrationAck
from schemas.events import NodeHeartbeat, NodeRegistered
from schemas.ids import uuid7
from schemas.subjects import node_ack_subject
from services.core.bus import Bus
from services.core.devstack import DevStack, die_with_parent, free_port
from services.core.migrate import migrate

TICK = 0.05


def heartbeat(node: uuid.UUID, seq: int) -> tuple[bytes, dict[str, str]]:
    """What an agent publishes: the event, with its id as JetStream's dedup header."""
    event = NodeHeartbeat(node_id=node, sequence=seq, health_score=90, vllm_healthy=True,
                          model_name="m", num_requests_running=2, num_requests_waiting=0,
                          kv_cache_usage=0.3)
    return msgspec.json.encode(event), {"Nats-Msg-Id": str(event.id)}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def handled(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("monitor_heartbeats_total "):
                return float(line.split()[1])
    return 0.0


async def register(nc: nats.NATS, nodes: list[uuid.UUID]) -> None:
    """As agents do: publish node.registered, wait for the monitor's acknowledgment."""
    js = nc.jetstream()
    for node in nodes:
        event = NodeRegistered(node_id=node, cluster_name=f"bench-{node.hex[:8]}",
                               provider="aws", region="us-east-1", instance_type="g5.xlarge",
                               gpu_type="A10G", vram_total_gb=24, model_name="m",
                               endpoint_url="http://192.0.2.1:8000", spot_instance=False)
        sub = await nc.subscribe(node_ack_subject(node), max_msgs=1)
        await js.publish(event.subject, msgspec.json.encode(event),
                         headers={"Nats-Msg-Id": str(event.id)})
        msg = await sub.next_msg(timeout=30)
        assert msgspec.json.decode(msg.data, type=RegistrationAck).accepted


async def run(args: argparse.Namespace, urls: dict[str, str]) -> None:
    n = args.nodes
    silent = [uuid7() for _ in range(args.silent)]
    quiet = [uuid.uuid4() for _ in range(n - args.silent)]
    redis = aioredis.from_url(urls["redis"])
    # Known, active nodes: what the monitor would have cached when they went active.
    async with redis.pipeline(transaction=False) as pipe:
        for node in quiet:
            pipe.set(f"node:{node}:status", "active", ex=3600)
        await pipe.execute()

    port = free_port()
    env = {**os.environ, "DATABASE_URL": urls["database"], "REDIS_URL": urls["redis"],
           "NATS_URL": urls["nats"], "HTTP_PORT": str(port), "LOG_LEVEL": "warning",
           "STALE_AFTER_SECONDS": str(args.stale_after), "SWEEP_EVERY_SECONDS": "1",
           "PROBE_EVERY_SECONDS": "3600"}
    monitor = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.monitor", env=env, preexec_fn=die_with_parent)
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                await asyncio.to_thread(handled, metrics_url)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("monitor did not start") from None
                await asyncio.sleep(0.2)
        nc = await nats.connect(urls["nats"], pending_size=256 * 1024 * 1024)
        await register(nc, silent)
        print(f"{n:,} nodes ({len(silent)} registered through the monitor, then silent after "
              f"{args.silent_after:.0f}s); one heartbeat per node every {args.interval:g}s "
              f"= {n / args.interval:,.0f}/s offered; {args.duration:.0f}s run")

        everyone = silent + quiet
        silent_ids = frozenset(silent)
        payload_seq = 0
        published = 0
        last_beat: dict[uuid.UUID, float] = {}
        started = time.monotonic()
        cpu0, handled0, t_measure0 = (cpu_seconds(monitor.pid),
                                      await asyncio.to_thread(handled, metrics_url), started)
        per_tick = n * TICK / args.interval
        owed = 0.0
        cursor = 0
        stale_at: dict[uuid.UUID, float] = {}
        next_tick = started
        while (now := time.monotonic()) - started < args.duration:
            owed += per_tick
            count = int(owed)
            owed -= count
            payload_seq += 1
            for _ in range(count):
                node = everyone[cursor]
                cursor = (cursor + 1) % n
                if node in silent_ids and now - started >= args.silent_after:
                    continue  # gone quiet
                data, headers = heartbeat(node, payload_seq)
                await nc.publish(f"node.heartbeat.{node}", data, headers=headers)
                published += 1
                if node in silent_ids:
                    last_beat[node] = now
            if now - started >= args.silent_after:
                for node in silent:
                    if node not in stale_at and node in last_beat and \
                            await redis.get(f"node:{node}:status") == b"stale":
                        stale_at[node] = time.monotonic()
            next_tick += TICK
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
        await nc.flush()
        await asyncio.sleep(1)  # the last heartbeats in flight
        elapsed = time.monotonic() - t_measure0
        done = await asyncio.to_thread(handled, metrics_url) - handled0
        cpu = cpu_seconds(monitor.pid) - cpu0

        # The rest of the silent nodes, if the run ended before their mark.
        wait_until = max(last_beat.values(), default=started) + args.stale_after + 15
        while len(stale_at) < len(last_beat) and time.monotonic() < wait_until:
            for node in last_beat:
                if node not in stale_at and await redis.get(f"node:{node}:status") == b"stale":
                    stale_at[node] = time.monotonic()
            await asyncio.sleep(0.1)
        await nc.close()

        print(f"  published   {published:>10,} heartbeats  {published / elapsed:>9,.0f}/s")
        print(f"  handled     {int(done):>10,} heartbeats  {done / elapsed:>9,.0f}/s  "
              f"({done / max(published, 1):.3f} of published)")
        print(f"  monitor CPU {cpu / elapsed:>10.0%} of one core "
              f"({cpu / max(done, 1) * 1e6:.0f} µs per heartbeat)")
        lags = [stale_at[node] - (last_beat[node] + args.stale_after)
                for node in last_beat if node in stale_at]
        missed = len(last_beat) - len(lags)
        if lags:
            print(f"  stale after the {args.stale_after:g}s mark: min {min(lags):.2f}s  "
                  f"median {statistics.median(lags):.2f}s  max {max(lags):.2f}s  "
                  f"({len(lags)} of {len(last_beat)} silent nodes)")
        if missed:
            print(f"  NOT declared stale: {missed} silent node(s)")
    finally:
        monitor.terminate()
        await asyncio.wait_for(monitor.wait(), 15)
        await redis.aclose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=100_000)
    p.add_argument("--interval", type=float, default=15.0)
    p.add_argument("--duration", type=float, default=90.0)
    p.add_argument("--silent", type=int, default=20)
    p.add_argument("--silent-after", type=float, default=10.0)
    p.add_argument("--stale-after", type=float, default=60.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="crosslogic-bench-") as tmp:
        stack = DevStack(Path(tmp))
        urls = stack.start()
        try:
            asyncio.run(migrate(urls.database_url))

            async def streams() -> None:
                bus = await Bus.connect(urls.nats_url, name="bench")
                try:
                    await bus.ensure_streams()
                finally:
                    await bus.close()

            asyncio.run(streams())
            asyncio.run(run(args, {"database": urls.database_url, "redis": urls.redis_url,
                                   "nats": urls.nats_url}))
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
