"""A real SMTP server for the tests (aiosmtpd), on the test's own event loop: it takes mail for
any address but those it is told to refuse (550, as for a mailbox that does not exist), and
keeps what it got as parsed messages."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import time
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from services.infra.devstack import free_port


class MailHandler:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.refused: set[str] = set()
        self._changed = asyncio.Event()

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address in self.refused:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session,
                          envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return "250 Message accepted for delivery"

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(self.messages)} of {n} mails within {timeout}s")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)
        return self.messages


class SmtpServer:
    def __init__(self) -> None:
        self.handler = MailHandler()
        self.port = free_port()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def protocol() -> Any:
            return SMTP(self.handler, hostname="smtp.test", loop=loop)

        self._server = await loop.create_server(protocol, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
