"""Registering the node with the control plane: the NodeRegistered event, publishing it so
that the monitor records (and acks) it, and waiting for the acknowledgment on
``node.ack.<id>``."""

from __future__ import annotations

import time

import msgspec
import structlog
from nats.aio.subscription import Subscription

from agent.settings import AGENT_VERSION, AgentSettings
from schemas.commands import RegistrationAck
from schemas.events import NodeRegistered, encode_event
from services.infra.bus import Bus

log = structlog.get_logger("agent")


def registration_event(settings: AgentSettings) -> NodeRegistered:
    s = settings
    return NodeRegistered(
        node_id=s.node_id, cluster_name=s.cluster_name, provider=s.provider,
        region=s.region, instance_type=s.instance_type, gpu_type=s.gpu_type,
        vram_total_gb=s.vram_total_gb, model_name=s.model_name,
        endpoint_url=s.advertised_url, spot_instance=s.spot_instance,
        agent_version=AGENT_VERSION)


async def ask_to_record(bus: Bus, event: NodeRegistered, attempt: int) -> None:
    """Publish the registration so that the control plane sees it (again) and acks it.

    The same event every time, under its own id as Nats-Msg-Id, so a retry of a publish
    that never reached the stream is stored once. But when the stream says it already
    holds that message, its duplicate window (minutes) hides the retry from the monitor:
    either the monitor has not got to it yet, or it recorded it and its ack was lost, and
    then nobody would ack again until the window ends. So a copy goes under a message id
    of its own: the monitor records the event once (the log is keyed on the event id, not
    the message) and acks it again."""
    stored = await bus.publish(event)
    if stored.duplicate:
        await bus.publish_raw(event.subject, encode_event(event), f"{event.id}.{attempt}")


async def wait_for_ack(acks: Subscription, event: NodeRegistered,
                       timeout: float) -> RegistrationAck:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no acknowledgment")
        msg = await acks.next_msg(timeout=remaining)
        try:
            ack = msgspec.json.decode(msg.data, type=RegistrationAck)
        except msgspec.DecodeError:
            log.warning("ignoring a malformed acknowledgment")
            continue
        if ack.event_id == event.id:  # an ack of an older registration is not ours
            return ack
