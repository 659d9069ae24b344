"""The bus against a real NATS server with JetStream."""

from __future__ import annotations

import asyncio
import json
import uuid

from prometheus_client import CollectorRegistry

from schemas.events import ApiKeyCreated, Event, NodeHeartbeat, encode_event
from schemas.subjects import STREAMS, stream_for_subject
from services.infra.bus import Bus, dlq_headers
from services.infra.consumer import ConsumerSpec, Delivery, TransientError
from services.infra.natsauth.identities import MONITOR_HEARTBEATS_DLQ, Role
from tests.conftest import Servers
from tests.helpers import eventually, node_registered


def heartbeat(node_id: uuid.UUID, seq: int = 1) -> NodeHeartbeat:
    return NodeHeartbeat(node_id=node_id, sequence=seq, health_score=90, vllm_healthy=True)


async def stream_messages(bus: Bus, stream: str) -> list[bytes]:
    info = await bus.js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await bus.js.get_msg(stream, seq)
        out.append(msg.data or b"")
    return out


async def test_streams_are_created_idempotently_and_updated(bus: Bus) -> None:
    await bus.ensure_streams()  # second time: no error
    names = {s.config.name for s in await bus.js.streams_info()}
    assert names == {s.name for s in STREAMS}
    await bus.js.update_stream(config=(await bus.js.stream_info("USAGE")).config.evolve(
        max_age=3600.0))
    await bus.ensure_streams()  # drifted config is brought back
    assert (await bus.js.stream_info("USAGE")).config.max_age == \
        next(s for s in STREAMS if s.name == "USAGE").max_age_seconds


async def test_publish_is_deduplicated_on_event_id(bus: Bus) -> None:
    event = node_registered()
    first = await bus.publish(event)
    again = await bus.publish(event)
    assert first.stream == "NODES" and not first.duplicate
    assert again.duplicate and again.seq == first.seq
    assert len(await stream_messages(bus, "NODES")) == 1


async def test_every_subject_lands_in_its_stream(bus: Bus) -> None:
    event = node_registered()
    await bus.publish(event)
    assert stream_for_subject(event.subject).name == "NODES"  # type: ignore[union-attr]
    data = await stream_messages(bus, "NODES")
    assert json.loads(data[0])["id"] == str(event.id)


async def consume_until(bus: Bus, spec: ConsumerSpec, handler, done, timeout: float = 10):
    consumer = await bus.consumer(spec, handler)
    task = asyncio.create_task(consumer.run())
    try:
        await eventually(done, timeout=timeout, what="consumer finished")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_consumer_acks_batches(bus: Bus) -> None:
    events = [node_registered() for _ in range(25)]
    for e in events:
        await bus.publish(e)
    seen: list[Event] = []

    async def handler(batch: list[Delivery]) -> None:
        seen.extend(d.event for d in batch)

    spec = ConsumerSpec(durable="t-ack", stream="NODES", subjects=("node.registered.*",),
                        batch=10)

    async def done() -> bool:
        return len(seen) >= 25

    await consume_until(bus, spec, handler, done)
    assert [e.id for e in seen] == [e.id for e in events]  # in order
    info = await bus.js.consumer_info("NODES", "t-ack")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_undecodable_message_goes_to_dead_letters(bus: Bus) -> None:
    good = node_registered()
    await bus.publish_raw(f"node.registered.{uuid.uuid4()}", b"{not json", "bad-1")
    await bus.publish(good)
    seen: list[Event] = []

    async def handler(batch: list[Delivery]) -> None:
        seen.extend(d.event for d in batch)

    spec = ConsumerSpec(durable="t-dlq", stream="NODES", subjects=("node.registered.*",))

    async def done() -> bool:
        return bool(seen) and (await bus.js.stream_info("DLQ")).state.messages == 1

    await consume_until(bus, spec, handler, done)
    assert seen == [good]
    parked = await bus.js.get_msg("DLQ", 1)
    assert parked.subject.startswith("dlq.t-dlq.node.registered.")
    assert parked.data == b"{not json"
    assert "decode" in (parked.headers or {}).get("Crosslogic-Error", "")


async def test_poison_message_is_isolated_and_parked_after_max_deliver(bus: Bus) -> None:
    events = [node_registered() for _ in range(5)]
    poison = events[2]
    for e in events:
        await bus.publish(e)
    handled: dict[uuid.UUID, int] = {}
    attempts = {"poison": 0}

    async def handler(batch: list[Delivery]) -> None:
        if any(d.event.id == poison.id for d in batch):
            attempts["poison"] += 1
            raise ValueError("cannot handle this one")
        for d in batch:
            handled[d.event.id] = handled.get(d.event.id, 0) + 1

    spec = ConsumerSpec(durable="t-poison", stream="NODES", subjects=("node.registered.*",),
                        max_deliver=3, nak_delays=(0.05,), fetch_timeout=0.2)

    async def done() -> bool:
        return (await bus.js.stream_info("DLQ")).state.messages == 1

    await consume_until(bus, spec, handler, done)
    assert set(handled) == {e.id for e in events if e is not poison}
    assert all(n == 1 for n in handled.values())  # good ones were not redelivered
    parked = await bus.js.get_msg("DLQ", 1)
    assert json.loads(parked.data)["id"] == str(poison.id)
    meta = dlq_headers(parked)  # type: ignore[arg-type]
    assert meta["deliveries"] == 3 and "failed 3 deliveries" in meta["error"]


async def test_transient_errors_do_not_spend_deliveries(bus: Bus) -> None:
    event = node_registered()
    await bus.publish(event)
    calls = {"n": 0}
    ok: list[Delivery] = []

    async def handler(batch: list[Delivery]) -> None:
        calls["n"] += 1
        if calls["n"] <= 4:  # more failures than max_deliver allows
            raise TransientError("database down")
        ok.extend(batch)

    spec = ConsumerSpec(durable="t-transient", stream="NODES",
                        subjects=("node.registered.*",), max_deliver=2)

    async def done() -> bool:
        return bool(ok)

    await consume_until(bus, spec, handler, done)
    assert ok[0].num_delivered == 1
    assert (await bus.js.stream_info("DLQ")).state.messages == 0


async def test_observations_are_shared_across_a_queue_group(servers: Servers, bus: Bus,
                                                            nats_url: str) -> None:
    other = await servers.admin_bus("test-2")
    got: dict[str, list[int]] = {"a": [], "b": []}

    def collector(name: str):
        async def handle(event: Event) -> None:
            assert isinstance(event, NodeHeartbeat)
            got[name].append(event.sequence)
        return handle

    try:
        await bus.subscribe_observations("node.heartbeat.*", "monitor", collector("a"))
        await other.subscribe_observations("node.heartbeat.*", "monitor", collector("b"))
        await bus.nc.flush()
        await other.nc.flush()
        node = uuid.uuid4()
        publisher = await servers.nats_client()
        for seq in range(200):
            await Bus(publisher).publish_observation(heartbeat(node, seq))
        await publisher.flush()

        async def all_seen() -> bool:
            return len(got["a"]) + len(got["b"]) == 200

        await eventually(all_seen, what="heartbeats delivered")
        assert sorted(got["a"] + got["b"]) == list(range(200))  # each once
        assert got["a"] and got["b"]  # shared
        # The short-retention stream holds them too, for late inspection.
        assert (await bus.js.stream_info("HEARTBEATS")).state.messages == 200
        await publisher.close()
    finally:
        await other.close()


async def test_consumer_backlog_is_a_metric_that_moves(servers: Servers, nats_url: str,
                                                       bus: Bus) -> None:
    registry = CollectorRegistry()
    metered = await Bus.connect(nats_url, name="test-metered", registry=registry,
                                creds=servers.creds())
    metered.pending_interval = 0.05
    try:
        for _ in range(12):
            await bus.publish(node_registered())
        handled: list[Event] = []

        async def handler(batch: list[Delivery]) -> None:
            handled.extend(d.event for d in batch)

        consumer = await metered.consumer(ConsumerSpec(
            durable="t-pending", stream="NODES", subjects=("node.registered.*",), batch=5,
            ack_wait=60), handler)

        async def pending_is(n: float) -> bool:
            return registry.get_sample_value(
                "nats_consumer_pending_messages",
                {"stream": "NODES", "consumer": "t-pending"}) == n

        await eventually(lambda: pending_is(12), what="the whole backlog reported")
        assert await consumer.process_batch() == 5
        await eventually(lambda: pending_is(7), what="the backlog shrinking as it is acked")
        # Delivered but not acknowledged is still owed: it counts.
        unacked = await consumer.sub.fetch(3, timeout=2)
        assert len(unacked) == 3
        await metered.refresh_pending()  # a refresh that surely saw them in flight
        assert await pending_is(7)
        info = await metered.js.consumer_info("NODES", "t-pending")
        assert info.num_ack_pending == 3 and info.num_pending == 4
        for msg in unacked:
            await msg.ack_sync()
        await eventually(lambda: pending_is(4), what="acks counted")
        await bus.publish(node_registered())
        await eventually(lambda: pending_is(5), what="new messages counted")
        assert len(handled) == 5
    finally:
        await metered.close()


async def metered_bus(servers: Servers, creds: str | None = None
                      ) -> tuple[Bus, CollectorRegistry]:
    registry = CollectorRegistry()
    b = await Bus.connect(servers.nats_url, name="test-metered", registry=registry,
                          creds=creds or servers.creds())
    return b, registry


def refused(registry: CollectorRegistry, consumer: str, reason: str) -> float:
    return registry.get_sample_value("nats_messages_refused_total",
                                     {"consumer": consumer, "reason": reason}) or 0.0


async def test_a_message_its_subject_does_not_name_is_dead_lettered_and_counted(
        servers: Servers, bus: Bus) -> None:
    """Node A's own credential may publish on `node.registered.A`, but not speak for B there;
    nor may anyone slip an `apikey.created` onto a node subject."""
    a, b = uuid.uuid4(), uuid.uuid4()
    node_a = await Bus.connect(servers.nats_url, name="node-a", creds=servers.node_creds(a))
    metered, registry = await metered_bus(servers)
    try:
        forged = node_registered(b)
        await node_a.publish_raw(f"node.registered.{a}", encode_event(forged), str(forged.id))
        apikey = ApiKeyCreated(key_id=uuid.uuid4(), tenant_id=uuid.uuid4(),
                               environment_id=uuid.uuid4(), key_hash="0" * 64,
                               last_four="abcd")
        await bus.publish_raw(f"node.registered.{a}", encode_event(apikey), str(apikey.id))
        good = node_registered(a)
        await node_a.publish(good)
        seen: list[Event] = []

        async def handler(batch: list[Delivery]) -> None:
            seen.extend(d.event for d in batch)

        spec = ConsumerSpec(durable="t-subject", stream="NODES",
                            subjects=("node.registered.*",))
        assert refused(registry, "t-subject", "subject_mismatch") == 0

        async def done() -> bool:
            return bool(seen) and (await bus.js.stream_info("DLQ")).state.messages == 2

        await consume_until(metered, spec, handler, done)
        assert [e.id for e in seen] == [good.id]
        assert refused(registry, "t-subject", "subject_mismatch") == 2
        errors = {dlq_headers(await bus.js.get_msg("DLQ", seq))["error"]  # type: ignore[arg-type]
                  for seq in (1, 2)}
        assert all(e.startswith("subject: ") for e in errors)
        assert any(str(b) in e for e in errors) and any("apikey.created" in e for e in errors)
    finally:
        await node_a.close()
        await metered.close()


async def test_a_refused_delivery_is_parked_and_the_rest_of_its_batch_acked(
        servers: Servers, bus: Bus) -> None:
    events = [node_registered() for _ in range(4)]
    for e in events:
        await bus.publish(e)
    metered, registry = await metered_bus(servers)
    handled: list[Event] = []
    calls = {"n": 0}

    async def handler(batch: list[Delivery]) -> None:
        calls["n"] += 1
        for d in batch:
            if d.event.id == events[1].id:
                d.refuse("not this one")
            else:
                handled.append(d.event)

    spec = ConsumerSpec(durable="t-refuse", stream="NODES", subjects=("node.registered.*",))
    try:
        async def done() -> bool:
            return (len(handled) == 3
                    and (await bus.js.stream_info("DLQ")).state.messages == 1)

        await consume_until(metered, spec, handler, done)
        assert calls["n"] == 1  # one batch: no one-at-a-time hunt for a poison message
        assert refused(registry, "t-refuse", "refused") == 1
        parked = await bus.js.get_msg("DLQ", 1)
        assert json.loads(parked.data)["id"] == str(events[1].id)
        assert dlq_headers(parked)["error"] == "refused: not this one"  # type: ignore[arg-type]
        info = await bus.js.consumer_info("NODES", "t-refuse")
        assert info.num_ack_pending == 0 and info.num_pending == 0
    finally:
        await metered.close()


async def test_an_observation_its_subject_does_not_name_is_dropped_counted_and_parked(
        servers: Servers, bus: Bus) -> None:
    """Node A heartbeats on its own subject, saying it is node B: B hears nothing of it."""
    a, b = uuid.uuid4(), uuid.uuid4()
    monitor, registry = await metered_bus(servers, servers.creds(Role.MONITOR))
    node_a = await Bus.connect(servers.nats_url, name="node-a", creds=servers.node_creds(a))
    got: list[Event] = []
    # A queue group of this test's own: a member left by another test would take a share.
    queue = f"monitor-{uuid.uuid4().hex[:8]}"

    async def handle(event: Event) -> None:
        # Only this test's nodes: an agent another test left running heartbeats here too.
        if getattr(event, "node_id", None) in (a, b):
            got.append(event)

    try:
        await monitor.subscribe_observations("node.heartbeat.*", queue, handle,
                                             dead_letters=MONITOR_HEARTBEATS_DLQ)
        await monitor.nc.flush()
        assert refused(registry, queue, "subject_mismatch") == 0
        lie = heartbeat(b)
        await node_a.nc.publish(f"node.heartbeat.{a}", encode_event(lie),
                                headers={"Nats-Msg-Id": str(lie.id)})
        await node_a.nc.publish(f"node.heartbeat.{a}", b"{not json")
        await node_a.publish_observation(heartbeat(a, 7))
        await node_a.nc.flush()  # the server has all three (a refusal would surface here)

        async def heard() -> tuple[int, float, float] | None:
            state = (len(got), refused(registry, queue, "undecodable"),
                     refused(registry, queue, "subject_mismatch"))
            return None if state != (1, 1.0, 1.0) else state

        await eventually(heard, timeout=30.0,
                         what="the true heartbeat handled, the bad ones refused")
        assert [(e.node_id, e.sequence) for e in got] == [(a, 7)]  # type: ignore[attr-defined]
        assert refused(registry, queue, "subject_mismatch") == 1

        async def parked() -> bool:
            return (await bus.js.stream_info("DLQ")).state.messages == 2

        await eventually(parked, what="both parked")
        first = await bus.js.get_msg("DLQ", 1)
        assert first.subject == f"dlq.{MONITOR_HEARTBEATS_DLQ}.node.heartbeat.{a}"
        assert json.loads(first.data)["node_id"] == str(b)
        assert str(b) in dlq_headers(first)["error"]  # type: ignore[arg-type]
    finally:
        await node_a.close()
        await monitor.close()
