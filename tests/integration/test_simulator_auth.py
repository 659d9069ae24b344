"""The simulator with an API key answers as `vllm serve --api-key` does, over real HTTP; and
it takes `cache_salt` as vLLM does, salting its prefix cache with it."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from tests.integration.simulator_fixtures import (  # noqa: F401 - fixtures
    MODEL,
    Sim,
    SimProcess,
    StartSim,
    sim_process,
    start_sim,
)

KEY = "clnk_this-nodes-key-0123456789abcdefghij"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
SERVED = "http_requests_total{handler=/v1/chat/completions,method=POST,status=2xx}"


async def post(url: str, body: object, headers: dict[str, str] | None = None
               ) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as r:
        return r.status, await r.read(), dict(r.headers)


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", f"Basic {KEY}", "Bearer clnk_another-nodes-key-abcdefghijklmnop",
    f"Bearer {KEY}x", f"Bearer  {KEY}",
])
async def test_v1_without_the_key_is_vllms_401(start_sim: StartSim,  # noqa: F811
                                               authorization: str | None) -> None:
    sim = await start_sim(model=MODEL, api_keys=[KEY])
    headers = {} if authorization is None else {"Authorization": authorization}
    status, body, response_headers = await post(f"{sim.url}/v1/chat/completions", CHAT,
                                                headers)
    assert (status, body) == (401, b'{"error":"Unauthorized"}')
    assert response_headers["Content-Type"] == "application/json"
    assert "WWW-Authenticate" not in response_headers
    # Refused before the engine and the route: nothing served, nothing counted.
    metrics = await sim.metrics()
    assert metrics.get(SERVED, 0) == 0 and metrics["vllm:prompt_tokens_total"] == 0


async def test_the_key_opens_every_v1_route(start_sim: StartSim) -> None:  # noqa: F811
    sim = await start_sim(model=MODEL, api_keys=[KEY])
    async with AsyncOpenAI(base_url=sim.base_url, api_key=KEY, max_retries=0) as client:
        reply = await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        assert (await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
                ).choices
        assert (await client.embeddings.create(model=MODEL, input="x")).data
        assert [m.id async for m in client.models.list()] == [MODEL]
    async with AsyncOpenAI(base_url=sim.base_url, api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert (await sim.metrics())[SERVED] == 1


async def test_probes_and_scrapes_need_no_key(start_sim: StartSim) -> None:  # noqa: F811
    """What the agent reads (/health, /metrics) and the monitor probes (/health) stays open,
    and so do /version and the simulator's own /admin/faults."""
    sim = await start_sim(model=MODEL, api_keys=[KEY])
    async with aiohttp.ClientSession() as s:
        for path in ("/health", "/metrics", "/version", "/admin/faults"):
            async with s.get(f"{sim.url}{path}") as r:
                assert r.status == 200, path
        async with s.get(f"{sim.url}/version") as r:
            assert (await r.json())["version"] == "0.34.0"
        # An unknown /v1 path: refused before routing without the key, unknown with it.
        async with s.get(f"{sim.url}/v1/nothing") as r:
            assert r.status == 401
        async with s.get(f"{sim.url}/v1/nothing",
                         headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert (r.status, await r.read()) == (404, b'{"detail":"Not Found"}')
        async with s.options(f"{sim.url}/v1/chat/completions") as r:
            assert r.status != 401  # a CORS preflight is never authenticated


async def test_without_keys_anyone_is_served(start_sim: StartSim) -> None:  # noqa: F811
    sim = await start_sim(model=MODEL)
    assert (await post(f"{sim.url}/v1/chat/completions", CHAT))[0] == 200


async def test_the_process_takes_its_key_from_the_environment(
        sim_process: Callable[..., Awaitable[SimProcess]]) -> None:  # noqa: F811
    from_env = await sim_process("--model", MODEL, env={"VLLM_API_KEY": KEY})
    from_flag = await sim_process("--model", MODEL, "--api-key", "k-one", "k-two",
                                  env={"VLLM_API_KEY": KEY})
    assert (await post(f"{from_env.url}/v1/chat/completions", CHAT))[0] == 401
    ok = {"Authorization": f"Bearer {KEY}"}
    assert (await post(f"{from_env.url}/v1/chat/completions", CHAT, ok))[0] == 200
    # The flag wins over the environment, as in vLLM; any of its keys will do.
    assert (await post(f"{from_flag.url}/v1/chat/completions", CHAT, ok))[0] == 401
    for key in ("k-one", "k-two"):
        assert (await post(f"{from_flag.url}/v1/chat/completions", CHAT,
                           {"Authorization": f"Bearer {key}"}))[0] == 200


# --------------------------------------------------------------------------- cache_salt


@pytest.mark.parametrize("salt", [5, "", ["a"], {"a": 1}, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
async def test_a_bad_cache_salt_is_vllms_400(start_sim: StartSim, path: str,  # noqa: F811
                                             salt: object) -> None:
    sim = await start_sim(model=MODEL)
    body = {"/v1/chat/completions": CHAT,
            "/v1/completions": {"model": MODEL, "prompt": "x"},
            "/v1/embeddings": {"model": MODEL, "input": "x"}}[path]
    status, raw, _ = await post(f"{sim.url}{path}", {**body, "cache_salt": salt})
    assert status == 400
    error = json.loads(raw)["error"]
    assert error["param"] == "cache_salt" and error["type"] == "Bad Request"
    assert "Parameter 'cache_salt' must be a non-empty string if provided." in error["message"]


@pytest.mark.parametrize("salt", ["x" * 129, "a/b", "a@b", "a\\b", "a\x00b"])
async def test_a_cache_salt_vllm_would_not_store_is_400(start_sim: StartSim,  # noqa: F811
                                                        salt: str) -> None:
    sim = await start_sim(model=MODEL)
    status, raw, _ = await post(f"{sim.url}/v1/chat/completions", {**CHAT, "cache_salt": salt})
    assert status == 400 and b"at most 128 characters" in raw


async def test_the_prefix_cache_is_shared_only_under_one_salt(
        start_sim: StartSim) -> None:  # noqa: F811
    sim = await start_sim(model=MODEL)
    long_chat = {**CHAT, "messages": [{"role": "user", "content": " ".join(
        f"word{i}" for i in range(100))}]}

    async def hits_after(salt: str | None) -> float:
        body = long_chat if salt is None else {**long_chat, "cache_salt": salt}
        assert (await post(f"{sim.url}/v1/chat/completions", body))[0] == 200
        return (await sim.metrics())["vllm:prefix_cache_hits_total"]

    assert await hits_after("tenant-a") == 0
    first = await hits_after("tenant-a")
    assert first >= 96  # the same prompt, the same salt: its full blocks
    assert await hits_after("tenant-b") == first  # another salt shares nothing
    assert await hits_after(None) == first
    assert (await sim.metrics())["vllm:prefix_cache_queries_total"] > 4 * first
