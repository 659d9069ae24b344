"""Publishing `usage.recorded` without delaying responses, and without losing any.

`submit()` only puts the event in a bounded in-memory queue. A background task publishes
batches to JetStream (pipelined, each with Nats-Msg-Id = event id, so a retry or a replay is
stored once). When NATS does not take them — down, restarting, or the queue is full — events
go to a spool file on local disk, one JSON line each; once publishing works again the spool is
replayed and deleted. A spool left by a gateway that died is replayed by the next one started
with the same spool folder.

Several gateways (`--workers N`) share one folder. Each writes only to files it created itself
(a fresh name each time) and holds an exclusive `flock` on the one it has open; a replay takes
the same lock first, so it never reads, let alone deletes, a file another live gateway is still
appending to. The kernel drops the locks of a process that dies, which is what makes its files
free to replay.

What can still be lost: events in memory when the process is killed (-9) while NATS is up —
the few milliseconds between the response and the publish. Writing every event to disk first
would cost a synchronous write per request; we chose not to.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import BinaryIO

import nats.errors
import structlog
from nats.js import api
from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas.events import UsageRecorded, decode_event, encode_event
from services.infra.aio import within
from services.infra.bus import Bus

log = structlog.get_logger("usage")

PUBLISH_TIMEOUT = 2.0


class UsageMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.published = Counter("usage_events_published_total",
                                 "usage.recorded events stored in JetStream", registry=registry)
        self.spooled = Counter("usage_events_spooled_total",
                               "usage.recorded events written to the local spool",
                               registry=registry)
        self.queued = Gauge("usage_events_queued", "usage.recorded events waiting in memory",
                            registry=registry)


class UsagePublisher:
    def __init__(self, bus: Bus, spool_dir: Path, *, buffer_size: int = 10_000,
                 batch_size: int = 256, retry_interval: float = 1.0,
                 registry: CollectorRegistry | None = None) -> None:
        self.bus = bus
        self.spool_dir = spool_dir
        self.batch_size = batch_size
        self.retry_interval = retry_interval
        self.metrics = UsageMetrics(registry)
        self._queue: asyncio.Queue[UsageRecorded] = asyncio.Queue(maxsize=buffer_size)
        self._spool_prefix = f"usage-{os.getpid()}-{time.time_ns()}"
        self._spool_files = 0
        self._spool_file: BinaryIO | None = None
        self._last_try = 0.0
        self._healthy = True
        self._in_hand: list[UsageRecorded] = []
        """Taken off the queue, not yet acknowledged or spooled: if the task is cancelled
        (shutdown) in between, close() still has them."""

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, event: UsageRecorded) -> None:
        """Never blocks and never fails: the queue, or the spool when the queue is full."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._spool([event])
        self.metrics.queued.set(self._queue.qsize())

    # ------------------------------------------------------------------ the background task

    async def run(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        if not await self._replay_spools():
            self._unhealthy()  # so the loop below keeps trying, requests or not
        while True:
            if self._healthy:
                first = await self._queue.get()
            else:
                # While NATS is away, keep trying to replay even if no request comes in.
                try:
                    first = await within(self._queue.get(), self.retry_interval)
                except TimeoutError:
                    await self._try_recover()
                    continue
            batch = self._in_hand = [first]
            while len(batch) < self.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self.metrics.queued.set(self._queue.qsize())
            if self._healthy:
                failed = await self._publish(batch)
                self._in_hand = []
                if failed:
                    self._spool(failed)
                    self._unhealthy()
            else:
                self._spool(batch)
                self._in_hand = []
                await self._try_recover()

    async def _publish(self, events: list[UsageRecorded]) -> list[UsageRecorded]:
        """Publish pipelined; returns the events JetStream did not acknowledge."""
        if not self.bus.connected:
            return events
        futures: list[asyncio.Future[api.PubAck]] = []
        try:
            for e in events:
                futures.append(await self.bus.js.publish_async(
                    e.subject, encode_event(e), headers={"Nats-Msg-Id": str(e.id)}))
        except (nats.errors.Error, OSError):
            pass
        failed = list(events[len(futures):])
        if futures:
            _, pending = await asyncio.wait(futures, timeout=PUBLISH_TIMEOUT)
            for event, future in zip(events, futures, strict=False):
                if future in pending or future.cancelled() or future.exception() is not None:
                    failed.append(event)
            for f in pending:
                f.cancel()
        self.metrics.published.inc(len(events) - len(failed))
        return failed

    def _unhealthy(self) -> None:
        if self._healthy:
            log.warning("usage publishing failed; spooling to disk until NATS answers",
                        spool=str(self.spool_dir))
        self._healthy = False

    async def _try_recover(self) -> None:
        """While unhealthy, try a spool replay at most every retry_interval."""
        now = time.monotonic()
        if now - self._last_try < self.retry_interval:
            return
        self._last_try = now
        if await self._replay_spools():
            self._healthy = True
            log.info("usage publishing recovered; spool replayed")

    async def retry_now(self) -> bool:
        """Replay the spools at once (tests, shutdown); True when all of ours are published."""
        return await self._replay_spools()

    # ------------------------------------------------------------------ the spool

    def _spool(self, events: list[UsageRecorded]) -> None:
        if self._spool_file is None:
            self._spool_file = self._open_spool()
        f = self._spool_file
        for e in events:
            f.write(encode_event(e) + b"\n")
        f.flush()  # appends of a few microseconds, no fsync (see the module docstring)
        self.metrics.spooled.inc(len(events))

    def _open_spool(self) -> BinaryIO:
        """A new spool file of ours, locked before anything is written to it."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        while True:
            self._spool_files += 1
            path = self.spool_dir / f"{self._spool_prefix}-{self._spool_files}.jsonl"
            f = open(path, "xb")  # noqa: SIM115
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # A replay found it between our create and our lock: it is that replay's now
                # (empty, so it only deletes it); we take the next name.
                f.close()
                continue
            return f

    async def _close_spool(self) -> None:
        if self._spool_file is not None:
            f, self._spool_file = self._spool_file, None
            await asyncio.to_thread(_sync_and_close, f)

    async def _replay_spools(self) -> bool:
        """Publish every spool file in the folder that no live gateway holds (ours, and those
        of gateways that died); delete each once all its events are acknowledged. True when
        all of ours are published."""
        await self._close_spool()
        for path in sorted(self.spool_dir.glob("usage-*.jsonl")):
            claimed = await asyncio.to_thread(_claim, path)
            if claimed is None:
                continue  # another gateway's open spool, or already replayed
            try:
                events = await asyncio.to_thread(_read_spool, claimed, path)
                for start in range(0, len(events), self.batch_size):
                    if await self._publish(events[start:start + self.batch_size]):
                        return False  # kept for the next try
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # while still locked: nobody can claim it in between
                if events:
                    log.info("usage spool replayed", events=len(events), spool=path.name)
            finally:
                claimed.close()
        # Other gateways' open spools are theirs to replay; one we opened meanwhile (the queue
        # overflowed during the replay) is not done yet.
        return self._spool_file is None

    async def close(self) -> None:
        """Publish what is queued; spool whatever NATS will not take. A batch the cancelled
        task was publishing goes again: its event ids make a second copy harmless."""
        remaining, self._in_hand = self._in_hand, []
        while not self._queue.empty():
            remaining.append(self._queue.get_nowait())
        if remaining:
            failed = await self._publish(remaining) if self._healthy else remaining
            if failed:
                self._spool(failed)
        with contextlib.suppress(OSError):
            await self._close_spool()


def _sync_and_close(f: BinaryIO) -> None:
    try:
        f.flush()
        os.fsync(f.fileno())
    finally:
        f.close()  # and with it our lock


def _claim(path: Path) -> BinaryIO | None:
    """The spool file at `path`, opened and exclusively locked; None when a live gateway holds
    it, or it is gone (replayed by another)."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Locked; but if another replay deleted it meanwhile, this is a file nobody can see.
        if os.fstat(f.fileno()).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)
    except (BlockingIOError, FileNotFoundError):
        f.close()
        return None
    return f


def _read_spool(f: BinaryIO, path: Path) -> list[UsageRecorded]:
    """A spool file's events; unreadable lines are kept aside in a .bad file, not dropped."""
    events: list[UsageRecorded] = []
    for line in f.read().splitlines():
        if not line.strip():
            continue
        try:
            event = decode_event(line)
        except ValueError:
            log.error("unreadable line in usage spool; kept aside", spool=str(path))
            with open(path.with_suffix(".bad"), "ab") as bad:
                bad.write(line + b"\n")
            continue
        if isinstance(event, UsageRecorded):
            events.append(event)
    return events
