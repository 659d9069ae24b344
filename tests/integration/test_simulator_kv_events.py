"""The simulator publishes KV cache events as vLLM does (``--kv-events-config``): a real ZeroMQ
subscriber sees a request's newly cached blocks, as the model's token ids, salted in the first
block; a repeated request stores nothing new; a prefix cache reset clears everything.

PUB/SUB drops what is sent before a subscription reaches the publisher, so each test first
resets the cache until one of its AllBlocksCleared arrives (`subscribed`): from then on
nothing is lost, and batches come in order."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio

from schemas.kv_events import AllBlocksCleared, BlockStored, KVEventBatch, decode_batch
from services.domain.standin_tokenizer import TokenIds
from tests.integration.simulator_fixtures import (  # noqa: F401 - fixtures
    MODEL,
    SimProcess,
    StartSim,
    sim_process,
    start_sim,
)

TOPIC = "kv-events"
DEADLINE = 10.0
CONTENT = " ".join(f"word{i}" for i in range(100))  # with the template: 6 full blocks of 16


class Subscriber:
    """A SUB socket on the simulator's events, checking that batches are numbered 1 by 1."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock
        self.last_seq: int | None = None

    async def batch(self) -> KVEventBatch:
        topic, seq, payload = await asyncio.wait_for(self.sock.recv_multipart(), DEADLINE)
        assert topic == TOPIC.encode() and len(seq) == 8
        number = int.from_bytes(seq, "big")
        assert self.last_seq is None or number == self.last_seq + 1
        self.last_seq = number
        return decode_batch(payload)

    async def stored(self) -> BlockStored:
        """The next BlockStored (past any AllBlocksCleared of the subscription's probes)."""
        while True:
            for event in (await self.batch()).events:
                if isinstance(event, BlockStored):
                    return event
                assert isinstance(event, AllBlocksCleared), event

    async def subscribed(self, url: str) -> None:
        """Resets the cache until an AllBlocksCleared arrives: the subscription is live."""
        give_up = time.monotonic() + DEADLINE
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < give_up:
                async with s.post(f"{url}/reset_prefix_cache") as r:
                    assert r.status == 200
                if await self.sock.poll(200):
                    assert (await self.batch()).events == [AllBlocksCleared()]
                    return
        raise AssertionError("no KV events within the deadline")


@pytest.fixture
async def sub() -> AsyncIterator[Subscriber]:
    """A subscriber to TOPIC, neither bound nor connected yet."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
    try:
        yield Subscriber(sock)
    finally:
        sock.close(linger=0)
        ctx.term()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def full_blocks(ids: list[int], size: int = 16) -> list[int]:
    return ids[:len(ids) - len(ids) % size]


async def post(url: str, body: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        answer: dict[str, Any] = await r.json()
        return answer


async def test_a_chat_is_published_as_its_blocks_and_a_reset_as_all_cleared(
        start_sim: StartSim, sub: Subscriber) -> None:  # noqa: F811
    port = free_port()
    sim = await start_sim(model=MODEL, block_size=16, kv_events_endpoint=f"tcp://*:{port}",
                          kv_events_topic=TOPIC)
    sub.sock.connect(f"tcp://127.0.0.1:{port}")
    await sub.subscribed(sim.url)
    chat = {"model": MODEL, "max_tokens": 2, "cache_salt": "tenant-a",
            "messages": [{"role": "user", "content": CONTENT}]}

    answer = await post(f"{sim.base_url}/chat/completions", chat)
    prompt = TokenIds().chat_prompt([("user", CONTENT)])
    assert answer["usage"]["prompt_tokens"] == len(prompt)
    stored = await sub.stored()
    assert stored.token_ids == full_blocks(prompt) and len(stored.token_ids) == 6 * 16
    assert len(stored.block_hashes) == 6 and stored.parent_block_hash is None
    assert stored.extra_keys == [["tenant-a"], *[None] * 5]
    assert (stored.block_size, stored.medium, stored.lora_id) == (16, "GPU", None)

    # The same request again hits every block and stores none: the next batch is the reset's.
    before = (await sim.metrics())["vllm:prefix_cache_hits_total"]
    await post(f"{sim.base_url}/chat/completions", chat)
    assert (await sim.metrics())["vllm:prefix_cache_hits_total"] == before + 6 * 16
    async with aiohttp.ClientSession() as s, s.post(f"{sim.url}/reset_prefix_cache") as r:
        assert r.status == 200
    assert (await sub.batch()).events == [AllBlocksCleared()]

    # Without the generation prompt the template stops after the user's turn.
    await post(f"{sim.base_url}/chat/completions", {**chat, "add_generation_prompt": False})
    bare = TokenIds().chat_prompt([("user", CONTENT)], add_generation_prompt=False)
    assert (await sub.stored()).token_ids == full_blocks(bare)


async def test_the_flag_publishes_completions_and_responses_to_a_subscriber_it_connects_to(
        sim_process: Any, sub: Subscriber) -> None:  # noqa: F811
    port = sub.sock.bind_to_random_port("tcp://127.0.0.1")  # no "*": the simulator connects
    flag = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                       "endpoint": f"tcp://127.0.0.1:{port}", "topic": TOPIC})
    proc: SimProcess = await sim_process("--kv-events-config", flag, "--block-size", "16")
    await sub.subscribed(proc.url)

    await post(f"{proc.base_url}/completions",
               {"model": MODEL, "prompt": CONTENT, "max_tokens": 1, "cache_salt": "t"})
    stored = await sub.stored()
    assert stored.token_ids == full_blocks(TokenIds().text_prompt(CONTENT))
    assert stored.extra_keys is not None and stored.extra_keys[0] == ["t"]

    await post(f"{proc.base_url}/completions",
               {"model": MODEL, "prompt": list(range(2000, 2040)), "max_tokens": 1})
    assert (await sub.stored()).token_ids == list(range(2000, 2032))

    await post(f"{proc.base_url}/responses",
               {"model": MODEL, "input": CONTENT, "max_output_tokens": 1})
    stored = await sub.stored()
    assert stored.token_ids == full_blocks(TokenIds().chat_prompt([("user", CONTENT)]))
    assert stored.extra_keys is not None and stored.extra_keys[0] is None
