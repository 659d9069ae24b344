"""The gateway's usage spool shared by several gateways (`--workers N` share one folder):
a replay never takes a file another live gateway is still writing, and does take a dead one's.
Real NATS (JetStream), real files."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

from schemas.events import UsageRecorded, decode_event, encode_event
from services.gateway.usage import UsagePublisher
from services.infra.aio import stop_task
from services.infra.bus import Bus
from services.infra.devstack import NatsServer
from services.infra.natsauth.identities import Role
from tests.helpers import eventually


def used(n: int) -> UsageRecorded:
    return UsageRecorded(request_id=f"req-{n}", tenant_id=uuid.uuid4(),
                         environment_id=uuid.uuid4(), api_key_id=uuid.uuid4(),
                         model="m", endpoint="chat", region="us-east-1", node_id=None,
                         prompt_tokens=n, completion_tokens=1, latency_ms=1.0)


async def stored(bus: Bus) -> set[str]:
    info = await bus.js.stream_info("USAGE")
    if info.state.messages == 0:
        return set()
    found = set()
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        event = decode_event((await bus.js.get_msg("USAGE", seq)).data or b"")
        assert isinstance(event, UsageRecorded)
        found.add(event.request_id)
    return found


async def test_a_replay_leaves_a_live_gateways_spool_alone(bus: Bus, tmp_path: Path) -> None:
    a = UsagePublisher(bus, tmp_path)
    b = UsagePublisher(bus, tmp_path)
    a._spool([used(1), used(2)])  # a cannot reach NATS and spools; its file stays open

    assert await b.retry_now()  # b is fine: nothing of its own, and a's is not b's to take
    assert await stored(bus) == set()
    a._spool([used(3)])  # a goes on appending to the same file: nothing is lost

    assert await a.retry_now()
    assert await stored(bus) == {"req-1", "req-2", "req-3"}
    assert os.listdir(tmp_path) == []


async def test_a_dead_gateways_spool_is_replayed_once(bus: Bus, tmp_path: Path) -> None:
    # What a gateway killed while spooling leaves: a file nobody holds a lock on.
    dead = tmp_path / "usage-4242-1-1.jsonl"
    dead.write_bytes(b"".join(encode_event(used(n)) + b"\n" for n in (7, 8)))
    a = UsagePublisher(bus, tmp_path)
    b = UsagePublisher(bus, tmp_path)

    assert await a.retry_now() and await b.retry_now()
    assert await stored(bus) == {"req-7", "req-8"}
    assert (await bus.js.stream_info("USAGE")).state.messages == 2
    assert dead.name not in os.listdir(tmp_path)


async def test_a_batch_cut_off_by_shutdown_is_still_published(tmp_path: Path) -> None:
    """The publishing task is cancelled (gateway shutdown) while a batch waits for NATS's
    acknowledgments, and that NATS dies before storing it: close() publishes it again."""
    nats_server = NatsServer(tmp_path / "nats")
    nats_server.start()
    bus = await Bus.connect(nats_server.url, name="usage-test",
                            creds=nats_server.creds(Role.ADMIN))
    try:
        await bus.ensure_streams()
        publisher = UsagePublisher(bus, tmp_path / "spool")
        task = asyncio.create_task(publisher.run())
        assert nats_server.proc is not None and nats_server.proc._proc is not None
        pid = nats_server.proc._proc.pid
        os.kill(pid, signal.SIGSTOP)  # takes the batch, never answers
        for n in range(3):
            publisher.submit(used(n))

        async def in_hand() -> bool:
            return len(publisher._in_hand) == 3

        await eventually(in_hand, what="the batch is being published")
        await stop_task(task)
        nats_server.kill()  # what it had received is gone with it
        nats_server.start()

        async def back() -> bool:
            return bus.connected

        await eventually(back, timeout=20, what="the bus reconnects")
        await publisher.close()  # published, or spooled if JetStream is not back yet
        successor = UsagePublisher(bus, tmp_path / "spool")  # the next gateway started

        async def all_stored() -> bool:
            await successor.retry_now()
            return await stored(bus) == {"req-0", "req-1", "req-2"}

        await eventually(all_stored, timeout=20, what="the batch stored")
    finally:
        await bus.close()
        nats_server.stop()


async def test_a_spool_found_at_start_while_nats_is_away_is_replayed_when_it_is_back(
        tmp_path: Path) -> None:
    """No request needs to come in: the publisher keeps trying on its own."""
    nats_server = NatsServer(tmp_path / "nats")
    nats_server.start()
    bus = await Bus.connect(nats_server.url, name="usage-test",
                            creds=nats_server.creds(Role.ADMIN))
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "usage-4242-1-1.jsonl").write_bytes(encode_event(used(5)) + b"\n")
    try:
        await bus.ensure_streams()
        nats_server.stop()
        publisher = UsagePublisher(bus, spool, retry_interval=0.2)
        task = asyncio.create_task(publisher.run())

        async def gave_up_for_now() -> bool:
            return not publisher._healthy

        await eventually(gave_up_for_now, what="the first replay fails")
        nats_server.start()

        async def replayed() -> bool:
            return bus.connected and await stored(bus) == {"req-5"}

        await eventually(replayed, timeout=20, what="the spool replayed")
        await stop_task(task)
        await publisher.close()
    finally:
        await bus.close()
        nats_server.stop()
