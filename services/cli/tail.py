"""`crosslogic events tail`: history from the log, then live, one line per event."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC
from typing import TextIO

import msgspec

from services.infra.db import create_pool
from services.infra.event_json import record_json
from services.infra.eventlog import EventLog
from services.infra.log_records import START, EventFilter, RecordedEvent
from services.infra.log_waker import LogWaker
from services.infra.timeparse import parse_since

__all__ = ["format_json", "format_line", "parse_since", "tail"]

_json = msgspec.json.Encoder()


def format_line(e: RecordedEvent) -> str:
    """One human line: time, position, type, stream, payload."""
    when = e.recorded_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    payload = _json.encode(e.data).decode()
    return f"{when}  #{e.position:<8} {e.type:<32} {e.stream}  {payload}"


def format_json(e: RecordedEvent) -> str:
    """One JSON object per line, for machines: the same object the admin API serves."""
    return record_json(e).decode()


async def tail(dsn: str, flt: EventFilter, *, follow: bool, as_json: bool,
               out: TextIO = sys.stdout, poll_interval: float = 1.0,
               on_caught_up: Callable[[], None] | None = None) -> int:
    """Print matching events; with `follow`, keep printing new ones until cancelled."""
    fmt = format_json if as_json else format_line
    pool = await create_pool(dsn, min_size=1, max_size=2)
    waker = LogWaker(dsn, poll_interval=poll_interval) if follow else None
    printed = 0
    try:
        if waker is not None:
            await waker.start()
        log = EventLog(pool)
        checkpoint = START
        caught_up_once = False
        while True:
            generation = waker.generation if waker else 0
            page = await log.read_all(checkpoint, 1000, flt)
            for e in page.events:
                out.write(fmt(e) + "\n")
                printed += 1
            out.flush()
            checkpoint = page.next
            if not page.caught_up:
                continue
            if not caught_up_once:
                caught_up_once = True
                if on_caught_up is not None:
                    on_caught_up()
            if waker is None:
                return printed
            await waker.wait(generation)
    finally:
        if waker is not None:
            await waker.close()
        await pool.close()
