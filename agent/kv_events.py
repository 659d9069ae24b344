"""Relaying vLLM's KV cache events to the gateways: what `kv_aware` routing is built from.

vLLM publishes them on ZeroMQ (``--kv-events-config``: a PUB socket; each message is
``(topic, 8-byte big-endian sequence number, msgpack KVEventBatch)``). The agent subscribes
there and publishes each batch on core NATS, on this node's own subject
(``node.kv_events.<node id>``, the only one its credential may use for them), with vLLM's
sequence number in the ``Kv-Seq`` header: a gateway that sees it go back knows the engine
restarted and forgets what it knew of this node.

What is not a batch in vLLM's shape is dropped and counted, never relayed; a batch larger
than a NATS message may be is split into batches of whole blocks (`split_batch`, pure).
Core NATS, not JetStream: an event lost costs a gateway a cache hit, never an answer, and a
gateway starting late learns the cache as it is used again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import structlog
import zmq
import zmq.asyncio

from schemas.kv_events import (
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    KvEventDecodeError,
    decode_batch,
    encode_batch,
)
from schemas.subjects import KV_SEQ_HEADER, node_kv_events_subject

log = structlog.get_logger("agent.kv_events")

Publish = Callable[[str, bytes, dict[str, str]], Awaitable[None]]

MAX_BYTES: Final = 60 * 1024
"""Under the node credential's 64 KiB payload limit, with room for headers."""


def split_batch(batch: KVEventBatch, max_bytes: int = MAX_BYTES) -> Iterator[bytes]:
    """`batch` encoded in as few batches of at most `max_bytes` as whole events allow; an
    event too large alone is cut into events of fewer blocks (a stored run keeps its chain:
    each part's parent is the last block of the part before)."""
    whole = encode_batch(batch)
    if len(whole) <= max_bytes:
        yield whole
        return
    pending: list[KVEvent] = []
    for event in batch.events:
        for part in _parts(event, max_bytes):
            trial = encode_batch(KVEventBatch(ts=batch.ts, events=[*pending, part],
                                              data_parallel_rank=batch.data_parallel_rank))
            if len(trial) > max_bytes and pending:
                yield encode_batch(KVEventBatch(ts=batch.ts, events=pending,
                                                data_parallel_rank=batch.data_parallel_rank))
                pending = []
            pending.append(part)
    if pending:
        yield encode_batch(KVEventBatch(ts=batch.ts, events=pending,
                                        data_parallel_rank=batch.data_parallel_rank))


def _parts(event: KVEvent, max_bytes: int) -> Iterator[KVEvent]:
    if len(encode_batch(KVEventBatch(ts=0.0, events=[event]))) <= max_bytes \
            or not isinstance(event, (BlockStored, BlockRemoved)) or len(event.block_hashes) < 2:
        yield event
        return
    half = len(event.block_hashes) // 2
    if isinstance(event, BlockRemoved):
        yield from _parts(BlockRemoved(block_hashes=event.block_hashes[:half],
                                       medium=event.medium), max_bytes)
        yield from _parts(BlockRemoved(block_hashes=event.block_hashes[half:],
                                       medium=event.medium), max_bytes)
        return
    cut = half * event.block_size
    keys = event.extra_keys
    yield from _parts(BlockStored(
        block_hashes=event.block_hashes[:half], parent_block_hash=event.parent_block_hash,
        token_ids=event.token_ids[:cut], block_size=event.block_size, lora_id=event.lora_id,
        medium=event.medium, lora_name=event.lora_name,
        extra_keys=None if keys is None else keys[:half]), max_bytes)
    yield from _parts(BlockStored(
        block_hashes=event.block_hashes[half:], parent_block_hash=event.block_hashes[half - 1],
        token_ids=event.token_ids[cut:], block_size=event.block_size, lora_id=event.lora_id,
        medium=event.medium, lora_name=event.lora_name,
        extra_keys=None if keys is None else keys[half:]), max_bytes)


class KvEventRelay:
    """Reads vLLM's KV events at `endpoint` (topic `topic`) and publishes them for `node_id`."""

    def __init__(self, endpoint: str, topic: str, node_id: object, publish: Publish) -> None:
        self.endpoint = endpoint
        self.topic = topic
        self.subject = node_kv_events_subject(node_id)
        self.publish = publish
        self.relayed = 0
        self.refused = 0

    async def run(self) -> None:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
            sock.connect(self.endpoint)
            log.info("relaying kv cache events", endpoint=self.endpoint, subject=self.subject)
            while True:
                frames = await sock.recv_multipart()
                await self.relay(frames)
        finally:
            sock.close(linger=0)
            ctx.term()

    async def relay(self, frames: list[bytes]) -> None:
        """One ZeroMQ message: relayed when it is a batch in vLLM's shape, else counted."""
        if len(frames) != 3 or len(frames[1]) != 8:
            self._refuse("not (topic, seq, payload)")
            return
        seq = int.from_bytes(frames[1], "big")
        try:
            batch = decode_batch(frames[2])
        except KvEventDecodeError as exc:
            self._refuse(str(exc))
            return
        headers = {KV_SEQ_HEADER: str(seq)}
        for payload in split_batch(batch):
            await self.publish(self.subject, payload, headers)
            self.relayed += 1
        await asyncio.sleep(0)  # a burst of batches must not starve heartbeats

    def _refuse(self, why: str) -> None:
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:  # 1st, 2nd, 4th, …: a flood logs little
            log.warning("dropped a kv event message that is not vLLM's", reason=why,
                        dropped=self.refused)
