"""KV cache events on ZeroMQ, as vLLM's ``ZmqEventPublisher`` sends them
(vllm/distributed/kv_events.py).

A PUB socket, bound when the endpoint has ``*`` or ``::`` or is ``ipc://``/``inproc://``,
else connected. Each batch is one message of three frames: the topic, the batch's sequence
number (8 bytes, big-endian, counting from 0) and the msgpack `KVEventBatch`. A subscriber
that sees a number skipped has missed a batch.

The events of one loop turn go out as one batch (vLLM sends one per engine step):
`schedule` asks for a flush on the loop's next turn, so requests looked up in the same turn
share it. Sending never blocks the loop: a message that does not fit under the high-water mark
is dropped (vLLM's PUB socket drops it too), and its number is not sent again. Not simulated:
the replay socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import zmq

from agent.simulator.kv_cache import KvCache
from agent.simulator.prefix_cache import KvEvent
from schemas.kv_events import MAX_EVENTS_PER_BATCH, KVEventBatch, encode_batch

__all__ = ["HWM", "BatchFramer", "KvEventPublisher", "KvPublisherError", "binds",
           "publishing"]

HWM: Final = 100_000
"""vLLM's default ``hwm``: messages queued per subscriber before new ones are dropped."""

Frames = tuple[bytes, bytes, bytes]


def binds(endpoint: str) -> bool:
    """Whether vLLM binds this endpoint (else it connects to it)."""
    return ("*" in endpoint or "::" in endpoint or endpoint.startswith("ipc://")
            or endpoint.startswith("inproc://"))


class BatchFramer:
    """Events into numbered messages. Pure."""

    def __init__(self, topic: str) -> None:
        self.topic = topic.encode()
        self.seq = 0
        """The number of the next message."""

    def frames(self, events: Sequence[KvEvent], ts: float) -> Iterator[Frames]:
        """One message per `MAX_EVENTS_PER_BATCH` events (none for no events)."""
        for start in range(0, len(events), MAX_EVENTS_PER_BATCH):
            batch = KVEventBatch(ts=ts, events=list(events[start:start + MAX_EVENTS_PER_BATCH]),
                                 data_parallel_rank=0)
            seq, self.seq = self.seq, self.seq + 1
            yield self.topic, seq.to_bytes(8, "big"), encode_batch(batch)


class KvPublisherError(OSError):
    """The endpoint could not be bound or connected."""


class KvEventPublisher:
    """Publishes what `drain` returns, on `endpoint`; `open` and `close` in the loop."""

    def __init__(self, endpoint: str, topic: str, drain: Callable[[], list[KvEvent]], *,
                 context: zmq.Context[zmq.Socket[bytes]] | None = None,
                 hwm: int = HWM) -> None:
        self.endpoint = endpoint
        self.framer = BatchFramer(topic)
        self._drain = drain
        self._context = context
        self._hwm = hwm
        self._socket: zmq.Socket[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self.sent = 0
        self.dropped = 0
        """Messages not sent: the high-water mark was reached."""

    def open(self) -> None:
        context = self._context or zmq.Context.instance()
        socket = context.socket(zmq.PUB)
        socket.setsockopt(zmq.SNDHWM, self._hwm)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            if binds(self.endpoint):
                socket.bind(self.endpoint)
            else:
                socket.connect(self.endpoint)
        except zmq.ZMQError as exc:
            socket.close()
            raise KvPublisherError(f"KV events endpoint {self.endpoint}: {exc}") from None
        self._socket = socket
        self._loop = asyncio.get_running_loop()

    def schedule(self) -> None:
        """Flush on the loop's next turn (once, however often it is asked in this one)."""
        if self._scheduled or self._loop is None:
            return
        self._scheduled = True
        self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        socket = self._socket
        events = self._drain()
        if socket is None or not events:
            return
        for frames in self.framer.frames(events, time.time()):
            try:
                socket.send_multipart(frames, flags=zmq.NOBLOCK)
                self.sent += 1
            except zmq.Again:
                self.dropped += 1

    def close(self) -> None:
        """Send what is pending, then close (pending messages are not waited for)."""
        self.flush()
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = None
        self._loop = None


@contextlib.contextmanager
def publishing(cache: KvCache, endpoint: str, topic: str) -> Iterator[KvEventPublisher]:
    """`cache`'s events published on `endpoint` until the block ends (in the loop)."""
    publisher = KvEventPublisher(endpoint, topic, cache.drain_events)
    publisher.open()
    cache.on_events = publisher.schedule
    try:
        yield publisher
    finally:
        cache.on_events = None
        publisher.close()
