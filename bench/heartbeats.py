"""Heartbeat benchmark: N GPU nodes, each connected to NATS as itself, heartbeating into one
monitor process.

    python bench/heartbeats.py [--nodes 100000] [--interval 15] [--duration 90] [--silent 20]

Starts embedded PostgreSQL, Redis and NATS (authentication on, as in production) and a real
monitor (`python -m services.monitor`, its own process, as the monitor identity). Every node
has its own credential, minted by the scoped node key as the orchestrator mints it, and its
own connection, on which NATS lets it say only `node.*.<its id>`:

- `--silent` nodes are launched (`node.launching` in the log, as the orchestrator records it:
  the monitor accepts only launched nodes), connect to the hub, register through the monitor
  like real agents (acknowledged), heartbeat, then go quiet;
- the other nodes are already known and active (their cached status is seeded in Redis: a
  healthy node's heartbeat never touches PostgreSQL, which is the path this measures). One
  nats-server may hold only as many connections as it may open files (20,000 here), so they
  connect through leaf servers, 17,000 each, as a fleet this large would in production
  (bench/nats_fleet.py); each leaf checks every node's credential and permissions itself.

Every node sends one heartbeat per `--interval`, spread evenly. Prints how long minting and
connecting the fleet took, the monitor's throughput against the offered rate (heartbeats
handled, from its `monitor_heartbeats_total`, over heartbeats published), the monitor's CPU,
and for each silent node how long after the `--stale-after` mark (60 s) it was declared stale.
Goal: every heartbeat handled at 100,000 nodes, stale within 60 s + 5 s. Not a test: figures
only.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats
import redis.asyncio as aioredis
from nats.aio.client import RawCredentials
from nats_fleet import LEAF_CONNECTIONS, LeafServer, Share, run_share, server_varz

from schemas.commands import RegistrationAck
from schemas.events import NodeHeartbeat, NodeLaunching, NodeRegistered
from schemas.ids import uuid7
from schemas.subjects import node_ack_subject
from services.domain.fleet import Fleet
from services.domain.node_hot_data import status_key
from services.infra.bus import Bus
from services.infra.db import create_pool
from services.infra.devstack import DevStack, NatsServer, free_port
from services.infra.eventlog import EventLog
from services.infra.migrate import migrate
from services.infra.natsauth.creds import Credentials
from services.infra.natsauth.identities import Role
from services.infra.processes import die_with_parent

TICK = 0.05


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def monitor_counts(metrics_url: str) -> dict[str, float]:
    """The monitor's counters, summed over their labels."""
    counts: dict[str, float] = {}
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line and not line.startswith("#"):
                name = line.split("{", 1)[0].split(" ", 1)[0]
                counts[name] = counts.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def handled(metrics_url: str) -> float:
    return monitor_counts(metrics_url).get("monitor_heartbeats_total", 0.0)


async def launch(database_url: str, nodes: list[uuid.UUID]) -> None:
    """What the orchestrator records before it asks the cloud for each node."""
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        fleet = Fleet(EventLog(pool), actor="bench")
        for node in nodes:
            await fleet.launching(NodeLaunching(
                node_id=node, deployment_id=None, cluster_name=f"bench-{node.hex[:8]}",
                model_name="m", provider="aws", region="us-east-1", gpu_type="A10G",
                spot=False, deadline=datetime.now(UTC) + timedelta(hours=1)))
    finally:
        await pool.close()


class SilentNode:
    """An agent that registers through the monitor, heartbeats, then goes quiet: its own
    credential, its own connection (nats-py, as the real agent)."""

    def __init__(self, node: uuid.UUID, creds: Credentials) -> None:
        self.id = node
        self.creds = creds
        self.nc: nats.NATS | None = None
        self.sequence = 0
        self.last_beat = 0.0

    async def register(self, url: str) -> None:
        self.nc = await nats.connect(url, user_credentials=RawCredentials(self.creds.text()),
                                     inbox_prefix=self.creds.inbox_prefix)
        event = NodeRegistered(node_id=self.id, cluster_name=f"bench-{self.id.hex[:8]}",
                               provider="aws", region="us-east-1", instance_type="g5.xlarge",
                               gpu_type="A10G", vram_total_gb=24, model_name="m",
                               endpoint_url="http://192.0.2.1:8000", spot_instance=False)
        sub = await self.nc.subscribe(node_ack_subject(self.id), max_msgs=1)
        await self.nc.jetstream().publish(event.subject, msgspec.json.encode(event),
                                          headers={"Nats-Msg-Id": str(event.id)})
        msg = await sub.next_msg(timeout=30)
        assert msgspec.json.decode(msg.data, type=RegistrationAck).accepted

    async def beat(self) -> None:
        assert self.nc is not None
        self.sequence += 1
        event = NodeHeartbeat(node_id=self.id, sequence=self.sequence, health_score=90,
                              vllm_healthy=True, model_name="m", num_requests_running=2,
                              num_requests_waiting=0, kv_cache_usage=0.3)
        await self.nc.publish(event.subject, msgspec.json.encode(event),
                              headers={"Nats-Msg-Id": str(event.id)})
        self.last_beat = time.monotonic()


def start_fleet(quiet: list[uuid.UUID], leaves: list[LeafServer], issuer_json: str,
                args: argparse.Namespace) -> tuple[list[Any], Any, list[Any]]:
    """One worker process per leaf, each minting and connecting its share of the nodes."""
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    readies = []
    workers = []
    per_leaf = math.ceil(len(quiet) / len(leaves))
    for i, leaf in enumerate(leaves):
        share = Share(port=leaf.port, issuer_json=issuer_json,
                      nodes=[str(n) for n in quiet[i * per_leaf:(i + 1) * per_leaf]],
                      interval=args.interval, duration=args.duration,
                      offset=i / len(leaves))
        ready = ctx.Event()
        worker = ctx.Process(target=run_share, args=(share, ready, go, out), daemon=True)
        worker.start()
        readies.append(ready)
        workers.append(worker)
    return readies, (go, out), workers


async def run(args: argparse.Namespace, stack_urls: dict[str, str], hub: NatsServer,
              leaves: list[LeafServer]) -> None:
    n = args.nodes
    silent_ids = [uuid7() for _ in range(args.silent)]
    quiet = [uuid.uuid4() for _ in range(n - args.silent)]
    redis = aioredis.from_url(stack_urls["redis"])
    # Known, active nodes: what the monitor would have cached when they went active.
    async with redis.pipeline(transaction=False) as pipe:
        for node in quiet:
            pipe.set(status_key(node), "active", ex=3600)
        await pipe.execute()

    issuer = hub.authority.node_issuer()
    began = time.monotonic()
    readies, (go, out), workers = start_fleet(quiet, leaves, issuer.to_json(), args)
    for ready in readies:
        await asyncio.to_thread(ready.wait)
    fleet_ready = time.monotonic() - began
    print(f"{len(quiet):,} nodes minted their credentials and connected as themselves through "
          f"{len(leaves)} leaf servers in {fleet_ready:.1f}s")

    port = free_port()
    env = {**os.environ, "DATABASE_URL": stack_urls["database"], "REDIS_URL": stack_urls["redis"],
           "NATS_URL": hub.url, "NATS_CREDS": hub.creds(Role.MONITOR), "HTTP_PORT": str(port),
           "LOG_LEVEL": "warning", "STALE_AFTER_SECONDS": str(args.stale_after),
           "SWEEP_EVERY_SECONDS": "1", "PROBE_EVERY_SECONDS": "3600"}
    monitor = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.monitor", env=env, preexec_fn=die_with_parent)
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    silent = [SilentNode(node, issuer.node_credentials(node, ttl_seconds=3600))
              for node in silent_ids]
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
        await launch(stack_urls["database"], silent_ids)
        for node in silent:
            await node.register(hub.url)
        print(f"{n:,} nodes ({len(silent)} registered through the monitor, then silent after "
              f"{args.silent_after:.0f}s); one heartbeat per node every {args.interval:g}s "
              f"= {n / args.interval:,.0f}/s offered; {args.duration:.0f}s run")

        def servers_now() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            return server_varz(hub.monitor_port), [leaf.varz() for leaf in leaves]

        started = time.monotonic()
        cpu0, handled0 = cpu_seconds(monitor.pid), await asyncio.to_thread(handled, metrics_url)
        hub0, leaves0 = await asyncio.to_thread(servers_now)
        go.set()
        stale_at: dict[uuid.UUID, float] = {}
        silent_published = 0
        # Each silent node beats a few times before the mark, spread so that they do not all
        # go quiet at once.
        spacing = min(args.interval, args.silent_after) / (len(silent) + 1)
        next_beat = {node.id: started + i * spacing for i, node in enumerate(silent)}
        while (now := time.monotonic()) - started < args.duration:
            for node in silent:
                if now - started < args.silent_after and now >= next_beat[node.id]:
                    await node.beat()
                    silent_published += 1
                    next_beat[node.id] += min(args.interval, args.silent_after / 2)
            if now - started >= args.silent_after:
                for node in silent:
                    if node.id not in stale_at and node.last_beat and \
                            await redis.get(status_key(node.id)) == b"stale":
                        stale_at[node.id] = time.monotonic()
            await asyncio.sleep(TICK)
        # The fleet stops publishing now (its workers run for the same duration): every rate
        # is over this window, and what the monitor has handled is read at its end.
        elapsed = time.monotonic() - started
        done = await asyncio.to_thread(handled, metrics_url) - handled0
        cpu = cpu_seconds(monitor.pid) - cpu0
        drained_at = time.monotonic()
        results = [await asyncio.to_thread(out.get) for _ in workers]
        hub1, leaves1 = await asyncio.to_thread(servers_now)
        # What was still queued in the monitor when the fleet stopped: handled late, or lost?
        published = silent_published + sum(r["published"] for r in results)
        last = in_the_end = await asyncio.to_thread(handled, metrics_url) - handled0
        while in_the_end < published and time.monotonic() - drained_at < 60:
            await asyncio.sleep(0.5)
            in_the_end = await asyncio.to_thread(handled, metrics_url) - handled0
            if in_the_end == last and time.monotonic() - drained_at > 10:
                break  # not moving: the rest will not come
            last = in_the_end
        drain = time.monotonic() - drained_at

        # The rest of the silent nodes, if the run ended before their mark.
        wait_until = max((s.last_beat for s in silent), default=started) + args.stale_after + 15
        while len(stale_at) < len(silent) and time.monotonic() < wait_until:
            for node in silent:
                if node.id not in stale_at and await redis.get(status_key(node.id)) == \
                        b"stale":
                    stale_at[node.id] = time.monotonic()
            await asyncio.sleep(0.1)

        failed = sum(r["failed"] for r in results)
        dropped = sum(r["connected"] - r["still_connected"] for r in results)
        mint = max(r["mint_seconds"] for r in results)
        connect = max(r["connect_seconds"] for r in results)
        print(f"  identities  {len(quiet) + len(silent):>10,} nodes, each its own credential "
              f"and connection (slowest worker: minted in {mint:.1f}s, connected in "
              f"{connect:.1f}s; {failed} refused, {dropped} dropped during the run)")
        if failed:
            print(f"  first refusal: {next(r['first_failure'] for r in results if r['failed'])}")
        print(f"  published   {published:>10,} heartbeats  {published / elapsed:>9,.0f}/s")
        leaf_in = sum(b["in_msgs"] - a["in_msgs"] for a, b in zip(leaves0, leaves1, strict=True))
        slow = (hub1["slow_consumers"] - hub0["slow_consumers"]
                + sum(b["slow_consumers"] - a["slow_consumers"]
                      for a, b in zip(leaves0, leaves1, strict=True)))
        hub_in, hub_out = hub1["in_msgs"] - hub0["in_msgs"], hub1["out_msgs"] - hub0["out_msgs"]
        print(f"  NATS        leaves took in {leaf_in:,}, the hub {hub_in:,} and sent out "
              f"{hub_out:,}; {slow} slow consumers")
        print(f"  handled     {int(done):>10,} heartbeats  {done / elapsed:>9,.0f}/s  "
              f"({done / max(published, 1):.3f} of published)")
        print(f"  by the end  {int(in_the_end):>10,} heartbeats handled "
              f"({in_the_end / max(published, 1):.3f} of published; the monitor's queue took "
              f"{drain:.1f}s more to empty after the fleet stopped)")
        counts = await asyncio.to_thread(monitor_counts, metrics_url)
        print(f"  monitor     dropped {counts.get('monitor_heartbeats_dropped_total', 0):,.0f} "
              f"(queue full), refused {counts.get('nats_messages_refused_total', 0):,.0f} "
              f"(subject and content disagree)")
        print(f"  monitor CPU {cpu / elapsed:>10.0%} of one core "
              f"({cpu / max(done, 1) * 1e6:.0f} µs per heartbeat)")
        lags = [stale_at[s.id] - (s.last_beat + args.stale_after)
                for s in silent if s.id in stale_at]
        missed = len(silent) - len(lags)
        if lags:
            print(f"  stale after the {args.stale_after:g}s mark: min {min(lags):.2f}s  "
                  f"median {statistics.median(lags):.2f}s  max {max(lags):.2f}s  "
                  f"({len(lags)} of {len(silent)} silent nodes)")
        if missed:
            print(f"  NOT declared stale: {missed} silent node(s)")
    finally:
        for node in silent:
            if node.nc is not None and not node.nc.is_closed:
                await node.nc.close()
        monitor.terminate()
        await asyncio.wait_for(monitor.wait(), 15)
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
        await redis.aclose()


async def streams(hub: NatsServer) -> None:
    """What `crosslogic nats setup` does, as the provisioner identity."""
    bus = await Bus.connect(hub.url, name="bench", creds=hub.creds(Role.PROVISIONER))
    try:
        await bus.ensure_streams()
    finally:
        await bus.close()


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
        stack = DevStack(Path(tmp), nats=False)
        hub = NatsServer(Path(tmp) / "nats", leafnodes=True)
        leaves = [LeafServer(Path(tmp) / "leaves", f"nats-leaf://127.0.0.1:{hub.leafnode_port}",
                             hub.authority, hub.authority.user(Role.LEAF).text(), i)
                  for i in range(math.ceil((args.nodes - args.silent) / LEAF_CONNECTIONS))]
        urls = stack.start()
        try:
            hub.start()
            for leaf in leaves:
                leaf.start()
            asyncio.run(migrate(urls.database_url))
            asyncio.run(streams(hub))
            asyncio.run(run(args, {"database": urls.database_url, "redis": urls.redis_url},
                            hub, leaves))
        finally:
            for leaf in leaves:
                leaf.stop()
            hub.stop()
            stack.stop()


if __name__ == "__main__":
    main()
