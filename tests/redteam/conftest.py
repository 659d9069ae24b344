"""The red team's tools: connect to the real NATS with a real credential, as someone who holds
one would, and try what the credential should not allow.

A refused publish or subscription is dropped by nats-server, which tells the client
("permissions violation for publish to …") and logs the user's key and the subject; an
`Intruder` collects what it was told, so a test can say both "it was refused" and "nothing
arrived"."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials
from nats.aio.msg import Msg

from services.infra.natsauth.creds import Credentials
from tests.conftest import Servers
from tests.helpers import eventually

# The platforms the attacks are tried on: the same fixtures as the integration tests'.
from tests.integration.gateway_fixtures import platform  # noqa: F401
from tests.integration.test_billing_usage import billing, owner  # noqa: F401
from tests.integration.test_gateway_api import ready  # noqa: F401


@dataclass
class Intruder:
    nc: NATS
    key: str
    """The credential's public key: how nats-server's log names it."""
    server_log: Path | None
    """The embedded nats-server's log (None when NATS is external)."""
    log_from: int = 0
    """Where the log stood when this intruder connected: only what came after is read."""
    told: list[str] = field(default_factory=list)

    async def refused(self, what: str, subject: str) -> None:
        """Wait until the server said no to `what` ("publish" or "subscription") on `subject`:
        to the client, and in its log, naming the credential's key — where an operator sees
        it (NATS has no advisory for permission violations)."""
        wanted = f'permissions violation for {what} to "{subject}"'.lower()

        async def said() -> bool:
            return any(wanted in t.lower() for t in self.told)

        await eventually(said, timeout=10, what=f"the server refusing {what} to {subject}")
        if self.server_log is None:
            return
        logged = f'jwt:{self.key}" - {what.capitalize()} Violation - Subject "{subject}"'

        log = self.server_log

        async def in_the_log() -> bool:
            with log.open("rb") as f:
                f.seek(self.log_from)
                return logged.encode() in f.read()

        await eventually(in_the_log, timeout=10, interval=0.05,
                         what=f"nats-server logging {logged}")

    async def publish_refused(self, subject: str, data: bytes = b"{}",
                              headers: dict[str, str] | None = None) -> None:
        await self.nc.publish(subject, data, headers=headers)
        await self.nc.flush()
        await self.refused("publish", subject)

    async def subscribe_refused(self, subject: str) -> None:
        got: list[bytes] = []

        async def keep(msg: object) -> None:
            got.append(b"x")

        await self.nc.subscribe(subject, cb=keep)
        await self.nc.flush()
        await self.refused("subscription", subject)
        assert not got

    async def request_refused(self, subject: str, data: bytes = b"") -> None:
        """A JetStream API call: refused before it reaches JetStream, so nothing answers."""
        answers: list[bytes] = []
        inbox = self.nc.new_inbox()

        async def keep(msg: Msg) -> None:
            answers.append(msg.data)

        sub = await self.nc.subscribe(inbox, cb=keep)
        await self.nc.publish(subject, data, reply=inbox)
        await self.nc.flush()
        await self.refused("publish", subject)
        await self.nc.flush()
        await sub.unsubscribe()
        assert not answers, answers


Connect = Callable[[str], Awaitable[Intruder]]


@pytest.fixture
async def intruder(servers: Servers, nats_url: str) -> AsyncIterator[Connect]:
    """`await intruder(creds_text)`: a connection as whoever holds that credential."""
    made: list[NATS] = []

    server_log = servers.nats.root / "nats.log" if servers.nats is not None else None

    async def connect(creds: str) -> Intruder:
        parsed = Credentials.parse(creds)
        who = Intruder(None, parsed.public_key, server_log,  # type: ignore[arg-type]
                       server_log.stat().st_size if server_log is not None else 0)

        async def on_error(exc: Exception) -> None:
            who.told.append(str(exc))

        who.nc = await nats.connect(nats_url, user_credentials=RawCredentials(parsed.text()),
                                    inbox_prefix=parsed.inbox_prefix, error_cb=on_error,
                                    allow_reconnect=False, max_reconnect_attempts=0)
        made.append(who.nc)
        return who

    yield connect
    for nc in made:
        if not nc.is_closed:
            await nc.close()
