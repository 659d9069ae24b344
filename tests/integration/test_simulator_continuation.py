"""A stream cut after some tokens and resumed with vLLM's API only, over real HTTP with the
openai SDK: the continuation gives exactly the rest, on the same simulator or another one
with the same seed (nodes share the model)."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from agent.simulator.tokenizer import count_tokens
from services.domain.standin_tokenizer import TokenIds
from tests.integration import simulator_fixtures
from tests.integration.simulator_fixtures import MODEL, Sim, StartSim

start_sim = simulator_fixtures.start_sim
sim = simulator_fixtures.sim
client = simulator_fixtures.client

HELLO: Any = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hello, world!"}]
PROMPT = "Write a story about a GPU: "
CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}
USAGE: Any = {"include_usage": True}
CUT = 17


async def chat_tokens(client: AsyncOpenAI, **fields: Any) -> tuple[list[str], Any]:
    """A streamed chat's text per token (one chunk each after the role chunk) and usage."""
    tokens: list[str] = []
    usage = None
    async for chunk in await client.chat.completions.create(
            model=MODEL, stream=True, stream_options=USAGE, **fields):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.delta.role is None:
                tokens.append(choice.delta.content or "")
    return tokens, usage


async def completion_tokens(client: AsyncOpenAI, **fields: Any) -> tuple[list[str], Any]:
    tokens: list[str] = []
    usage = None
    async for chunk in await client.completions.create(
            model=MODEL, stream=True, stream_options=USAGE, **fields):
        usage = chunk.usage or usage
        tokens.extend(choice.text for choice in chunk.choices)
    return tokens, usage


@pytest.fixture
async def other(start_sim: StartSim) -> Any:
    """A second simulator (another node), with the same seed."""
    node = await start_sim()
    c = AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
    yield c
    await c.close()


async def test_a_cut_chat_stream_goes_on_exactly(client: AsyncOpenAI, other: AsyncOpenAI
                                                 ) -> None:
    full, usage = await chat_tokens(client, messages=HELLO, max_tokens=50)
    assert len(full) == 50 and usage.completion_tokens == 50  # no EOS before 50 here
    sent = "".join(full[:CUT])
    messages = [*HELLO, {"role": "assistant", "content": sent}]
    for node in (client, other):
        r = await node.chat.completions.create(model=MODEL, messages=messages, max_tokens=33,
                                               extra_body=CONTINUE)
        assert sent + (r.choices[0].message.content or "") == "".join(full)
        assert r.choices[0].finish_reason == "length"
        assert r.usage is not None and r.usage.completion_tokens == 33
        # The open message has no end of turn, and no assistant header follows it.
        assert r.usage.prompt_tokens == 1 + (5 + 3) + (5 + 4) + (5 + count_tokens(sent)) - 1
        rest, rest_usage = await chat_tokens(node, messages=messages, max_tokens=33,
                                             extra_body=CONTINUE)
        assert rest == full[CUT:] and rest_usage.completion_tokens == 33


async def test_a_continued_chat_keeps_the_natural_end(client: AsyncOpenAI) -> None:
    full, usage = await chat_tokens(client, messages=HELLO)
    assert full[-1] == ""  # the EOS: its own chunk, no text
    sent = "".join(full[:CUT])
    rest, rest_usage = await chat_tokens(
        client, messages=[*HELLO, {"role": "assistant", "content": sent}], extra_body=CONTINUE)
    assert rest == full[CUT:] and rest_usage.completion_tokens == usage.completion_tokens - CUT


async def test_a_cut_completion_stream_goes_on_exactly(client: AsyncOpenAI,
                                                       other: AsyncOpenAI) -> None:
    full, usage = await completion_tokens(client, prompt=PROMPT, max_tokens=50)
    assert len(full) == 50 and usage.completion_tokens == 50
    sent = "".join(full[:CUT])
    for node in (client, other):
        r = await node.completions.create(model=MODEL, prompt=PROMPT + sent, max_tokens=33,
                                          echo=False)
        assert sent + r.choices[0].text == "".join(full)
        assert r.usage is not None and r.usage.completion_tokens == 33
        assert r.usage.prompt_tokens == 1 + count_tokens(PROMPT + sent)
        rest, rest_usage = await completion_tokens(node, prompt=PROMPT + sent, max_tokens=33)
        assert rest == full[CUT:] and rest_usage.completion_tokens == 33


async def test_echo_shows_the_prompt_as_given(client: AsyncOpenAI) -> None:
    full, _ = await completion_tokens(client, prompt=PROMPT, max_tokens=50)
    sent = "".join(full[:CUT])
    r = await client.completions.create(model=MODEL, prompt=PROMPT + sent, max_tokens=33,
                                        echo=True)
    assert r.choices[0].text == PROMPT + "".join(full)
    streamed, _ = await completion_tokens(client, prompt=PROMPT + sent, max_tokens=33,
                                          echo=True)
    assert streamed[0] == PROMPT + sent + full[CUT] and streamed[1:] == full[CUT + 1:]


async def test_vllms_refusals(client: AsyncOpenAI) -> None:
    messages = [*HELLO, {"role": "assistant", "content": "The"}]
    with pytest.raises(openai.BadRequestError) as both:
        await client.chat.completions.create(
            model=MODEL, messages=messages,
            extra_body={"continue_final_message": True, "add_generation_prompt": True})
    assert "Cannot set both `continue_final_message` and `add_generation_prompt` to True." \
        in str(both.value)
    with pytest.raises(openai.BadRequestError) as default:
        await client.chat.completions.create(model=MODEL, messages=messages,
                                             extra_body={"continue_final_message": True})
    assert "continue_final_message and add_generation_prompt are not compatible" \
        in str(default.value)


async def test_the_prompt_left_open_in_tokens_and_in_the_cache(sim: Sim,
                                                               client: AsyncOpenAI) -> None:
    messages = [*HELLO, {"role": "assistant", "content": "The model"}]
    pairs = [(m["role"], m["content"]) for m in messages]
    want = TokenIds().chat_prompt(pairs, add_generation_prompt=False)[:-1]
    async with aiohttp.ClientSession() as s, \
            s.post(f"{sim.url}/tokenize", json={"messages": messages, **CONTINUE}) as resp:
        assert resp.status == 200
        assert (await resp.json())["tokens"] == want
    before = (await sim.metrics())["vllm:prefix_cache_queries_total"]
    r = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                             extra_body=CONTINUE)
    assert r.usage is not None and r.usage.prompt_tokens == len(want)
    after = (await sim.metrics())["vllm:prefix_cache_queries_total"]
    assert after - before == len(want)
