"""Shared test helpers: wait on a condition with a deadline (never a bare sleep), event makers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from schemas.events import NodeRegistered, TenantCreated, TenantUpdated

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
