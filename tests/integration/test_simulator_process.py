"""``python -m agent.simulator`` as a process: flags, environment, signals, the exit fault."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from openai import OpenAI

from agent.simulator.app import CRASH_EXIT_CODE
from tests.integration import simulator_fixtures
from tests.integration.simulator_fixtures import SimProcess

sim_process = simulator_fixtures.sim_process

SpawnSim = Callable[..., Awaitable[SimProcess]]
MESSAGES: Any = [{"role": "user", "content": "hi"}]


async def test_flags_and_environment_configure_it_and_sigterm_stops_it(
        sim_process: SpawnSim) -> None:
    sim = await sim_process("--model", "tiny-model", "--max-model-len", "512", "--seed", "3",
                            env={"SIM_MAX_NUM_SEQS": "2", "SIM_ITL": "0.001"})

    def work() -> tuple[list[Any], str | None, str]:
        with OpenAI(base_url=sim.base_url, api_key="unused", max_retries=0) as c:
            models = c.models.list().data
            whole = c.chat.completions.create(model="tiny-model", messages=MESSAGES,
                                              max_tokens=5)
            streamed = "".join(ch.choices[0].delta.content or "" for ch in
                               c.chat.completions.create(model="tiny-model", messages=MESSAGES,
                                                         max_tokens=5, stream=True))
            return models, whole.choices[0].message.content, streamed

    models, whole, streamed = await asyncio.to_thread(work)
    assert [(m.id, (m.model_extra or {})["max_model_len"]) for m in models] == [
        ("tiny-model", 512)]
    assert whole == streamed
    assert await sim.stop(signal.SIGTERM) == 0


async def test_sigint_stops_it_cleanly(sim_process: SpawnSim) -> None:
    sim = await sim_process()
    assert await sim.stop(signal.SIGINT) == 0


async def test_faults_from_the_start(sim_process: SpawnSim) -> None:
    sim = await sim_process("--health-503", env={"SIM_ERROR_RATE": "1"})
    async with aiohttp.ClientSession() as s, s.get(f"{sim.url}/health") as r:
        assert r.status == 503

    def chat() -> None:
        with OpenAI(base_url=sim.base_url, api_key="unused", max_retries=0) as c:
            c.chat.completions.create(model=simulator_fixtures.MODEL, messages=MESSAGES)

    with pytest.raises(openai.InternalServerError) as info:
        await asyncio.to_thread(chat)
    assert info.value.status_code == 500
    assert await sim.stop() == 0


async def test_exit_fault_kills_the_process_with_a_nonzero_code(sim_process: SpawnSim) -> None:
    sim = await sim_process()
    async with aiohttp.ClientSession() as s:
        try:
            async with s.post(f"{sim.url}/admin/faults", json={"exit": True}) as r:
                assert r.status == 200
        except aiohttp.ClientError:
            pass  # it may die before the answer arrives; either way it must be gone
    assert await asyncio.wait_for(sim.proc.wait(), 10) == CRASH_EXIT_CODE != 0


async def test_bad_settings_are_refused() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.simulator", "--max-num-seqs", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=simulator_fixtures.ROOT)
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2 and out == b""
    assert b"max_num_seqs" in err
