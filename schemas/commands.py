"""Messages between the control plane and node agents that are not events: the registration
acknowledgment and commands. They travel on core NATS (schemas.subjects: ``node.ack.<id>``,
``node.command.<id>``); the facts they lead to are events (NodeDraining, …)."""

from __future__ import annotations

import enum
import uuid

import msgspec


class RegistrationAck(msgspec.Struct, kw_only=True, frozen=True):
    """The control plane recorded the agent's NodeRegistered event `event_id`."""

    node_id: uuid.UUID
    event_id: uuid.UUID
    accepted: bool = True
    reason: str = ""


class CommandKind(enum.StrEnum):
    DRAIN = "drain"


class NodeCommand(msgspec.Struct, kw_only=True, frozen=True):
    """Sent as a NATS request to ``node.command.<node_id>``; the agent answers CommandReply."""

    command: CommandKind
    reason: str = ""
    deadline_seconds: float | None = None
    """How long in-flight requests may take before the agent leaves anyway."""
    issued_by: str = ""


class CommandReply(msgspec.Struct, kw_only=True, frozen=True):
    accepted: bool
    detail: str = ""
