"""Who may say what on NATS: every identity of the platform and its subjects. Pure data.

Each service, operator tool and GPU node connects as its own user; the server refuses any
publish or subscription outside the lists below (a *permissions violation*: the message is
dropped and the client told). Receivers check what they get all the same (docs/security.md):
a leaked credential can say only what its identity may, and cannot lie about who it is.

Replies: every identity has its own inbox prefix (``_INBOX.<role>``, a node
``_INBOX_NODE.<node id>``), so nobody can read another's replies (JetStream's acks and the
messages a pull consumer fetches travel there).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from schemas.events import EVENT_TYPES
from schemas.subjects import (
    BILLING_SETTLE,
    CONTROL,
    CONTROL_VIEW,
    DLQ,
    DLQ_PREFIX,
    HEARTBEATS,
    NODE_KV_EVENTS,
    NODES,
    NODES_VIEW,
    STREAMS,
    USAGE,
)
from services.infra.natsauth.jwt import Permissions

__all__ = [
    "NODE_PUBLISHES",
    "NODE_SCOPE",
    "Role",
    "inbox_prefix",
    "permissions",
]

NODE_PUBLISHES = ("node.registered", "node.heartbeat", "node.spot_warning", "node.draining",
                  "node.deregistered")
"""The event types a node's agent says about itself; nobody else says them."""

NODE_PAYLOAD_LIMIT = 64 * 1024
"""A node's largest message (a registration is under 1 KiB)."""

SETTLE_REPLY_SECONDS = 120.0
"""How long billing may take to answer a settle command: a resend waits on Stripe, and
commands are carried out one at a time."""


class Role(enum.StrEnum):
    GATEWAY = "gateway"
    MONITOR = "monitor"
    ORCHESTRATOR = "orchestrator"
    BILLING = "billing"
    NOTIFIER = "notifier"
    ADMIN_API = "admin-api"
    RELAY = "relay"
    PROVISIONER = "provisioner"
    """Creates and updates the JetStream streams (`crosslogic nats setup`): nothing else."""
    OBSERVER = "observer"
    """Operators' read-only view (`nats sub`, `nats stream info`): subscribes, never says."""
    LEAF = "leaf"
    """The link of a leaf server that GPU nodes connect to (a fleet too large for one
    server's connections): carries what nodes may say in, and what is said to nodes out."""
    ADMIN = "admin"
    """Everything: break-glass for operators, and the test harness. Never given to a service."""
    NODE = "node"
    """A GPU node's agent: issued per node, by the scoped node signing key."""


SERVICES = (Role.GATEWAY, Role.MONITOR, Role.ORCHESTRATOR, Role.BILLING, Role.NOTIFIER,
            Role.ADMIN_API, Role.RELAY)


def inbox_prefix(role: Role, name: str = "") -> str:
    """Where `role`'s replies arrive; a node's carries its id (`name`)."""
    return f"_INBOX_NODE.{name}" if role is Role.NODE else f"_INBOX.{role.value}"


def _own_inbox(role: Role) -> str:
    return f"{inbox_prefix(role)}.>"


_JS = "$JS.API"


def _streams_info() -> tuple[str, ...]:
    """Account and stream info: a service waits until its streams exist."""
    return (f"{_JS}.INFO", f"{_JS}.STREAM.INFO.*")


READABLE = (NODES_VIEW.name, CONTROL_VIEW.name, HEARTBEATS.name, DLQ.name)
"""The streams readers may make consumers on: mirrors, and streams no service has a durable
consumer on. A consumer grant on a stream reaches every consumer of it, whatever its name."""


def _read(stream: str) -> tuple[str, ...]:
    """Ordered consumers on `stream` (replay, then follow): created (and recreated after a
    NATS restart), and their flow control answered."""
    if stream not in READABLE:
        raise ValueError(f"{stream} has durable consumers: readers replay a mirror of it")
    return (f"{_JS}.CONSUMER.CREATE.{stream}", f"{_JS}.CONSUMER.INFO.{stream}.>",
            f"$JS.FC.{stream}.>")


def _consume(stream: str, durable: str) -> tuple[str, ...]:
    """One durable pull consumer: created or updated, fetched from, acknowledged, asked for
    its backlog; and what it gives up on parked on its dead-letter subject."""
    return (f"{_JS}.CONSUMER.CREATE.{stream}.{durable}",
            f"{_JS}.CONSUMER.CREATE.{stream}.{durable}.>",
            f"{_JS}.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
            f"{_JS}.CONSUMER.INFO.{stream}.{durable}",
            f"{_JS}.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>",
            f"{DLQ_PREFIX}.{durable}.>")


def control_plane_subjects() -> tuple[str, ...]:
    """What only the outbox relay publishes: every event the control plane appends to the
    log. Node events except what nodes say themselves; never usage (the gateways')."""
    node_types = sorted(t for t in EVENT_TYPES if t.startswith("node.")
                        and t not in NODE_PUBLISHES)
    return (*CONTROL.subjects, *(f"{t}.*" for t in node_types))


MONITOR_HEARTBEATS_DLQ = "monitor-heartbeats"
"""The dead-letter name of heartbeats the monitor refuses (core NATS has no consumer)."""


def _perms(pub: Iterable[str], sub: Iterable[str], **kw: Any) -> Permissions:
    return Permissions(pub_allow=tuple(dict.fromkeys(pub)), sub_allow=tuple(dict.fromkeys(sub)),
                       **kw)


def permissions(role: Role) -> Permissions:
    """The permissions of a service or tool identity (nodes: `NODE_SCOPE`)."""
    inbox = _own_inbox(role)
    match role:
        case Role.GATEWAY:
            return _perms(
                pub=("usage.recorded.*", *_streams_info(), *_read(NODES_VIEW.name),
                     *_read(HEARTBEATS.name), *_read(CONTROL_VIEW.name)),
                # The nodes' KV cache events: what kv_aware routing knows of their caches.
                sub=(inbox, *HEARTBEATS.subjects, f"{NODE_KV_EVENTS}.*"))
        case Role.MONITOR:
            return _perms(
                pub=("node.ack.*", *_streams_info(), *_consume(NODES.name, "monitor-nodes"),
                     f"{DLQ_PREFIX}.{MONITOR_HEARTBEATS_DLQ}.>"),
                sub=(inbox, *HEARTBEATS.subjects))
        case Role.ORCHESTRATOR:
            # Woken by fleet and deployment events; asks agents to drain.
            return _perms(pub=("node.command.*", *_streams_info()),
                          sub=(inbox, "node.*.*", "deployment.*.*"))
        case Role.BILLING:
            # Its pusher leader carries out the admin API's settling of held exports.
            return _perms(pub=(*_streams_info(), *_consume(USAGE.name, "billing-usage")),
                          sub=(inbox, BILLING_SETTLE), responses=1,
                          response_ttl_seconds=SETTLE_REPLY_SECONDS)
        case Role.NOTIFIER:
            return _perms(pub=(*_streams_info(), *_consume(NODES.name, "notifier-nodes"),
                               *_consume(CONTROL.name, "notifier-control")),
                          sub=(inbox,))
        case Role.ADMIN_API:
            return _perms(pub=("node.command.*", BILLING_SETTLE, *_streams_info()),
                          sub=(inbox,))
        case Role.RELAY:
            return _perms(pub=(*control_plane_subjects(), *_streams_info()), sub=(inbox,))
        case Role.PROVISIONER:
            return _perms(pub=(f"{_JS}.INFO", f"{_JS}.STREAM.CREATE.*",
                               f"{_JS}.STREAM.UPDATE.*", f"{_JS}.STREAM.INFO.*",
                               f"{_JS}.STREAM.NAMES", f"{_JS}.STREAM.LIST"),
                          sub=(inbox,))
        case Role.OBSERVER:
            return _perms(pub=(f"{_JS}.INFO", f"{_JS}.STREAM.INFO.*", f"{_JS}.STREAM.NAMES",
                               f"{_JS}.STREAM.LIST", f"{_JS}.CONSUMER.LIST.*",
                               f"{_JS}.CONSUMER.NAMES.*", f"{_JS}.CONSUMER.INFO.*.*",
                               *(p for s in READABLE for p in _read(s))),
                          sub=(inbox, *(p for s in STREAMS for p in s.subjects)))
        case Role.LEAF:
            # On a leaf link, "publish" is what the leaf may send in and "subscribe" what
            # may be sent out to it: the nodes' own words in, acks, commands and replies out.
            return _perms(pub=(*(f"{t}.*" for t in NODE_PUBLISHES), f"{NODE_KV_EVENTS}.*"),
                          sub=("node.ack.*", "node.command.*", "_INBOX_NODE.>"))
        case Role.ADMIN:
            return _perms(pub=(">",), sub=(">",))
        case Role.NODE:
            raise ValueError("nodes get the node scope's permissions (NODE_SCOPE)")


NODE_NAME = "{{name()}}"
"""In the node scope's subjects: the node's id (each node user is named by its id)."""

NODE_SCOPE = _perms(
    pub=(*(f"{t}.{NODE_NAME}" for t in NODE_PUBLISHES), f"{NODE_KV_EVENTS}.{NODE_NAME}"),
    sub=(f"node.ack.{NODE_NAME}", f"node.command.{NODE_NAME}",
         f"{inbox_prefix(Role.NODE, NODE_NAME)}.>"),
    # Its answer to a command (drain), within a minute of being asked.
    responses=1, response_ttl_seconds=60.0,
    subs=32, payload=NODE_PAYLOAD_LIMIT,
    # A client, never a leaf server of its own (which would carry others' traffic).
    connection_types=("STANDARD",))
"""What every node may do, and nothing more: speak of itself, hear what is said to it."""
