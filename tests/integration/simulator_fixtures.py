"""Serving the vLLM simulator for tests: in this process (aiohttp TestServer, or a plain
AppRunner as other services embed it) or as ``python -m agent.simulator`` in a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from agent.simulator import SimulatorConfig, create_app

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Sim:
    url: str
    app: web.Application | None = None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    async def metrics(self) -> dict[str, float]:
        """Each sample's value by name plus labels other than model_name and engine
        (``vllm:request_success_total{finished_reason=stop}``)."""
        async with aiohttp.ClientSession() as s, s.get(f"{self.url}/metrics") as r:
            text = await r.text()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                extra = {k: v for k, v in sample.labels.items()
                         if k not in ("model_name", "engine")}
                key = sample.name + ("{" + ",".join(f"{k}={v}" for k, v in
                                                    sorted(extra.items())) + "}"
                                     if extra else "")
                values[key] = sample.value
        return values

    async def set_faults(self, **faults: Any) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, \
                s.post(f"{self.url}/admin/faults", json=faults) as r:
            assert r.status == 200, await r.text()
            body: dict[str, Any] = await r.json()
            return body


StartSim = Callable[..., Awaitable[Sim]]


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """Starts simulators in this process; ``plain=True`` serves with a plain AppRunner (no
    handler cancellation), as an embedding service might; `api_keys` as `--api-key`."""
    servers: list[TestServer] = []
    runners: list[web.AppRunner] = []

    async def start(*, plain: bool = False, api_keys: Sequence[str] = (),
                    **config: Any) -> Sim:
        app = create_app(SimulatorConfig(**config), api_keys=api_keys)
        if plain:
            runner = web.AppRunner(app, shutdown_timeout=1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            port = runner.addresses[0][1]
            return Sim(f"http://127.0.0.1:{port}", app)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Sim(str(server.make_url("")).rstrip("/"), app)

    yield start
    for server in servers:
        await server.close()
    for runner in runners:
        await runner.cleanup()


@dataclass
class SimProcess:
    proc: asyncio.subprocess.Process
    url: str

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 10)


async def spawn_sim(*args: str, env: dict[str, str] | None = None) -> SimProcess:
    """`python -m agent.simulator --port 0 ARGS`, once it says where it listens."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.simulator", "--port", "0", *args,
        cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().strip()
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    prefix = "vllm simulator listening on "
    if not line.startswith(prefix):
        proc.kill()
        await proc.wait()
        assert proc.stderr is not None
        raise AssertionError(f"no listening line: {line!r} {await proc.stderr.read()!r}")
    return SimProcess(proc, line.removeprefix(prefix))


@pytest.fixture
async def sim_process() -> AsyncIterator[Callable[..., Awaitable[SimProcess]]]:
    started: list[SimProcess] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> SimProcess:
        p = await spawn_sim(*args, env=env)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()


@pytest.fixture
async def sim(start_sim: StartSim) -> Sim:
    """A simulator with the default configuration."""
    return await start_sim()


@pytest.fixture
async def client(sim: Sim) -> AsyncIterator[AsyncOpenAI]:
    """The openai SDK pointed at `sim` (no key: start one with keys for that)."""
    c = AsyncOpenAI(base_url=sim.base_url, api_key="unused", max_retries=0)
    yield c
    await c.close()
