"""`crosslogic nats …` against the real server: a new authority, stream setup as the
provisioner, a fresh credential, its key, and its revocation closing its connection."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials
from prometheus_client import CollectorRegistry

from schemas.subjects import STREAMS
from services.cli.nats_commands import revoke_keys
from services.infra.bus import Bus
from services.infra.natsauth.authority import NodeIssuer
from services.infra.natsauth.creds import Credentials
from services.infra.natsauth.identities import Role
from services.infra.natsauth.revocations import AccountResolver, revocations_of
from services.orchestrator.credentials import CredentialKeeper
from tests.conftest import Servers
from tests.helpers import ended_node, eventually

ROOT = Path(__file__).resolve().parents[2]


async def crosslogic(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_init_writes_an_authority_once(tmp_path: Path) -> None:
    code, out, _ = await crosslogic("nats", "init", str(tmp_path / "auth"))
    assert code == 0 and "keep it offline" in out
    for role in ("gateway", "monitor", "provisioner", "observer", "admin"):
        assert Credentials.parse((tmp_path / "auth" / "creds" / f"{role}.creds").read_text())
    assert "resolver_preload" in (tmp_path / "auth" / "server.conf").read_text()
    code, _, err = await crosslogic("nats", "init", str(tmp_path / "auth"))
    assert code != 0 and "already holds an authority" in err


async def test_setup_makes_the_streams_as_the_provisioner(servers: Servers, nats_url: str,
                                                          tmp_path: Path) -> None:
    admin = await servers.admin_bus()
    try:
        for info in await admin.js.streams_info():
            await admin.js.delete_stream(info.config.name)
        creds = tmp_path / "provisioner.creds"
        creds.write_text(servers.creds(Role.PROVISIONER))
        code, _, err = await crosslogic("nats", "--nats-url", nats_url, "setup",
                                          "--creds-file", str(creds))
        assert code == 0, err
        assert {i.config.name for i in await admin.js.streams_info()} == \
            {s.name for s in STREAMS}
        # A service's identity may not do it.
        creds.write_text(servers.creds(Role.GATEWAY))
        for info in await admin.js.streams_info():
            await admin.js.delete_stream(info.config.name)
        code, _, _ = await asyncio.wait_for(crosslogic(
            "nats", "--nats-url", nats_url, "setup", "--creds-file", str(creds)), 60)
        assert code != 0
        assert not await admin.js.streams_info()
    finally:
        await admin.ensure_streams()
        await admin.close()


async def test_a_rotated_credential_is_revoked_and_its_connection_closed(
        servers: Servers, nats_url: str) -> None:
    auth = str(servers.auth_dir)
    code, fresh, err = await crosslogic("nats", "--auth-dir", auth, "creds", "observer")
    assert code == 0, err
    code, described, _ = await crosslogic("nats", "key", "/dev/stdin", stdin=fresh.encode())
    key = described.split()[0]
    assert code == 0 and key == Credentials.parse(fresh).public_key and "role=observer" in \
        described
    old = await Bus.connect(nats_url, name="old", creds=fresh)
    try:
        code, out, err = await crosslogic("nats", "--auth-dir", auth, "--nats-url", nats_url,
                                          "revoke", key)
        assert code == 0 and "revoked" in out, err
        await asyncio.wait_for(old.closed.wait(), 10)
        with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
            await nats.connect(nats_url, user_credentials=RawCredentials(fresh),
                               allow_reconnect=False, max_reconnect_attempts=0)
        # The identity's other credentials still work.
        other = await Bus.connect(nats_url, name="other", creds=servers.creds(Role.OBSERVER))
        await other.close()
    finally:
        await old.close()


# --------------------------------------------------------------------------- racing pushes


class Gated(AccountResolver):
    """The servers' account store, with the test holding each step of a race: before a
    lookup (by its number), before the first push, and after each push."""

    def __init__(self, nc: NATS, account: str, *,
                 before_lookup: Callable[[int], Awaitable[None]] | None = None,
                 before_first_push: Callable[[], Awaitable[None]] | None = None,
                 after_push: Callable[[], None] | None = None) -> None:
        super().__init__(nc, account)
        self.before_lookup = before_lookup
        self.before_first_push = before_first_push
        self.after_push = after_push
        self.lookups = 0
        self.pushes = 0

    async def lookup(self) -> str:
        self.lookups += 1
        if self.before_lookup is not None:
            await self.before_lookup(self.lookups)
        return await super().lookup()

    async def push(self, account_jwt: str) -> None:
        if self.pushes == 0 and self.before_first_push is not None:
            await self.before_first_push()
        await super().push(account_jwt)
        self.pushes += 1
        if self.after_push is not None:
            self.after_push()


class RacingKeeper(CredentialKeeper):
    def __init__(self, *args: Any, gated: Callable[[NATS], Gated], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gated = gated

    def resolver(self, nc: NATS) -> AccountResolver:
        return self.gated(nc)


@pytest.mark.parametrize("stale", ["keeper", "operator"])
async def test_a_keeper_sync_racing_a_manual_revocation_loses_neither(
        servers: Servers, pool: asyncpg.Pool, nats_url: str, stale: str) -> None:
    """The keeper (a node ended) and an operator (`crosslogic nats revoke`) each look up the
    account, add their revocation and push it; whichever pushes from the older lookup drops
    the other's. `stale` says whose push that is. Both verify after pushing, and merge again:
    both revocations end up in the account."""
    issuer = NodeIssuer.from_json(servers.node_issuer())
    node_key = await ended_node(pool, issuer)
    leaked = servers.authority.user(Role.OBSERVER).public_key
    keeper_looked, keeper_pushed = asyncio.Event(), asyncio.Event()
    operator_looked, operator_pushed = asyncio.Event(), asyncio.Event()

    async def keeper_lookup(n: int) -> None:
        if stale == "operator" and n == 1:
            await operator_looked.wait()  # the operator's lookup is the older
        if stale == "operator" and n == 2:
            await operator_pushed.wait()  # verify once the stale push has landed
        keeper_looked.set()

    async def keeper_first_push() -> None:
        if stale == "keeper":
            await operator_pushed.wait()  # push from a lookup made before the operator's push

    async def operator_lookup(n: int) -> None:
        if stale == "keeper" and n == 1:
            await keeper_looked.wait()
        if stale == "keeper" and n == 2:
            await keeper_pushed.wait()
        operator_looked.set()

    async def operator_first_push() -> None:
        if stale == "operator":
            await keeper_pushed.wait()

    made: list[Gated] = []

    def keepers_resolver(nc: NATS) -> Gated:
        made.append(Gated(nc, issuer.account, before_lookup=keeper_lookup,
                          before_first_push=keeper_first_push, after_push=keeper_pushed.set))
        return made[-1]

    keeper = RacingKeeper(issuer, nats_url, pool, registry=CollectorRegistry(),
                          gated=keepers_resolver)
    keeper.start()

    async def connected() -> bool:
        return keeper.connected

    await eventually(connected, what="the keeper connected")
    nc = await nats.connect(nats_url, user_credentials=RawCredentials(
        issuer.system_creds.text()))
    try:
        operator = Gated(nc, issuer.account, before_lookup=operator_lookup,
                         before_first_push=operator_first_push,
                         after_push=operator_pushed.set)
        async with asyncio.timeout(30):
            synced, pushes = await asyncio.gather(
                keeper.sync(),
                revoke_keys(operator, [leaked], signing_seed=issuer.operator_signing_seed,
                            now=int(time.time()), settle=0.05))
        assert synced and pushes >= 1
        held = revocations_of(await AccountResolver(nc, issuer.account).lookup())
        assert node_key in held and leaked in held
        # Whoever pushed from the stale lookup took the other's away; the other, verifying,
        # pushed again.
        assert (pushes, made[0].pushes) == ((1, 2) if stale == "operator" else (2, 1))
    finally:
        await nc.close()
        await keeper.close()
