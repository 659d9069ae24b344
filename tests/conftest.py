"""Real servers for the tests: embedded (default), external, or containers.

- Default: PostgreSQL, Redis and NATS started from the project's wheels, once per session.
- `CROSSLOGIC_TEST_DATABASE_URL` / `_REDIS_URL` / `_NATS_URL`: use that server instead.
- `CROSSLOGIC_TEST_BACKEND=containers` with a Docker daemon answering: testcontainers.

NATS runs with authentication on, as in production (docs/security.md): every service under
test connects as its own identity (`Servers.creds(Role.GATEWAY)`), each node as itself
(`Servers.node_creds(node_id)`); the harness itself is the all-powerful `admin` identity. With
an external NATS, `CROSSLOGIC_TEST_NATS_AUTH_DIR` names the folder of its authority
(`crosslogic nats init`).

Every test starts from a clean state without restarting anything: tables truncated, Redis
flushed, JetStream streams deleted and made anew (services do not create them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials

from services.infra.bus import Bus
from services.infra.devstack import DevStack, NatsServer
from services.infra.migrate import migrate
from services.infra.natsauth.authority import Authority
from services.infra.natsauth.creds import Credentials
from services.infra.natsauth.identities import Role


@dataclass
class Servers:
    database_url: str
    redis_url: str
    nats_url: str
    auth_dir: Path
    """The NATS authority's folder: its seeds, and a credential per identity."""
    nats: NatsServer | None = None
    """The embedded NATS server, for tests that restart it; None when it is external."""
    state_dir: Path | None = None

    @property
    def authority(self) -> Authority:
        return Authority.load(self.auth_dir)

    def creds(self, role: Role = Role.ADMIN) -> str:
        """The `.creds` text of a service or tool identity (default: the harness's admin)."""
        return (self.auth_dir / "creds" / f"{role.value}.creds").read_text()

    def node_creds(self, node_id: object, *, ttl_seconds: float = 3600.0) -> str:
        """A credential for one node, as the orchestrator mints it at launch."""
        import uuid

        return self.authority.node_credentials(uuid.UUID(str(node_id)),
                                               ttl_seconds=ttl_seconds).text()

    def node_issuer(self) -> str:
        """What the orchestrator holds to mint and revoke node credentials (NATS_NODE_ISSUER)."""
        return (self.auth_dir / "issuer.json").read_text()

    async def admin_bus(self, name: str = "test") -> Bus:
        return await Bus.connect(self.nats_url, name=name, creds=self.creds())

    async def nats_client(self, role: Role = Role.ADMIN, **options: Any) -> NATS:
        """A plain nats-py client as `role` (default: the harness's admin), with its inbox."""
        creds = Credentials.parse(self.creds(role))
        return await nats.connect(self.nats_url, user_credentials=RawCredentials(creds.text()),
                                  inbox_prefix=creds.inbox_prefix, **options)


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env().ping()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def _containers(state: Path) -> Iterator[Servers]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs
    from testcontainers.postgres import PostgresContainer
    from testcontainers.redis import RedisContainer

    auth = state / "nats-auth"
    authority = Authority.load_or_create(auth)
    (state / "nats.conf").write_text("jetstream: { store_dir: /data }\n"
                                     + authority.server_config(Path("/data/accounts")))
    with PostgresContainer("postgres:16", driver=None) as pg, \
            RedisContainer("redis:7") as rd, \
            DockerContainer("nats:2.15-alpine").with_volume_mapping(str(state), "/etc/crosslogic") \
            .with_command("-c /etc/crosslogic/nats.conf").with_exposed_ports(4222) as nc:
        wait_for_logs(nc, "Server is ready")
        yield Servers(
            database_url=pg.get_connection_url(),
            redis_url=f"redis://{rd.get_container_host_ip()}:{rd.get_exposed_port(6379)}/0",
            nats_url=f"nats://{nc.get_container_host_ip()}:{nc.get_exposed_port(4222)}",
            auth_dir=auth,
        )


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    env = os.environ
    if env.get("CROSSLOGIC_TEST_BACKEND") == "containers":
        if not _docker_answers():
            pytest.exit("CROSSLOGIC_TEST_BACKEND=containers but no Docker daemon answers", 2)
        with _containers(tmp_path_factory.mktemp("containers")) as found:
            asyncio.run(migrate(found.database_url))
            yield found
        return
    external = {k: env.get(f"CROSSLOGIC_TEST_{k.upper()}") for k in ("database_url",
                                                                       "redis_url", "nats_url")}
    if external["nats_url"] and not env.get("CROSSLOGIC_TEST_NATS_AUTH_DIR"):
        pytest.exit("CROSSLOGIC_TEST_NATS_URL needs CROSSLOGIC_TEST_NATS_AUTH_DIR: the folder of "
                    "that server's authority (`crosslogic nats init`)", 2)
    state = tmp_path_factory.mktemp("servers")
    stack = DevStack(state, postgres=not external["database_url"],
                     redis=not external["redis_url"], nats=not external["nats_url"])
    stack.start()
    try:
        urls = stack.urls
        found = Servers(
            database_url=external["database_url"] or urls.database_url,
            redis_url=external["redis_url"] or urls.redis_url,
            nats_url=external["nats_url"] or urls.nats_url,
            auth_dir=(Path(env["CROSSLOGIC_TEST_NATS_AUTH_DIR"]) if external["nats_url"]
                      else stack.nats.auth_dir if stack.nats else Path()),
            nats=stack.nats,
            state_dir=state,
        )
        asyncio.run(migrate(found.database_url))
        yield found
    finally:
        stack.stop()
        shutil.rmtree(state, ignore_errors=True)


async def _truncate_all(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'schema_migrations'")]
        if tables:
            await conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def database_url(servers: Servers) -> str:
    await _truncate_all(servers.database_url)
    return servers.database_url


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    from services.infra.db import create_pool

    p = await create_pool(database_url, min_size=1, max_size=10)
    yield p
    await p.close()


@pytest.fixture
async def redis_url(servers: Servers) -> str:
    import redis.asyncio as aioredis

    client = aioredis.from_url(servers.redis_url)
    await client.flushdb()
    await client.aclose()
    return servers.redis_url


@pytest.fixture
async def nats_url(servers: Servers) -> str:
    """NATS with the platform's streams, empty (as `crosslogic nats setup` leaves them)."""
    if servers.nats is not None and not servers.nats.alive():
        servers.nats.start()  # a test that stopped NATS must not break the next one
    admin = await servers.admin_bus("test-reset")
    try:
        for info in await admin.js.streams_info():
            await admin.js.delete_stream(info.config.name)
        # A stream made again right after its deletion can find its old store still being
        # removed on a busy machine ("error creating store for stream"): ask again.
        for attempt in itertools.count():
            try:
                await admin.ensure_streams()
                break
            except nats.js.errors.ServerError:
                if attempt >= 50:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await admin.close()
    return servers.nats_url


@pytest.fixture
async def bus(servers: Servers, nats_url: str) -> AsyncIterator[Bus]:
    """A connected bus (the harness's admin identity) with the platform's streams, empty."""
    b = await servers.admin_bus()
    yield b
    await b.close()
