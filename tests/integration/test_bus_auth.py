"""A refused credential fails fast, an unreachable NATS is waited for: `Bus.connect` against
the real (authenticated) server.

nats-py retries even a first connection for ever when asked to reconnect for ever; without
telling refusals apart, a service or agent with an empty, expired or revoked credential
would loop with nothing but a "nats error" a minute in its log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import nats
import pytest
from aiohttp import web
from nats.aio.client import RawCredentials

from services.cli.nats_commands import revoke_keys
from services.infra.bus import Bus
from services.infra.devstack import free_port
from services.infra.http import Needs, create_app
from services.infra.nats_connection import NatsAuthError
from services.infra.natsauth.authority import NodeIssuer
from services.infra.natsauth.creds import Credentials
from services.infra.natsauth.identities import Role
from services.infra.natsauth.revocations import AccountResolver
from services.infra.settings import CoreSettings, Secret
from tests.conftest import Servers

FAST = 15.0
"""A refusal is given up on after three attempts half a second apart: seconds, not minutes
(the margin is for a busy machine)."""


async def revoke(servers: Servers, *keys: str) -> None:
    """What `crosslogic nats revoke` does."""
    issuer = NodeIssuer.from_json(servers.node_issuer())
    nc = await nats.connect(servers.nats_url,
                            user_credentials=RawCredentials(issuer.system_creds.text()))
    try:
        await revoke_keys(AccountResolver(nc, issuer.account), keys,
                          signing_seed=issuer.operator_signing_seed, now=int(time.time()),
                          settle=0)
    finally:
        await nc.close()


async def expired(servers: Servers) -> str:
    return servers.authority.user(Role.GATEWAY, expires_at=int(time.time()) - 60).text()


async def revoked(servers: Servers) -> str:
    creds = servers.authority.user(Role.GATEWAY).text()
    await revoke(servers, Credentials.parse(creds).public_key)
    return creds


async def empty(servers: Servers) -> str:
    return ""


@pytest.mark.parametrize("credential", [expired, revoked, empty])
async def test_a_refused_credential_fails_fast_naming_the_identity_only(
        servers: Servers, nats_url: str,
        credential: Callable[[Servers], Awaitable[str]]) -> None:
    creds = await credential(servers)
    began = time.monotonic()
    with pytest.raises(NatsAuthError) as refused:
        async with asyncio.timeout(FAST):
            await Bus.connect(nats_url, name="gateway-under-test", creds=creds)
    print(f"refused after {time.monotonic() - began:.2f} s")
    message = str(refused.value)
    assert "gateway-under-test" in message and "NATS_CREDS" in message
    assert nats_url not in message and "127.0.0.1" not in message
    if creds:
        parsed = Credentials.parse(creds)
        assert "'gateway'" in message and parsed.public_key in message
        assert parsed.seed not in message and parsed.jwt not in message
    else:
        assert "anonymous" in message


async def test_a_service_with_an_expired_credential_does_not_start(
        servers: Servers, nats_url: str) -> None:
    settings = CoreSettings(service_name="svc-under-test", nats_url=Secret(nats_url),
                            nats_creds=Secret(await expired(servers)), log_json=False)
    app = create_app(settings, needs=Needs(postgres=False, redis=False))
    runner = web.AppRunner(app)
    try:
        with pytest.raises(NatsAuthError, match="svc-under-test"):
            async with asyncio.timeout(FAST):
                await runner.setup()
    finally:
        await runner.cleanup()


async def test_an_unreachable_nats_is_waited_for_not_refused(servers: Servers) -> None:
    """Connection refused is NATS away (a restart, a node booting before the network): the
    first connection keeps trying, however many attempts that takes."""
    url = f"nats://127.0.0.1:{free_port()}"
    connecting = asyncio.create_task(Bus.connect(url, name="patient",
                                                 creds=servers.creds(Role.OBSERVER)))
    done, _ = await asyncio.wait({connecting}, timeout=3)  # six attempts, at least
    assert not done
    connecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connecting
