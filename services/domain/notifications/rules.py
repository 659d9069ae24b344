"""Who hears what: event type patterns, tenant isolation, and what an event may show. Pure.

A subscription names globs on the event type (``node.*``, ``billing.payment_failed``, ``*``);
`*` and `?` are fnmatch's (``*`` crosses dots), like the event log's type filters. Patterns are
not checked against the types this build knows: a pattern may name a type another service adds
later (``deployment.no_active_nodes``). The notifier hears the NODES and CONTROL streams only;
heartbeats and usage are far too many to notify on, so patterns that could only ever reach them
are refused when the subscription is made.

Tenant isolation: a platform subscription (no tenant) hears every event its patterns match; a
tenant's subscription hears only events whose payload carries that tenant's `tenant_id`. An
event without a `tenant_id` (nodes, deployments, alerts) never reaches a tenant.
"""

from __future__ import annotations

import fnmatch
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from schemas.events import EVENT_TYPES
from schemas.subjects import CONTROL, NODES, stream_for_subject

MAX_PATTERNS = 20
MAX_PATTERN_LENGTH = 100
PATTERN_REGEX = rf"^[a-z0-9_.*?]{{1,{MAX_PATTERN_LENGTH}}}$"
"""An event type pattern's syntax: what `check_patterns` takes and the OpenAPI document
states."""
PATTERN = re.compile(PATTERN_REGEX)
HIGH_VOLUME_NAMESPACES = frozenset({"usage"})
"""First segments the notifier never hears (the USAGE stream holds ``usage.>``)."""


def heard_types() -> frozenset[str]:
    """The event types this build knows that travel on the streams the notifier consumes."""
    heard = {NODES.name, CONTROL.name}
    return frozenset(t for t in EVENT_TYPES
                     if (spec := stream_for_subject(f"{t}.x")) is not None and spec.name in heard)


def unheard_types() -> frozenset[str]:
    return frozenset(EVENT_TYPES) - heard_types()


class PatternError(ValueError):
    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


def check_patterns(patterns: Sequence[str]) -> list[str]:
    """The patterns, checked: syntax, no repeats, nothing only heartbeats or usage could
    match. PatternError names the offending one by index."""
    if not patterns:
        raise PatternError("at least one event type pattern is needed", 0)
    if len(patterns) > MAX_PATTERNS:
        raise PatternError(f"at most {MAX_PATTERNS} event type patterns", MAX_PATTERNS)
    heard, unheard = heard_types(), unheard_types()
    seen: set[str] = set()
    for i, pattern in enumerate(patterns):
        if "\x00" in pattern:
            raise PatternError("an event type pattern contains a NUL character (U+0000)", i)
        if not PATTERN.fullmatch(pattern):  # (match would take a trailing newline)
            raise PatternError(
                f"{pattern[:80]!r} is not an event type pattern (lower-case letters, digits, "
                "'_', '.', and the wildcards '*' and '?')", i)
        if pattern in seen:
            raise PatternError(f"{pattern!r} is given twice", i)
        seen.add(pattern)
        reason = refused_reason(pattern, heard, unheard)
        if reason is not None:
            raise PatternError(reason, i)
    return list(patterns)


def refused_reason(pattern: str, heard: Iterable[str], unheard: Iterable[str]) -> str | None:
    """Why `pattern` cannot be subscribed to, or None. Refused: a namespace that is high volume
    by nature (``usage.*``), and a pattern that matches some unheard type (``node.heartbeat``)
    but no heard one. ``node.*`` and ``*`` are fine: they match heard types, and simply never
    see heartbeats."""
    namespace = pattern.split(".", 1)[0]
    if namespace in HIGH_VOLUME_NAMESPACES:
        return (f"{pattern!r}: usage events are not delivered (one per inference request); "
                "subscribe to billing.* for what billing makes of them")
    hits_unheard = [t for t in unheard if fnmatch.fnmatchcase(t, pattern)]
    if hits_unheard and not any(fnmatch.fnmatchcase(t, pattern) for t in heard):
        return (f"{pattern!r} only matches {', '.join(sorted(hits_unheard))}, which is not "
                "delivered (heartbeats and usage are observations, too many to notify on); "
                "node.status_changed tells when a node's state changes")
    return None


def matches_type(patterns: Iterable[str], event_type: str) -> bool:
    return any(fnmatch.fnmatchcase(event_type, p) for p in patterns)


# --------------------------------------------------------------------------- events as seen here


@dataclass(frozen=True)
class EventFacts:
    """What matching needs from an event, read from its JSON form (so types this build does
    not know yet are matched like any other)."""

    id: uuid.UUID
    type: str
    occurred_at: datetime
    tenant_id: uuid.UUID | None
    about_subscription: uuid.UUID | None
    """For ``notification.*`` events: the subscription they are about."""


@dataclass(frozen=True)
class SubscriptionRule:
    id: uuid.UUID
    tenant_id: uuid.UUID | None
    event_types: tuple[str, ...]
    created_at: datetime


def _uuid_or_none(value: Any) -> uuid.UUID | None:
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


_TYPE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")


def facts_of(event: Mapping[str, Any]) -> EventFacts:
    """ValueError when `event` is not an event's JSON object (no type, id or time)."""
    event_type = event.get("type")
    if not isinstance(event_type, str) or not _TYPE.match(event_type):
        raise ValueError(f"not an event type: {str(event_type)[:80]!r}")
    event_id = _uuid_or_none(event.get("id"))
    if event_id is None:
        raise ValueError("the event has no valid id")
    occurred = event.get("occurred_at")
    try:
        occurred_at = datetime.fromisoformat(occurred) if isinstance(occurred, str) else None
    except ValueError:
        occurred_at = None
    if occurred_at is None or occurred_at.tzinfo is None:
        raise ValueError("the event has no valid occurred_at")
    about = (_uuid_or_none(event.get("subscription_id"))
             if event_type.startswith("notification.") else None)
    return EventFacts(event_id, event_type, occurred_at, _uuid_or_none(event.get("tenant_id")),
                      about)


def audience_allows(subscription_tenant: uuid.UUID | None,
                    event_tenant: uuid.UUID | None) -> bool:
    """Platform subscriptions hear all; a tenant's only events carrying its own id."""
    if subscription_tenant is None:
        return True
    return event_tenant is not None and event_tenant == subscription_tenant


def wants(rule: SubscriptionRule, facts: EventFacts) -> bool:
    """Should `rule`'s endpoint get this event?"""
    if not matches_type(rule.event_types, facts.type):
        return False
    if not audience_allows(rule.tenant_id, facts.tenant_id):
        return False
    if facts.about_subscription == rule.id:
        # An endpoint's own failure is not news to it, and telling it would feed a loop.
        return False
    # A subscription hears what happens from its creation on: a notifier whose consumer
    # starts from the beginning of a stream does not send a month of history.
    return facts.occurred_at >= rule.created_at


def recipients(rules: Iterable[SubscriptionRule], facts: EventFacts) -> list[uuid.UUID]:
    return [r.id for r in rules if wants(r, facts)]


# --------------------------------------------------------------------------- what may be shown

SENSITIVE_KEYS = frozenset({"key_hash", "secret", "signing_secret", "password", "token",
                            "api_key", "authorization"})
_SENSITIVE_SUFFIXES = ("_secret", "_password", "_token")


def is_sensitive(key: str) -> bool:
    lowered = key.lower()
    return lowered in SENSITIVE_KEYS or lowered.endswith(_SENSITIVE_SUFFIXES)


def redact(value: Any) -> Any:
    """`value` without sensitive fields, at any depth (an API key's hash is not for a
    webhook; ``tokens_per_minute`` is a limit, not a secret, and stays)."""
    if isinstance(value, Mapping):
        return {k: redact(v) for k, v in value.items() if not is_sensitive(str(k))}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value
