"""Answering the control plane's commands on ``node.command.<id>`` (a drain, with an
optional deadline): check the command, start or tighten the drain, reply."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec
import nats.errors
import structlog
from nats.aio.msg import Msg

from schemas.commands import CommandReply, NodeCommand

log = structlog.get_logger("agent")

MAX_DRAIN_SECONDS = 86400.0
"""The longest drain a command may ask for (and a bound that keeps datetime arithmetic sane)."""

RequestDrain = Callable[[str, datetime | None], bool]
"""NodeAgent.request_drain: (reason, deadline) -> whether this request started the drain."""


async def answer_command(msg: Msg, request_drain: RequestDrain) -> None:
    try:
        command = msgspec.json.decode(msg.data, type=NodeCommand)
        timeout = command.deadline_seconds
        if timeout is not None and not 0 <= timeout <= MAX_DRAIN_SECONDS:
            raise ValueError(f"deadline_seconds must be 0..{MAX_DRAIN_SECONDS:.0f}")
    except (msgspec.DecodeError, ValueError) as exc:
        reply = CommandReply(accepted=False, detail=f"bad command: {exc}")
    else:
        deadline = (datetime.now(UTC) + timedelta(seconds=timeout)
                    if timeout is not None else None)
        started = request_drain(f"command: {command.reason or command.command}", deadline)
        reply = CommandReply(accepted=True, detail="draining" if started else "already draining")
        log.info("command received", command=command.command, by=command.issued_by)
    if msg.reply:
        try:
            await msg.respond(msgspec.json.encode(reply))
        except (nats.errors.Error, OSError) as exc:  # the caller times out and asks again
            log.warning("command reply not sent", error=str(exc) or type(exc).__name__)
