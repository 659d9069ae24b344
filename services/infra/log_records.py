"""What readers of the event log see: positions in its global order, recorded events, and the
filter that selects them (the same test in SQL and in memory)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import msgspec

from schemas.events import Event, decode_event

Origin = Literal["log", "bus"]
"""Where an event came from: appended to the log, or recorded from the bus."""

_json = msgspec.json.Encoder()
_json_decode = msgspec.json.decode


@dataclass(frozen=True, order=True, slots=True)
class LogPosition:
    """A place in the log's global order; readers resume strictly after it."""

    transaction_id: int
    position: int

    def __str__(self) -> str:
        return f"{self.transaction_id}:{self.position}"


START: Final = LogPosition(0, 0)


class RecordedEvent:
    """An event as the log holds it. The payload stays the JSON text PostgreSQL returned until
    someone asks: `data` parses it, `wire()` splices the envelope onto it without parsing, and
    `event` decodes the typed struct from those bytes (msgspec's fast path)."""

    __slots__ = ("_data", "_event", "event_id", "occurred_at", "origin", "position",
                 "raw_data", "raw_metadata", "recorded_at", "stream", "stream_version",
                 "transaction_id", "type")

    def __init__(self, *, position: int, transaction_id: int, event_id: Any, stream: str,
                 stream_version: int, type: str, raw_data: str, raw_metadata: str,
                 occurred_at: datetime, recorded_at: datetime, origin: str,
                 event: Event | None = None) -> None:
        self.position = position
        self.transaction_id = transaction_id
        self.event_id = event_id
        self.stream = stream
        self.stream_version = stream_version
        self.type = type
        self.raw_data = raw_data
        self.raw_metadata = raw_metadata
        self.occurred_at = occurred_at
        self.recorded_at = recorded_at
        self.origin = origin
        self._data: dict[str, Any] | None = None
        self._event = event

    @property
    def checkpoint(self) -> LogPosition:
        return LogPosition(self.transaction_id, self.position)

    @property
    def data(self) -> dict[str, Any]:
        """The typed payload's fields, as JSON builtins."""
        if self._data is None:
            self._data = _json_decode(self.raw_data)
        return self._data

    @property
    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = _json_decode(self.raw_metadata)
        return meta

    def wire(self) -> bytes:
        """The event's JSON as `encode_event` would give it (keys in another order), built
        without decoding: the outbox relay can publish a type this build does not know."""
        head = _json.encode({"type": self.type, "id": str(self.event_id), "stream": self.stream,
                             "occurred_at": self.occurred_at})
        body = self.raw_data.strip().encode()
        meta = self.raw_metadata.encode()
        rest = b"}" if body == b"{}" else b"," + body[1:]
        return head[:-1] + b',"metadata":' + meta + rest

    @property
    def event(self) -> Event:
        """The typed event. EventDecodeError for a type this code does not know (a newer
        writer during a rolling deploy): callers that only pass events on use `wire()`."""
        if self._event is None:
            self._event = decode_event(self.wire())
        return self._event

    def __repr__(self) -> str:
        return (f"RecordedEvent(position={self.position}, type={self.type!r}, "
                f"stream={self.stream!r}, version={self.stream_version})")


@dataclass(frozen=True)
class EventFilter:
    """Which events a reader wants. Non-matching events are still scanned (and passed over by
    the reader's checkpoint) but their payload is not transferred."""

    types: tuple[str, ...] = ()
    """Glob patterns on the type: ``node.*``."""
    stream: str | None = None
    """A stream name, or a glob: ``node:*``."""
    origin: Origin | None = None
    min_position: int | None = None
    since: datetime | None = None

    def matches(self, event: RecordedEvent) -> bool:
        """The same test as the SQL, for events already in memory."""
        if self.types and not any(fnmatch.fnmatchcase(event.type, t) for t in self.types):
            return False
        if self.stream is not None and not fnmatch.fnmatchcase(event.stream, self.stream):
            return False
        if self.origin is not None and event.origin != self.origin:
            return False
        if self.min_position is not None and event.position < self.min_position:
            return False
        return self.since is None or event.recorded_at >= self.since


def glob_to_like(pattern: str) -> str:
    """``node.*`` → ``node.%``, with LIKE's own wildcards escaped."""
    out = []
    for ch in pattern:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def filter_sql(flt: EventFilter, first_param: int) -> tuple[str, list[Any]]:
    """`flt` as an SQL condition on ``events``, its parameters numbered from `first_param`."""
    clauses: list[str] = []
    params: list[Any] = []

    def param(value: Any) -> str:
        params.append(value)
        return f"${first_param + len(params) - 1}"

    if flt.types:
        clauses.append(f"type LIKE ANY({param([glob_to_like(t) for t in flt.types])}::text[])")
    if flt.stream is not None:
        clauses.append(f"stream LIKE {param(glob_to_like(flt.stream))}")
    if flt.origin is not None:
        clauses.append(f"origin = {param(flt.origin)}")
    if flt.min_position is not None:
        clauses.append(f"position >= {param(flt.min_position)}")
    if flt.since is not None:
        clauses.append(f"recorded_at >= {param(flt.since)}")
    return (" AND ".join(clauses) or "TRUE"), params
