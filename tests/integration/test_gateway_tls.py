"""The gateway terminating TLS itself (`--tls-cert/--tls-key`): the OpenAI SDK over HTTPS, a
client that does not trust the certificate refused, a bad certificate a clear error at start."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import sys
from pathlib import Path

import aiohttp
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from openai import APIConnectionError, AsyncOpenAI

from services.infra.devstack import die_with_parent, free_port
from services.infra.natsauth.identities import Role
from tests.helpers import eventually
from tests.integration.gateway_fixtures import MODEL, Platform, platform  # noqa: F401


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "gateway.crt", tmp / "gateway.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def start(p: Platform, port: int, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "DATABASE_URL": p.servers.database_url,
           "REDIS_URL": p.servers.redis_url, "NATS_URL": p.servers.nats_url,
           "NATS_CREDS": p.servers.creds(Role.GATEWAY),
           "NODE_API_KEY_SECRET": p.node_key_secret,
           "HTTP_HOST": "127.0.0.1", "LOG_LEVEL": "warning",
           "USAGE_SPOOL_DIR": str(p.tmp / "spool-tls")}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.gateway", "--port", str(port), *args, env=env,
        stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent)


async def test_the_sdk_over_https(platform: Platform) -> None:  # noqa: F811
    p = platform
    cert, key = self_signed(p.tmp)
    await p.add_node()
    port = free_port()
    proc = await start(p, port, "--tls-cert", str(cert), "--tls-key", str(key))
    trusted = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            async def ready() -> bool:
                try:
                    async with s.get(f"{url}/ready", ssl=trusted) as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(ready, timeout=30, what="the HTTPS gateway ready")
            # Plain HTTP on the HTTPS port is not served.
            try:
                async with s.get(f"http://127.0.0.1:{port}/health") as r:
                    plain_ok = r.status == 200
            except aiohttp.ClientError:
                plain_ok = False
            assert not plain_ok

        async with httpx.AsyncClient(verify=trusted) as http, \
                AsyncOpenAI(base_url=f"{url}/v1", api_key=p.key.plaintext, max_retries=0,
                            http_client=http) as client:
            async def answered() -> str:
                try:
                    reply = await client.chat.completions.create(
                        model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
                except Exception:  # the node not routable yet
                    return ""
                return reply.id

            assert (await eventually(answered, timeout=20, what="a completion over HTTPS")
                    ).startswith("chatcmpl-")
        # A client that does not trust the certificate gets no answer at all.
        async with AsyncOpenAI(base_url=f"{url}/v1", api_key=p.key.plaintext,
                               max_retries=0) as untrusting:
            try:
                await untrusting.models.list()
                refused = False
            except APIConnectionError:
                refused = True
            assert refused
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)


async def test_a_bad_certificate_is_a_clear_error_at_start(platform: Platform,  # noqa: F811
                                                           tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, wrong_key = self_signed(other)
    for args, expected in (((("--tls-cert", str(cert), "--tls-key", str(wrong_key)),
                             "do not load")),
                           (("--tls-cert", str(cert), "--tls-key", str(tmp_path / "nope.key")),
                            "not found"),
                           (("--tls-cert", str(cert)), "both a certificate and a key")):
        proc = await start(platform, free_port(), *args)
        assert proc.stderr is not None
        err = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
        assert await asyncio.wait_for(proc.wait(), 30) == 2
        assert expected in err, err
