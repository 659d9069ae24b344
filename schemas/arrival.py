"""Whether an event may arrive on a subject: what every receiver checks before believing it.

NATS permissions decide who may publish on a subject (a node only on ``node.*.<own id>``);
these checks make sure the message says nothing else than its subject: the subject is the
event's own (its type and routing token: a ``node.heartbeat.A`` carries node A), and its
`stream` is the canonical stream of its aggregate (a node event claiming ``tenant:…`` would
land in the log under another aggregate). Pure.
"""

from __future__ import annotations

from typing import Any

from schemas.events import EVENT_TYPES, PLATFORM, Event, subject_for

__all__ = ["canonical_stream", "mismatch", "raw_mismatch"]


def canonical_stream(event: Event) -> str:
    """The stream an event of this payload belongs to: ``<aggregate>:<stream field>``."""
    return f"{event.aggregate}:{getattr(event, event.stream_field)}"


def mismatch(event: Event, subject: str) -> str | None:
    """Why `event` may not arrive on `subject`, or None when it may."""
    # Every consumed message comes through here (billing: thousands a second): each field is
    # read and formatted once.
    cls = type(event)
    key = str(getattr(event, cls.stream_field))
    if cls.subject_field is None or cls.subject_field == cls.stream_field:
        token = key
    else:
        value = getattr(event, cls.subject_field)
        token = PLATFORM if value is None else str(value)
    event_type = event.type
    if subject != f"{event_type}.{token}":
        return f"{event_type} of {token} on subject {subject!r}"
    stream = f"{cls.aggregate}:{key}"
    if event.stream != stream:
        return f"{event_type} claiming stream {event.stream!r}, not {stream!r}"
    return None


def raw_mismatch(data: dict[str, Any], subject: str) -> str | None:
    """`mismatch` for an event read as a JSON object (readers that do not decode into the
    typed events). A type this build does not know (a newer writer) is checked as far as it
    can be: its subject must be the one `subject_for` gives it."""
    event_type, stream = data.get("type"), data.get("stream") or ""
    if not isinstance(event_type, str) or not isinstance(stream, str):
        return "an event without a type or a stream"
    cls = EVENT_TYPES.get(event_type)
    if cls is not None:
        value = data.get(cls.stream_field)
        if value is None:
            return f"{event_type} without its {cls.stream_field}"
        canonical = f"{cls.aggregate}:{value}"
        if not stream:
            stream = canonical  # the typed decoder derives it the same way
        elif stream != canonical:
            return f"{event_type} claiming stream {stream!r}, not {canonical!r}"
    elif not stream:
        return f"{event_type} without a stream"
    expected = subject_for(event_type, stream, data)
    if subject != expected:
        token = expected.removeprefix(event_type + ".")
        return f"{event_type} of {token} on subject {subject!r}"
    return None
