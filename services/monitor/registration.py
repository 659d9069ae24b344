"""What the monitor accepts of what a node says about itself. Pure.

A registration is only an agent's word, and a node's credential can leak. So the monitor
accepts one only for a node the orchestrator launched (a ``node.launching`` in the log) that
has not ended, serving the model it was launched for; and once a node's registration was
accepted, its address is settled: a later one with another ``endpoint_url`` (or model) is
refused. The same registration again (an agent asking anew for its ack) or an agent restarted
with the same id and address is accepted, as it always was. Where the node runs (its region)
is the launch's, never the agent's.

A notice (spot warning, drain, leaving) is recorded only for a node that was launched: from a
node nobody launched it is a lie (a leaked credential growing the log), refused like a
registration. From a node that has ended it is most likely the truth arriving late (the agent
drains and deregisters after the orchestrator terminated its machine): acknowledged so it is
not sent again, but not recorded, since it could change nothing (the node is over).
"""

from __future__ import annotations

import enum
import hashlib
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.events import (
    Event,
    EventMetadata,
    NodeAccepted,
    NodeDeregistered,
    NodeDraining,
    NodeLaunching,
    NodeRegistered,
    NodeSpotWarning,
    NodeStatus,
    NodeStatusChanged,
    NodeTerminated,
)
from schemas.ids import uuid7_ms

__all__ = ["NOTED", "Accepted", "Ignored", "Noted", "Notice", "Refused", "RefusedBecause",
           "accepted_id", "check_registration", "decide_notice", "decide_registration"]

Notice = NodeSpotWarning | NodeDraining | NodeDeregistered
"""What an agent says of its node besides registering (its heartbeats are not recorded)."""


class RefusedBecause(enum.StrEnum):
    """`monitor_registrations_refused_total`'s reasons (and `monitor_notices_refused_total`'s:
    only `not_launched`)."""

    INVALID = "invalid"
    NOT_LAUNCHED = "not_launched"
    ENDED = "ended"
    MODEL_MISMATCH = "model_mismatch"
    ENDPOINT_CHANGED = "endpoint_changed"


@dataclass(frozen=True)
class Accepted:
    event: NodeAccepted
    """What the monitor appends with the registration (the same for a copy of it: the log
    keeps it once)."""


@dataclass(frozen=True)
class Refused:
    because: RefusedBecause
    reason: str
    """For the agent (its ack), the dead letter and the log line."""


@dataclass(frozen=True)
class Noted:
    """Record the notice as it came."""


NOTED = Noted()


@dataclass(frozen=True)
class Ignored:
    """Acknowledge the notice, record nothing: the node has ended."""

    reason: str


_ENDED = frozenset({NodeStatus.TERMINATED, NodeStatus.FAILED})


def check_registration(event: NodeRegistered) -> None:
    """ValueError for a registration nobody can route to: no model, no usable address."""
    if not event.model_name.strip():
        raise ValueError("registration without a model_name")
    url = urllib.parse.urlsplit(event.endpoint_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"registration with an unusable endpoint_url {event.endpoint_url!r}")
    if event.vram_total_gb < 0:
        raise ValueError("registration with a negative vram_total_gb")


def accepted_id(registration_id: uuid.UUID) -> uuid.UUID:
    """The id of the ``node.accepted`` of a registration: always the same for the same
    registration (a redelivered copy derives the same event, which the log keeps once), a
    UUIDv7 of the registration's time so it sorts with it."""
    digest = int.from_bytes(hashlib.sha256(b"node.accepted:" + registration_id.bytes)
                            .digest()[:10], "big")
    value = (uuid7_ms(registration_id) & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76
    value |= ((digest >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= digest & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def _ended(event: Event) -> bool:
    match event:
        case NodeTerminated() | NodeDeregistered():
            return True
        case NodeStatusChanged():
            return event.to_status in _ENDED
    return False


def decide_registration(history: Sequence[Event],
                        registration: NodeRegistered) -> Accepted | Refused:
    """Accept `registration` or not, given every event of its node so far (the log's, in
    order, and those accepted before it in the same batch)."""
    try:
        check_registration(registration)
    except ValueError as exc:
        return Refused(RefusedBecause.INVALID, str(exc))
    launch = next((e for e in history if isinstance(e, NodeLaunching)), None)
    if launch is None:
        return Refused(RefusedBecause.NOT_LAUNCHED,
                       f"node {registration.node_id} was not launched by the control plane")
    if any(_ended(e) for e in history):
        return Refused(RefusedBecause.ENDED, f"node {registration.node_id} has ended")
    if registration.model_name != launch.model_name:
        return Refused(RefusedBecause.MODEL_MISMATCH,
                       f"node {registration.node_id} was launched for model "
                       f"{launch.model_name!r}, not {registration.model_name!r}")
    # Every registration in the log was accepted (those from before `node.accepted` existed
    # too): the first one settled where the node is.
    first = next((e for e in history if isinstance(e, NodeRegistered | NodeAccepted)), None)
    if first is not None and first.endpoint_url != registration.endpoint_url:
        return Refused(RefusedBecause.ENDPOINT_CHANGED,
                       f"node {registration.node_id} is registered at another endpoint_url")
    return Accepted(NodeAccepted(
        id=accepted_id(registration.id), node_id=registration.node_id,
        registration_id=registration.id, endpoint_url=registration.endpoint_url,
        model_name=registration.model_name, region=launch.region,
        metadata=EventMetadata(causation_id=str(registration.id), actor="monitor")))


def decide_notice(history: Sequence[Event], notice: Notice) -> Noted | Ignored | Refused:
    """Record `notice` or not, given every event of its node so far (as for a registration)."""
    if not any(isinstance(e, NodeLaunching) for e in history):
        return Refused(RefusedBecause.NOT_LAUNCHED,
                       f"node {notice.node_id} was not launched by the control plane")
    if any(_ended(e) for e in history):
        return Ignored(f"node {notice.node_id} has ended")
    return NOTED
