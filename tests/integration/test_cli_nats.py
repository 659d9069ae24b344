"""`crosslogic nats …` against the real server: a new authority, stream setup as the
provisioner, a fresh credential, its key, and its revocation closing its connection."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import RawCredentials

from schemas.subjects import STREAMS
from services.core.bus import Bus
from services.core.natsauth.creds import Credentials
from services.core.natsauth.identities import Role
from tests.conftest import Servers

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
