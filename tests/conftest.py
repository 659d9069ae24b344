"""Real servers for the tests: embedded (default), external, or containers.

- Default: PostgreSQL, Redis and NATS started from the project's wheels, once per session.
- `CROSSLOGIC_TEST_DATABASE_URL` / `_REDIS_URL` / `_NATS_URL`: use that server instead.
- `CROSSLOGIC_TEST_BACKEND=containers` with a Docker daemon answering: testcontainers.

Every test starts from a clean state without restarting anything: tables truncated, Redis
flushed, JetStream streams deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from services.core.bus import Bus
from services.core.devstack import DevStack, NatsServer
from services.core.migrate import migrate


@dataclass
class Servers:
    database_url: str
    redis_url: str
    nats_url: str
    nats: NatsServer | None = None
    """The embedded NATS server, for tests that restart it; None when it is external."""
    state_dir: Path | None = None


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env().ping()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def _containers() -> Iterator[Servers]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs
    from testcontainers.postgres import PostgresContainer
    from testcontainers.redis import RedisContainer

    with PostgresContainer("postgres:16", driver=None) as pg, \
            RedisContainer("redis:7") as rd, \
            DockerContainer("nats:2.10").with_command("-js").with_exposed_ports(4222) as nc:
        wait_for_logs(nc, "Server is ready")
        yield Servers(
            database_url=pg.get_connection_url(),
            redis_url=f"redis://{rd.get_container_host_ip()}:{rd.get_exposed_port(6379)}/0",
            nats_url=f"nats://{nc.get_container_host_ip()}:{nc.get_exposed_port(4222)}",
        )


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    env = os.environ
    if env.get("CROSSLOGIC_TEST_BACKEND") == "containers":
        if not _docker_answers():
            pytest.exit("CROSSLOGIC_TEST_BACKEND=containers but no Docker daemon answers", 2)
        with _containers() as found:
            asyncio.run(migrate(found.database_url))
            yield found
        return
    external = {k: env.get(f"CROSSLOGIC_TEST_{k.upper()}") for k in ("database_url",
                                                                       "redis_url", "nats_url")}
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
    from services.core.db import create_pool

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
    import nats

    if servers.nats is not None and not servers.nats.alive():
        servers.nats.start()  # a test that stopped NATS must not break the next one
    nc = await nats.connect(servers.nats_url)
    js = nc.jetstream()
    for info in await js.streams_info():
        await js.delete_stream(info.config.name)
    await nc.close()
    return servers.nats_url


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    """A connected bus with the platform's streams, empty."""
    b = await Bus.connect(nats_url, name="test")
    await b.ensure_streams()
    yield b
    await b.close()
