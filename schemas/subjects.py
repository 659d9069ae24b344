"""NATS subject names and the JetStream streams that hold them: the one place they are spelled.

Subjects are ``<event type>.<routing token>``: ``node.heartbeat.<node_id>``,
``usage.recorded.<tenant_id>``, ``apikey.revoked.<tenant_id>``. Operators filter with wildcards
(``node.*.<id>``, ``tenant.>``). Every event type is held by exactly one stream (a test checks).
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.events import EVENT_TYPES, PLATFORM

__all__ = [
    "BILLING_SETTLE",
    "CONTROL",
    "CONTROL_VIEW",
    "DLQ",
    "DLQ_PREFIX",
    "HEARTBEATS",
    "KV_SEQ_HEADER",
    "NODES",
    "NODES_VIEW",
    "NODE_KV_EVENTS",
    "PLATFORM",
    "STREAMS",
    "USAGE",
    "StreamSpec",
    "dlq_subject",
    "event_subject",
    "node_ack_subject",
    "node_command_subject",
    "node_kv_events_subject",
    "stream_for_subject",
    "subject_matches",
]


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    max_age_seconds: float
    """0 keeps messages until the stream's limits (none set here) drop them."""
    description: str
    duplicate_window_seconds: float = 120.0
    mirror: str = ""
    """A read-only copy of that stream (no subjects of its own): see NODES_VIEW."""


def event_subject(event_type: str, token: str = "*") -> str:
    """``node.heartbeat`` + ``<id>`` → ``node.heartbeat.<id>``; default token is a wildcard."""
    return f"{event_type}.{token}"


NODES = StreamSpec(
    name="NODES",
    subjects=tuple(event_subject(t) for t in EVENT_TYPES
                   if t.startswith("node.") and t != "node.heartbeat"),
    max_age_seconds=30 * 86400,
    description="Node lifecycle: registration, spot warnings, status changes, drain, termination.",
)

HEARTBEATS = StreamSpec(
    name="HEARTBEATS",
    subjects=(event_subject("node.heartbeat"),),
    # Observations, not state: the latest lives in Redis; the stream only bridges short gaps.
    max_age_seconds=300,
    description="Node heartbeats (short retention).",
    duplicate_window_seconds=60,
)

USAGE = StreamSpec(
    name="USAGE",
    subjects=("usage.>",),
    max_age_seconds=14 * 86400,
    description="Usage records from the gateways, consumed by billing.",
)

CONTROL = StreamSpec(
    name="CONTROL",
    subjects=("tenant.>", "environment.>", "apikey.>", "budget.>", "model.>", "deployment.>",
              "billing.>", "notification.>"),
    max_age_seconds=30 * 86400,
    description="Control-plane events published from the log by the outbox relay.",
)

DLQ_PREFIX = "dlq"

DLQ = StreamSpec(
    name="DLQ",
    subjects=(f"{DLQ_PREFIX}.>",),
    max_age_seconds=14 * 86400,
    description="Messages a consumer could not decode or kept failing on.",
)

# Readers that replay a stream (the gateways, operators) do it from a mirror of it: creating
# their consumers needs a grant on the stream's consumer API that NATS cannot narrow to
# unnamed consumers, and that grant would also let them rewrite the durable consumers the
# monitor, billing and the notifier read from (a filter that skips everything, say).
NODES_VIEW = StreamSpec(
    name="NODES_VIEW", subjects=(), mirror=NODES.name, max_age_seconds=NODES.max_age_seconds,
    description="A mirror of NODES for readers that replay it (gateways, operators).")

CONTROL_VIEW = StreamSpec(
    name="CONTROL_VIEW", subjects=(), mirror=CONTROL.name,
    max_age_seconds=CONTROL.max_age_seconds,
    description="A mirror of CONTROL for readers that replay it (gateways, operators).")

STREAMS: tuple[StreamSpec, ...] = (NODES, HEARTBEATS, USAGE, CONTROL, DLQ, NODES_VIEW,
                                   CONTROL_VIEW)


def node_ack_subject(node_id: object) -> str:
    """Core NATS: the control plane acknowledges a node's registration here."""
    return f"node.ack.{node_id}"


def node_command_subject(node_id: object) -> str:
    """Core NATS request/reply: commands to one node's agent (drain)."""
    return f"node.command.{node_id}"


BILLING_SETTLE = "command.billing.settle_export"
"""Core NATS request/reply: the admin API's SettleExport to billing's pusher leader
(schemas.commands). Outside every stream's subjects (CONTROL holds ``billing.>``): a stream
would store the request and answer it with its own acknowledgment."""

NODE_KV_EVENTS = "node.kv_events"
"""Not an event type: vLLM's KV cache events, relayed by a node's agent."""
KV_SEQ_HEADER = "Kv-Seq"
"""vLLM's sequence number of the batch a KV events message carries (or a part of)."""


def node_kv_events_subject(node_id: object) -> str:
    """Core NATS: the node's vLLM KV cache events (schemas.kv_events), relayed by its agent
    for the gateways' kv_aware routing. Not an event of the log: no stream holds it."""
    return f"{NODE_KV_EVENTS}.{node_id}"


def dlq_subject(consumer: str, original_subject: str) -> str:
    """Where a consumer parks a message it gave up on: ``dlq.<consumer>.<original subject>``."""
    return f"{DLQ_PREFIX}.{consumer}.{original_subject}"


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS's wildcard match: `*` one token, `>` the rest."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def stream_for_subject(subject: str) -> StreamSpec | None:
    for spec in STREAMS:
        if any(subject_matches(p, subject) for p in spec.subjects):
            return spec
    return None
