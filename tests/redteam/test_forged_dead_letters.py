"""A node cannot hide a genuine dead letter by forging a message id.

A refused observation is parked on the dead-letter stream, deduplicated on the id its sender
gave it. Under the "dlq:" prefix that the consumers' own dead letters use
(`dlq:<consumer>:<stream>:<sequence>`), a node choosing the id "<consumer>:NODES:<seq>" would
take the id of a dead letter yet to come, and the stream would drop that one as a duplicate:
the evidence of a bad message in NODES gone."""

from __future__ import annotations

import asyncio

from schemas.events import Event
from schemas.ids import uuid7
from services.infra.bus import MSG_ID, Bus, dlq_headers
from services.infra.consumer import ConsumerSpec, Delivery
from services.infra.natsauth.identities import MONITOR_HEARTBEATS_DLQ
from tests.conftest import Servers
from tests.helpers import eventually


async def test_a_forged_message_id_cannot_suppress_a_genuine_dead_letter(
        servers: Servers, nats_url: str, bus: Bus) -> None:
    node = uuid7()
    durable = "redteam-nodes"
    # A message in NODES no consumer can read: its dead letter is yet to come.
    bad = await bus.publish_raw(f"node.registered.{node}", b"not an event", f"bad-{node}")
    genuine = f"{durable}:{bad.stream}:{bad.seq}"

    async def heard(event: Event) -> None:
        raise AssertionError("nothing readable was sent")

    await bus.subscribe_observations("node.heartbeat.*", "redteam-observers", heard,
                                     dead_letters=MONITOR_HEARTBEATS_DLQ)
    await bus.nc.flush()
    rogue = await Bus.connect(nats_url, name="rogue", creds=servers.node_creds(node))
    try:
        # The node heartbeats garbage under an id chosen to collide with that dead letter.
        await rogue.nc.publish(f"node.heartbeat.{node}", b"garbage", headers={MSG_ID: genuine})
        await rogue.nc.flush()
    finally:
        await rogue.close()

    async def parked() -> int:
        return int((await bus.js.stream_info("DLQ")).state.messages)

    assert await eventually(parked, what="the forged heartbeat parked") == 1

    async def refuse(deliveries: list[Delivery]) -> None:
        raise AssertionError("undecodable messages never reach the handler")

    consumer = await bus.consumer(ConsumerSpec(durable=durable, stream=bad.stream,
                                               subjects=(f"node.registered.{node}",)), refuse)
    assert await consumer.process_batch() == 1

    async def both() -> bool:
        return await parked() == 2

    await eventually(both, what="the genuine dead letter parked beside the forged one")
    sub = await bus.js.pull_subscribe("dlq.>", stream="DLQ")
    letters = await sub.fetch(2, timeout=5)
    assert {dlq_headers(m)["subject"] for m in letters} == \
        {f"node.heartbeat.{node}", f"node.registered.{node}"}
    await asyncio.gather(*(m.ack() for m in letters))
