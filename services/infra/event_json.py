"""One recorded event as JSON, for machines: the event in its wire form (as on NATS) plus the
log's own fields. `crosslogic events tail --json` prints it one per line; the admin API's
`/events` returns it and `/events/stream` sends it as each server-sent event's data, so a
script reads the same object from any of them."""

from __future__ import annotations

from typing import Any

import msgspec

from services.infra.log_records import RecordedEvent

_json = msgspec.json.Encoder()


def record_json(e: RecordedEvent) -> bytes:
    """``{"position", "stream_version", "recorded_at", "origin", "event"}``; the event is
    spliced in from the log's JSON without decoding it, so types this build does not know
    pass through too."""
    record: dict[str, Any] = {
        "position": e.position,
        "stream_version": e.stream_version,
        "recorded_at": e.recorded_at,
        "origin": e.origin,
        "event": msgspec.Raw(e.wire()),
    }
    return _json.encode(record)
