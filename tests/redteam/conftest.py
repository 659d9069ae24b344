"""The red team's tools: connect to the real NATS with a real credential, as someone who holds
one would, and try what the credential should not allow.

A refused publish or subscription is dropped by nats-server, which tells the client
("permissions violation for publish to …") and logs the user's key and the subject; an
`Intruder` collects what it was told, so a test can say both "it was refused" and "nothing
arrived"."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials
from nats.aio.msg import Msg

from services.core.natsauth.creds import Credentials
from tests.conftest import Servers
from tests.helpers import eventually


@dataclass
class Intruder:
    nc: NATS
    told: list[str] = field(default_factory=list)

    async def refused(self, what: str, subject: str) -> None:
        """Wait until the server said no to `what` ("publish" or "subscription") on `subject`."""
        wanted = f'permissions violation for {what} to "{subject}"'.lower()

        async def said() -> bool:
            return any(wanted in t.lower() for t in self.told)

        await eventually(said, timeout=10, what=f"the server refusing {what} to {subject}")

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

    async def connect(creds: str) -> Intruder:
        who = Intruder(None)  # type: ignore[arg-type]

        async def on_error(exc: Exception) -> None:
            who.told.append(str(exc))

        parsed = Credentials.parse(creds)
        who.nc = await nats.connect(nats_url, user_credentials=RawCredentials(parsed.text()),
                                    inbox_prefix=parsed.inbox_prefix, error_cb=on_error,
                                    allow_reconnect=False, max_reconnect_attempts=0)
        made.append(who.nc)
        return who

    yield connect
    for nc in made:
        if not nc.is_closed:
            await nc.close()
