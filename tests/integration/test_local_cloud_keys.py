"""The local cloud starts each machine's vLLM (the simulator) with the launch's VLLM_API_KEY,
as `vllm serve` on a SkyPilot machine reads it: from the environment, not the command line,
and the agent does not get it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from agent.local_cloud import CloudConfig, LocalCloud
from agent.local_cloud.cloud import MachineRequest
from services.infra.devstack import free_port

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
KEY = "clnk_the-launch-key-0123456789abcdefghijkl"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[LocalCloud]:
    # The agent has no NATS to reach here: it keeps trying, which is all this test needs.
    c = LocalCloud(CloudConfig(agent_env=(("NATS_URL", f"nats://127.0.0.1:{free_port()}"),
                                          ("LOG_JSON", "false")),
                               log_dir=tmp_path / "machines", stop_timeout=2))
    yield c
    await c.close()


async def status(url: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s, \
            s.post(f"{url}/v1/chat/completions", json=BODY, headers=headers) as r:
        return r.status


def proc_file(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


async def test_the_machines_vllm_takes_the_launchs_key(cloud: LocalCloud,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "the-clouds-own-environment")
    machine = await cloud.launch(MachineRequest("m-1", "local", "local", False, MODEL,
                                                {"VLLM_API_KEY": KEY}), "http://unused")
    assert await status(machine.endpoint, None) == 401
    assert await status(machine.endpoint, "the-clouds-own-environment") == 401
    assert await status(machine.endpoint, KEY) == 200
    sim, agent = machine.simulator.pid, machine.agent.pid
    assert KEY.encode() not in proc_file(sim, "cmdline")  # not in the process list
    assert f"VLLM_API_KEY={KEY}".encode() in proc_file(sim, "environ").split(b"\0")
    assert b"VLLM_API_KEY=" not in proc_file(agent, "environ")  # the agent needs no key
    async with aiohttp.ClientSession() as s:  # what the agent reads stays open
        for path in ("/health", "/metrics"):
            async with s.get(f"{machine.endpoint}{path}") as r:
                assert r.status == 200


async def test_a_launch_without_a_key_is_an_open_vllm(cloud: LocalCloud,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """As `vllm serve` without one; the orchestrator always gives one (and a SkyPilot
    machine refuses to start vLLM without it)."""
    monkeypatch.setenv("VLLM_API_KEY", "the-clouds-own-environment")
    machine = await cloud.launch(MachineRequest("m-2", "local", "local", False, MODEL, {}),
                                 "http://unused")
    assert await status(machine.endpoint, None) == 200
