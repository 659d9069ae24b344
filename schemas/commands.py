"""Messages that are not events: between the control plane and node agents (the registration
acknowledgment and commands), and commands from the admin API to billing. They travel on core
NATS (schemas.subjects: ``node.ack.<id>``, ``node.command.<id>``, ``BILLING_SETTLE``); the
facts they lead to are events (NodeDraining, UsageExported, …)."""

from __future__ import annotations

import enum
import uuid
from typing import Annotated, Literal

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


# ---------------------------------------------------------------- commands to billing

class SettleAction(enum.StrEnum):
    RESEND = "resend"
    """Stripe does not have the identifier: send the meter event now."""
    MARK_EXPORTED = "mark_exported"
    """Stripe has it (an earlier attempt arrived): record it as exported without sending."""


class SettleExport(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """An operator's settling of a held meter export, sent by the admin API as a NATS request
    to ``schemas.subjects.BILLING_SETTLE``; billing's pusher leader (the one process that
    sends meter events to Stripe) carries it out and answers SettleOutcome."""

    tenant_id: uuid.UUID
    identifier: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    action: SettleAction
    correlation_id: Annotated[str, msgspec.Meta(max_length=100)] = ""
    """The admin request's id: the correlation of the events the settling records."""


class SettleResult(enum.StrEnum):
    SETTLED = "settled"
    NOT_FOUND = "not_found"
    """No such export of this tenant."""
    NOT_HELD = "not_held"
    """The export is not held (settled already, or never held): nothing was done."""
    NOT_SENDABLE = "not_sendable"
    """Held, but without a Stripe customer or meter event name to resend it with."""
    STRIPE_UNAVAILABLE = "stripe_unavailable"
    """The resend failed in a way worth retrying: the export stays held."""
    STRIPE_REFUSED = "stripe_refused"
    """Stripe refused the resend for good: the export is now failed."""
    BAD_COMMAND = "bad_command"
    """The command could not be read."""
    FAILED = "failed"
    """Billing could not finish (its database, a bug): look at the export before retrying."""


class SettleOutcome(msgspec.Struct, kw_only=True, frozen=True):
    result: SettleResult
    detail: str = ""
    status: str = ""
    """The export's status afterwards (`exported`, `held`, `failed`; "" when not found)."""
    stripe: Literal["sent", "duplicate"] | None = None
    """What Stripe answered a resend; None when it was not asked (or did not answer)."""
    may_have_reached: bool = False
    """A failed resend may have reached Stripe all the same: look again before resending."""
