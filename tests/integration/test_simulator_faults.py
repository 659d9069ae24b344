"""The vLLM simulator's injectable faults, set through /admin/faults, seen through the SDK."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from tests.helpers import eventually
from tests.integration import simulator_fixtures
from tests.integration.simulator_fixtures import MODEL, Sim, StartSim

start_sim = simulator_fixtures.start_sim

MESSAGES: Any = [{"role": "user", "content": "tell me a story"}]
NO_FAULTS = {"error_rate": 0.0, "slow_seconds": 0.0, "hang_after_tokens": None,
             "drop_after_tokens": None, "health_503": False, "exit": False}


async def read_into(stream: openai.AsyncStream[Any], chunks: list[Any]) -> None:
    async for chunk in stream:
        chunks.append(chunk)


@pytest.fixture
async def sim(start_sim: StartSim) -> Sim:
    return await start_sim(inter_token_latency=0.01)


def client_for(sim: Sim, timeout: float = 10) -> AsyncOpenAI:
    # A short timeout is for reads (what a hung stream trips); connecting gets ten seconds,
    # so a busy machine's slow accept is not mistaken for a hang.
    return AsyncOpenAI(base_url=sim.base_url, api_key="unused", max_retries=0,
                       timeout=openai.Timeout(timeout, connect=max(timeout, 10.0)))


async def test_admin_routes_show_merge_validate_and_reset(sim: Sim) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{sim.url}/admin/faults") as r:
            assert await r.json() == NO_FAULTS
        assert await sim.set_faults(slow_seconds=0.5) == {**NO_FAULTS, "slow_seconds": 0.5}
        assert await sim.set_faults(health_503=True) == {**NO_FAULTS, "slow_seconds": 0.5,
                                                         "health_503": True}
        for bad in ({"bogus": 1}, {"error_rate": 1.5}, {"hang_after_tokens": "soon"}):
            async with s.post(f"{sim.url}/admin/faults", json=bad) as r:
                assert r.status == 400
                error = (await r.json())["error"]
                assert (error["type"], error["code"]) == ("BadRequestError", 400)
        async with s.post(f"{sim.url}/admin/faults", data=b"{oops") as r:
            assert r.status == 400
        async with s.delete(f"{sim.url}/admin/faults") as r:
            assert await r.json() == NO_FAULTS
        async with s.get(f"{sim.url}/admin/faults") as r:
            assert await r.json() == NO_FAULTS


async def test_error_rate_one_fails_every_request_with_a_500(sim: Sim) -> None:
    await sim.set_faults(error_rate=1.0)
    client = client_for(sim)
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert info.value.status_code == 500
    assert info.value.body == {
        "message": "EngineCore encountered an issue. See stack trace (above) for the root "
                   "cause.", "type": "InternalServerError", "param": None, "code": 500}
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    with pytest.raises(openai.InternalServerError):
        await client.completions.create(model=MODEL, prompt="x")
    with pytest.raises(openai.InternalServerError):
        await client.embeddings.create(model=MODEL, input="x")
    await client.close()
    m = await sim.metrics()
    assert m["vllm:e2e_request_latency_seconds_count"] == 0  # never reached the engine


async def test_slow_adds_to_the_time_to_first_token(sim: Sim) -> None:
    await sim.set_faults(slow_seconds=0.3)
    client = client_for(sim)
    started = time.monotonic()
    r = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert time.monotonic() - started >= 0.3
    assert r.choices[0].finish_reason == "length"
    started = time.monotonic()
    await client.embeddings.create(model=MODEL, input="x")
    assert time.monotonic() - started >= 0.3
    await client.close()
    assert (await sim.metrics())["vllm:time_to_first_token_seconds_sum"] >= 0.3


async def test_hang_stalls_the_stream_and_keeps_the_connection(sim: Sim) -> None:
    await sim.set_faults(hang_after_tokens=3)
    client = client_for(sim, timeout=0.5)
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                  max_tokens=20, stream=True)
    chunks = aiter(stream)
    received = [await anext(chunks) for _ in range(1 + 3)]  # the role chunk, three tokens
    assert all(c.choices[0].finish_reason is None for c in received)
    assert (await sim.metrics())["vllm:num_requests_running"] == 1
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):  # the read timeout: nothing more comes
        await anext(chunks)
    assert time.monotonic() - started >= 0.4  # the client's timeout (0.5 s), not an end
    await stream.close()

    async def freed() -> bool:
        return (await sim.metrics())["vllm:num_requests_running"] == 0

    await eventually(freed, timeout=2, what="the hung request freed when its client left")
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
    await client.close()


async def test_drop_cuts_the_connection_mid_stream(sim: Sim) -> None:
    await sim.set_faults(drop_after_tokens=2)
    client = client_for(sim)
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                  max_tokens=20, stream=True)
    chunks: list[Any] = []
    with pytest.raises(openai.APIConnectionError):
        await read_into(stream, chunks)
    assert len(chunks) == 1 + 2
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
    # A response shorter than the fault's count is not cut.
    short = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert short.choices[0].finish_reason == "length"
    await client.close()
    m = await sim.metrics()
    assert m["vllm:request_success_total{finished_reason=abort}"] == 2
    assert m["vllm:num_requests_running"] == 0


async def test_health_503(sim: Sim) -> None:
    async with aiohttp.ClientSession() as s:
        await sim.set_faults(health_503=True)
        async with s.get(f"{sim.url}/health") as r:
            assert r.status == 503
        await sim.set_faults(health_503=False)
        async with s.get(f"{sim.url}/health") as r:
            assert r.status == 200


async def test_shutdown_ends_hung_requests(start_sim: StartSim) -> None:
    sim = await start_sim(plain=True)
    await sim.set_faults(hang_after_tokens=1)
    client = client_for(sim)
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                  max_tokens=20, stream=True)
    first = await anext(aiter(stream))
    assert first.choices[0].delta.role == "assistant"
    assert sim.app is not None
    runner_done = asyncio.get_running_loop().create_future()

    async def read_rest() -> None:
        try:
            async for _ in stream:
                pass
        finally:
            runner_done.set_result(None)

    reader = asyncio.create_task(read_rest())
    await sim.app.shutdown()  # what a runner's cleanup calls first
    await asyncio.wait_for(runner_done, 3)
    await asyncio.gather(reader, return_exceptions=True)
    await client.close()
