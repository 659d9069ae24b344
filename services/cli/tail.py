"""`crosslogic events tail`: history from the log, then live, one line per event."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import msgspec

from services.core.db import create_pool
from services.core.eventlog import START, EventFilter, EventLog, LogWaker, RecordedEvent

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``10m`` / ``2h`` / ``7d`` ago, or an ISO-8601 time (UTC when it has no zone)."""
    now = now or datetime.now(UTC)
    match = _DURATION.match(value.strip())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--since wants a duration like 10m, 2h, 7d or an ISO time, "
                         f"not {value!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


_json = msgspec.json.Encoder()


def format_line(e: RecordedEvent) -> str:
    """One human line: time, position, type, stream, payload."""
    when = e.recorded_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    payload = _json.encode(e.data).decode()
    return f"{when}  #{e.position:<8} {e.type:<32} {e.stream}  {payload}"


def format_json(e: RecordedEvent) -> str:
    """One JSON object per line, for machines: the event in its wire form plus log fields."""
    record: dict[str, Any] = {
        "position": e.position,
        "stream_version": e.stream_version,
        "recorded_at": e.recorded_at,
        "origin": e.origin,
        "event": msgspec.Raw(e.wire()),
    }
    return _json.encode(record).decode()


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
