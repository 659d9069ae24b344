"""Shared test helpers: wait on a condition with a deadline (never a bare sleep), event makers."""

from __future__ import annotations

import asyncio
import fnmatch
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import asyncpg

from schemas.events import (
    ApiKeyCreated,
    EnvironmentCreated,
    Event,
    NodeAccepted,
    NodeLaunching,
    NodeRegistered,
    TenantCreated,
    TenantUpdated,
)
from schemas.ids import uuid7
from services.domain.catalog import catalog_projections, generate_api_key, hash_api_key
from services.domain.fleet import Fleet
from services.domain.node_states import Signal
from services.infra.eventlog import NO_STREAM, EventLog
from services.infra.natsauth.authority import NodeIssuer

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T]], *, timeout: float = 10.0,
                     interval: float = 0.02, what: str = "condition") -> T:
    """Await `check()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, then the parent's
    pid); None when the process is gone."""
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def live_parents() -> dict[int, int]:
    """Every live (not zombie) process's parent pid."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    return parents


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    return [child for child, parent in live_parents().items() if parent == pid]


def tenant_created(name: str = "acme", tenant_id: uuid.UUID | None = None) -> TenantCreated:
    return TenantCreated(tenant_id=tenant_id or uuid.uuid4(), name=name)


def tenant_renamed(tenant_id: uuid.UUID, name: str) -> TenantUpdated:
    return TenantUpdated(tenant_id=tenant_id, name=name)


def node_registered(node_id: uuid.UUID | None = None, *, model: str = "llama-8b",
                    region: str = "us-east-1") -> NodeRegistered:
    return NodeRegistered(
        node_id=node_id or uuid.uuid4(), cluster_name=f"crosslogic-{model}-{region}",
        provider="aws", region=region, instance_type="g5.2xlarge", gpu_type="A10G",
        vram_total_gb=24, model_name=model, endpoint_url="http://10.0.1.45:8000",
        spot_instance=True, agent_version="test")


def node_accepted(registration: NodeRegistered) -> NodeAccepted:
    """What the monitor appends when it accepts `registration` (the same id it would give)."""
    from services.monitor.registration import accepted_id

    return NodeAccepted(id=accepted_id(registration.id), node_id=registration.node_id,
                        registration_id=registration.id,
                        endpoint_url=registration.endpoint_url,
                        model_name=registration.model_name, region=registration.region)


async def launched(source: asyncpg.Pool | EventLog, node_id: uuid.UUID, *,
                   model: str = "llama-8b", region: str = "us-east-1") -> NodeLaunching:
    """Record that the orchestrator launched `node_id` (as it does before asking the cloud):
    the monitor accepts a registration only from a launched node. `source`: a pool or an
    EventLog."""
    eventlog = source if isinstance(source, EventLog) else EventLog(source)
    event = NodeLaunching(node_id=node_id, deployment_id=None,
                          cluster_name=f"crosslogic-test-{node_id.hex[:8]}", model_name=model,
                          provider="local", region=region, gpu_type="A10G", spot=False,
                          deadline=datetime.now(UTC) + timedelta(minutes=30))
    await Fleet(eventlog, actor="test").launching(event)
    return event


@dataclass(frozen=True)
class UsageOwner:
    tenant_id: uuid.UUID
    environment_id: uuid.UUID
    api_key_id: uuid.UUID


async def usage_owner(pool: asyncpg.Pool, tenant_id: uuid.UUID | None = None, *,
                      environment_id: uuid.UUID | None = None,
                      api_key_id: uuid.UUID | None = None) -> UsageOwner:
    """A tenant (made unless it exists), an environment of it and an API key of that
    environment, in the log and the catalog's projections, under the ids asked for: billing
    bills only usage whose ids exist and belong together."""
    tenant_id = tenant_id or uuid7()
    environment_id = environment_id or uuid7()
    api_key_id = api_key_id or uuid7()
    plaintext = generate_api_key()
    events: list[Event] = []
    if not await pool.fetchval("SELECT 1 FROM tenants WHERE id = $1", tenant_id):
        events.append(TenantCreated(tenant_id=tenant_id, name=f"t-{tenant_id.hex[:8]}"))
    events += [EnvironmentCreated(environment_id=environment_id, tenant_id=tenant_id,
                                  name=f"env-{environment_id.hex[:8]}", region="us-east-1"),
               ApiKeyCreated(key_id=api_key_id, tenant_id=tenant_id,
                             environment_id=environment_id, key_hash=hash_api_key(plaintext),
                             last_four=plaintext[-4:])]
    async with pool.acquire() as conn, conn.transaction():
        log = EventLog(conn)
        for event in events:
            result = await log.append(event.stream, [event], NO_STREAM)
            for projection in catalog_projections():
                if any(fnmatch.fnmatchcase(event.type, t) for t in projection.event_types):
                    await projection.apply(conn, result.events)
    return UsageOwner(tenant_id, environment_id, api_key_id)


async def ended_node(pool: asyncpg.Pool, issuer: NodeIssuer) -> str:
    """A node launched with its own credential, then gone: its key is one to revoke."""
    from services.orchestrator.credentials import node_credentials

    node_id = uuid7()
    now = datetime.now(UTC)
    creds, expires = node_credentials(issuer, node_id, 3600, now)
    fleet = Fleet(EventLog(pool), actor="orchestrator")
    await fleet.launching(NodeLaunching(
        node_id=node_id, deployment_id=None, cluster_name=f"c-{node_id.hex[:8]}",
        model_name="m", provider="local", region="local", gpu_type="none", spot=False,
        deadline=now + timedelta(minutes=15), credential_key=creds.public_key,
        credential_expires_at=expires))
    await fleet.signal(node_id, Signal.GONE, reason="scaled down")
    return creds.public_key


async def served_account(nats_url: str, issuer: NodeIssuer) -> str:
    """The node account's JWT as the NATS servers hold it now (asked as the system user)."""
    import nats
    from nats.aio.client import RawCredentials

    from services.infra.natsauth.revocations import AccountResolver

    nc = await nats.connect(nats_url, user_credentials=RawCredentials(
        issuer.system_creds.text()))
    try:
        return await AccountResolver(nc, issuer.account).lookup()
    finally:
        await nc.close()
