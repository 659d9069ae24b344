"""Outbox relay (log → NATS) and recorder (NATS → log) against real PostgreSQL and NATS."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import aiohttp
import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from schemas.events import Event, decode_event, encode_event
from services.infra.bus import Bus
from services.infra.consumer import ConsumerSpec, Delivery
from services.infra.db import Connection
from services.infra.devstack import free_port
from services.infra.eventlog import EventLog
from services.infra.log_records import START
from services.infra.log_waker import LogWaker
from services.infra.natsauth.identities import Role
from services.infra.recorder import Recorder, Refusal, Verdict
from services.infra.relay import RELAY_LOCK_KEY, OutboxRelay
from tests.conftest import Servers
from tests.helpers import (
    eventually,
    node_accepted,
    node_registered,
    tenant_created,
    tenant_renamed,
)


async def stream_events(bus: Bus, stream: str) -> list[Event]:
    info = await bus.js.stream_info(stream)
    if info.state.messages == 0:
        return []
    return [decode_event((await bus.js.get_msg(stream, seq)).data or b"")
            for seq in range(info.state.first_seq, info.state.last_seq + 1)]


async def log_order(pool: asyncpg.Pool, origin: str = "log") -> list[str]:
    rows = await pool.fetch("SELECT event_id FROM events WHERE origin = $1 "
                            "ORDER BY transaction_id, position", origin)
    return [str(r["event_id"]) for r in rows]


async def append_tenants(log: EventLog, n: int) -> None:
    for i in range(n):
        t = tenant_created(f"t{i}")
        await log.append(t.stream, [t, tenant_renamed(t.tenant_id, f"t{i}b")])


# --------------------------------------------------------------------------- relay


async def test_relay_publishes_every_log_event_once_in_order(pool: asyncpg.Pool, bus: Bus,
                                                             database_url: str) -> None:
    log = EventLog(pool)
    await append_tenants(log, 10)
    await log.record([node_registered()], origin="bus")  # already on NATS: not republished
    waker = LogWaker(database_url, poll_interval=0.2)
    await waker.start()
    relay = OutboxRelay(database_url, bus, waker=waker, batch_size=7, leader_retry=0.1)
    task = asyncio.create_task(relay.run())
    try:
        await append_tenants(log, 5)  # while it runs

        async def all_there() -> bool:
            return len(await stream_events(bus, "CONTROL")) >= 30

        await eventually(all_there, what="relay published")
        published = [str(e.id) for e in await stream_events(bus, "CONTROL")]
        assert published == await log_order(pool)
        assert (await bus.js.stream_info("NODES")).state.messages == 0
        cp = await pool.fetchrow("SELECT position FROM checkpoints WHERE name='outbox-relay'")
        assert cp["position"] == await pool.fetchval(
            "SELECT position FROM events ORDER BY transaction_id DESC, position DESC LIMIT 1")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await waker.close()


async def test_relay_waits_out_a_nats_outage_in_order(pool: asyncpg.Pool, bus: Bus,
                                                      servers: Servers,
                                                      database_url: str) -> None:
    if servers.nats is None:
        pytest.skip("needs the embedded NATS server to stop and start it")
    log = EventLog(pool)
    relay_bus = await Bus.connect(servers.nats_url, name="relay",
                                  creds=servers.creds(Role.RELAY))
    relay = OutboxRelay(database_url, relay_bus, leader_retry=0.1)
    task = asyncio.create_task(relay.run())
    try:
        await append_tenants(log, 3)

        async def count_is(n: int) -> bool:
            try:
                return len(await stream_events(bus, "CONTROL")) == n
            except Exception:
                return False

        await eventually(lambda: count_is(6), what="first events published")
        servers.nats.stop()
        await append_tenants(log, 3)  # committed while NATS is down
        servers.nats.start()
        await eventually(lambda: count_is(12), timeout=20, what="published after restart")
        published = [str(e.id) for e in await stream_events(bus, "CONTROL")]
        assert published == await log_order(pool)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await relay_bus.close()


def start_relay_process(servers: Servers, database_url: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "DATABASE_URL": database_url, "NATS_URL": servers.nats_url,
           "NATS_CREDS": servers.creds(Role.RELAY),
           "HTTP_PORT": str(port), "RELAY_LEADER_RETRY": "0.1", "EVENT_POLL_INTERVAL": "0.2",
           "RELAY_BATCH_SIZE": "5", "LOG_LEVEL": "warning"}
    return subprocess.Popen([sys.executable, "-m", "services.cli", "relay"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def is_leader(session: aiohttp.ClientSession, port: int) -> bool:
    try:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            return "outbox_relay_leader 1.0" in await resp.text()
    except aiohttp.ClientError:
        return False


async def test_relay_resumes_after_its_leader_is_killed(pool: asyncpg.Pool, bus: Bus,
                                                        servers: Servers,
                                                        database_url: str) -> None:
    log = EventLog(pool)
    ports = [free_port(), free_port()]
    procs = [start_relay_process(servers, database_url, p) for p in ports]
    try:
        async with aiohttp.ClientSession() as session:
            async def leader() -> tuple[int] | None:
                states = [await is_leader(session, p) for p in ports]
                return (states.index(True),) if states.count(True) == 1 else None

            (first,) = await eventually(leader, what="exactly one leader", timeout=20)
            await append_tenants(log, 20)

            async def published_some() -> bool:
                return len(await stream_events(bus, "CONTROL")) >= 10

            await eventually(published_some, what="leader publishing")
            procs[first].send_signal(signal.SIGKILL)  # mid-stream, no goodbye
            procs[first].wait()
            await append_tenants(log, 10)

            async def standby_leads() -> bool:
                return await is_leader(session, ports[1 - first])

            await eventually(standby_leads, what="standby takes over", timeout=20)

            async def all_published() -> bool:
                return len(await stream_events(bus, "CONTROL")) >= 60

            await eventually(all_published, what="everything published", timeout=20)
        published = [str(e.id) for e in await stream_events(bus, "CONTROL")]
        assert published == await log_order(pool)  # once each, in log order
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)


# --------------------------------------------------------------------------- recorder


async def test_recorder_records_each_event_once_under_redelivery(pool: asyncpg.Pool,
                                                                 bus: Bus) -> None:
    log = EventLog(pool)
    events = [node_registered() for _ in range(30)]
    for e in events:
        await bus.publish(e)
    # The same events again under other message ids: beyond the duplicate window, NATS
    # would store them twice; the log must not.
    for e in events[:10]:
        await bus.publish_raw(e.subject, encode_event(e), f"again-{e.id}")

    spec = ConsumerSpec(durable="recorder-test", stream="NODES",
                        subjects=("node.registered.*",), batch=8, fetch_timeout=0.2,
                        nak_delays=(0.05,))
    recorder = Recorder(log, bus, spec)
    original = recorder.handle
    crashes = {"left": 2}

    async def crash_after_recording(deliveries: list[Delivery]) -> None:
        await original(deliveries)
        if crashes["left"]:
            crashes["left"] -= 1
            raise RuntimeError("crashed between the commit and the ack")

    recorder.handle = crash_after_recording  # type: ignore[method-assign]
    # Two replicas of the recorder on the same durable consumer.
    consumers = [await bus.consumer(recorder.spec, crash_after_recording) for _ in range(2)]
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    try:
        async def drained() -> bool:
            info = await bus.js.consumer_info("NODES", "recorder-test")
            return info.num_pending == 0 and info.num_ack_pending == 0

        await eventually(drained, what="consumer drained", timeout=15)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert crashes["left"] == 0  # redeliveries did happen
    recorded = await log_order(pool, origin="bus")
    assert sorted(recorded) == sorted(str(e.id) for e in events)
    page = await log.read_all(START, 100)
    by_id = {e.id: e for e in events}
    assert all(e.event == by_id[e.event_id] for e in page.events)  # payloads intact


async def test_recorder_transform_can_refuse_and_reshape(pool: asyncpg.Pool, bus: Bus) -> None:
    log = EventLog(pool)
    good, bad = node_registered(), node_registered(model="")

    async def validate(event: Event) -> list[Event]:
        if getattr(event, "model_name", "") == "":
            raise ValueError("registration without a model")
        return [event]

    # max_deliver and long redelivery delays: a refusal must not wait for them.
    spec = ConsumerSpec(durable="recorder-validate", stream="NODES",
                        subjects=("node.registered.*",), max_deliver=10, nak_delays=(60.0,),
                        fetch_timeout=0.2)
    recorder = Recorder(log, bus, spec, transform=validate)
    await bus.publish(bad)
    await bus.publish(good)
    task = asyncio.create_task(recorder.run())
    try:
        async def done() -> bool:
            return (await bus.js.stream_info("DLQ")).state.messages == 1 and \
                len(await log_order(pool, "bus")) == 1

        await eventually(done, what="good recorded, bad parked", timeout=5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert await log_order(pool, "bus") == [str(good.id)]
    parked = await bus.js.get_msg("DLQ", 1)
    assert "refused: registration without a model" in (parked.headers or {})["Crosslogic-Error"]


async def test_relay_lag_is_a_metric_every_replica_reports(pool: asyncpg.Pool, bus: Bus,
                                                           database_url: str) -> None:
    log = EventLog(pool)
    # Someone else leads, and is stuck: this replica stands by, and still reports the lag.
    holder = await asyncpg.connect(database_url)
    assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK_KEY)
    registry = CollectorRegistry()
    relay = OutboxRelay(database_url, bus, leader_retry=0.05, lag_interval=0.05,
                        registry=registry)
    task = asyncio.create_task(relay.run())

    async def lag_is(n: int) -> bool:
        return registry.get_sample_value("outbox_relay_lag_events") == n

    try:
        await eventually(lambda: lag_is(0), what="lag reported")
        await append_tenants(log, 4)
        await log.record([node_registered()], origin="bus")  # never the relay's to publish
        await eventually(lambda: lag_is(8), what="lag growing with no leader")
        assert not relay.is_leader
        await holder.execute("SELECT pg_advisory_unlock($1)", RELAY_LOCK_KEY)
        await eventually(lambda: lag_is(0), what="lag gone once this replica leads")
        assert relay.is_leader
        assert len(await stream_events(bus, "CONTROL")) == 8
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await holder.close()


async def test_derived_events_are_recorded_for_the_relay_in_the_same_transaction(
        pool: asyncpg.Pool, bus: Bus, database_url: str) -> None:
    """What a batch transform derives (the monitor's `node.accepted`) is not on NATS yet: it
    is recorded with origin 'log', with the incoming event (origin 'bus') in one transaction,
    and the relay publishes it; a refusal in the batch leaves the rest recorded."""
    log = EventLog(pool)
    good, bad = node_registered(), node_registered()
    seen_conn: list[bool] = []

    async def derive(events: Sequence[Event], conn: Connection) -> list[Verdict]:
        seen_conn.append(conn.is_in_transaction())
        return [Refusal("no") if e.id == bad.id else (e, node_accepted(e))  # type: ignore[arg-type]
                for e in events]

    spec = ConsumerSpec(durable="recorder-derive", stream="NODES",
                        subjects=("node.registered.*",), fetch_timeout=0.2)
    recorder = Recorder(log, bus, spec, batch_transform=derive)
    await bus.publish(bad)
    await bus.publish(good)
    waker = LogWaker(database_url, poll_interval=0.2)
    await waker.start()
    relay = OutboxRelay(database_url, bus, waker=waker, leader_retry=0.1)
    tasks = [asyncio.create_task(recorder.run()), asyncio.create_task(relay.run())]
    accepted = node_accepted(good)
    try:
        async def relayed() -> bool:
            return any(e.id == accepted.id for e in await stream_events(bus, "NODES"))

        await eventually(relayed, what="the derived event published by the relay")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await waker.close()
    assert seen_conn and all(seen_conn)
    rows = await pool.fetch("SELECT event_id, origin, transaction_id FROM events "
                            "ORDER BY position")
    assert [(r["event_id"], r["origin"]) for r in rows] == \
        [(good.id, "bus"), (accepted.id, "log")]
    assert rows[0]["transaction_id"] == rows[1]["transaction_id"]
    assert (await bus.js.stream_info("DLQ")).state.messages == 1
