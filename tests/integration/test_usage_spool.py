"""The gateway's usage spool shared by several gateways (`--workers N` share one folder):
a replay never takes a file another live gateway is still writing, and does take a dead one's.
Real NATS (JetStream), real files."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from schemas.events import UsageRecorded, decode_event, encode_event
from services.core.bus import Bus
from services.gateway.usage import UsagePublisher


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
