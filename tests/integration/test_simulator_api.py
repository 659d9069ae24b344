"""The vLLM simulator's OpenAI API over real HTTP, driven by the real openai SDK."""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from agent.simulator.generation import (
    ChoiceOutput,
    Sampling,
    TextModel,
    base_key,
    chat_text,
    choice_key,
    embedding_key,
    embedding_vector,
)
from agent.simulator.tokenizer import chat_prompt_tokens, text_prompt_tokens
from tests.integration import simulator_fixtures
from tests.integration.simulator_fixtures import MODEL, Sim

start_sim = simulator_fixtures.start_sim
sim = simulator_fixtures.sim
client = simulator_fixtures.client

HELLO: Any = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hello, world!"}]
HELLO_PROMPT_TOKENS = 1 + (5 + 3) + (5 + 4) + 4  # BOS, two messages, assistant header
CONTINUOUS: Any = {"include_usage": True, "continuous_usage_stats": True}  # a vLLM extension


def expected(prompt: str, *, max_tokens: int, seed: int | None = None,
             temperature: float | None = None, choice: int = 0,
             stop: tuple[str, ...] = ()) -> ChoiceOutput:
    key, shared = base_key(server_seed=0, prompt=prompt, seed=seed, temperature=temperature)
    return TextModel().generate(choice_key(key, choice, shared),
                                Sampling(max_tokens=max_tokens, stop=stop))


def chat_prompt(messages: Any) -> str:
    return chat_text([(m["role"], m["content"]) for m in messages])




# --------------------------------------------------------------------------- chat


async def test_chat_completion_exact_text_and_usage(client: AsyncOpenAI) -> None:
    r = await client.chat.completions.create(model=MODEL, messages=HELLO)
    want = expected(chat_prompt(HELLO), max_tokens=8192 - HELLO_PROMPT_TOKENS)
    assert r.id.startswith("chatcmpl-") and len(r.id) == len("chatcmpl-") + 32
    assert (r.object, r.model, r.choices[0].index) == ("chat.completion", MODEL, 0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "stop"  # the natural end: an EOS token
    assert r.choices[0].logprobs is None
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        HELLO_PROMPT_TOKENS, want.num_tokens, HELLO_PROMPT_TOKENS + want.num_tokens)
    assert chat_prompt_tokens(m["content"] for m in HELLO) == HELLO_PROMPT_TOKENS


async def test_max_tokens_and_max_completion_tokens_give_length(client: AsyncOpenAI) -> None:
    for r in (await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5),
              await client.chat.completions.create(model=MODEL, messages=HELLO,
                                                   max_completion_tokens=5)):
        assert r.choices[0].finish_reason == "length"
        assert r.usage is not None and r.usage.completion_tokens == 5
        assert r.choices[0].message.content == expected(chat_prompt(HELLO), max_tokens=5).text


async def test_stop_strings(client: AsyncOpenAI) -> None:
    full = expected(chat_prompt(HELLO), max_tokens=30, seed=3)
    stop = full.text.split(" ")[4]
    for given in (stop, [stop, "zzz"]):
        r = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=30,
                                                 seed=3, stop=given)
        choice = r.choices[0]
        assert choice.message.content == full.text[:full.text.index(stop)]
        assert choice.finish_reason == "stop"
        assert choice.model_extra is not None and choice.model_extra["stop_reason"] == stop


async def test_seed_fixes_the_text_and_n_gives_distinct_choices(client: AsyncOpenAI) -> None:
    r = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10,
                                             seed=7, n=3, temperature=0.8)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert texts == [expected("", max_tokens=10, seed=7, temperature=0.8, choice=i).text
                     for i in range(3)]
    assert len(set(texts)) == 3
    assert r.usage is not None and r.usage.completion_tokens == 30
    assert r.usage.prompt_tokens == HELLO_PROMPT_TOKENS  # counted once
    other = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "something else"}], max_tokens=10,
        seed=7, n=1)
    assert other.choices[0].message.content == texts[0]  # the seed alone decides

    greedy = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10,
                                                  n=2, temperature=0, seed=1)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


async def test_unknown_fields_and_sampling_knobs_are_accepted(sim: Sim) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "top_k": 5, "frobnicate": 1,
            "temperature": 0.2, "presence_penalty": 0.1, "logit_bias": {}, "user": "u"}
    async with aiohttp.ClientSession() as s, \
            s.post(f"{sim.base_url}/chat/completions", json=body,
                   headers={"X-Request-Id": "req-42"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json"
        data = await r.json()
    assert data["id"] == "chatcmpl-req-42"
    assert data["usage"]["completion_tokens"] == 3


# --------------------------------------------------------------------------- streaming


async def collect(stream: openai.AsyncStream[Any]) -> list[Any]:
    return [chunk async for chunk in stream]


async def test_chat_stream_matches_the_whole_answer(client: AsyncOpenAI) -> None:
    want = expected(chat_prompt(HELLO), max_tokens=8, seed=5)
    chunks = await collect(await client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, seed=5, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert len(chunks) == 1 + 8  # the role chunk, then one per token
    assert "".join(c.choices[0].delta.content for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 8 + ["length"]
    assert all(c.usage is None for c in chunks)  # no usage unless asked


async def test_stream_usage_on_request_and_continuously(client: AsyncOpenAI) -> None:
    chunks = await collect(await client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and all(c.usage is None for c in body)
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens,
            last.usage.total_tokens) == (HELLO_PROMPT_TOKENS, 4, HELLO_PROMPT_TOKENS + 4)

    chunks = await collect(await client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=4, stream=True, n=2,
        stream_options=CONTINUOUS))
    *body, last = chunks
    per_choice: dict[int, list[int]] = {0: [], 1: []}
    for c in body:
        assert c.usage is not None and c.usage.prompt_tokens == HELLO_PROMPT_TOKENS
        per_choice[c.choices[0].index].append(c.usage.completion_tokens)
    assert per_choice == {0: [0, 1, 2, 3, 4], 1: [0, 1, 2, 3, 4]}
    assert last.usage is not None and last.usage.completion_tokens == 8


async def test_a_natural_end_streams_an_empty_eos_chunk(client: AsyncOpenAI) -> None:
    want = expected(chat_prompt(HELLO), max_tokens=1000, seed=2)
    chunks = await collect(await client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=1000, seed=2, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].delta.content == ""
    assert len(chunks) == 1 + want.num_tokens


# --------------------------------------------------------------------------- completions


async def test_text_completion(client: AsyncOpenAI) -> None:
    r = await client.completions.create(model=MODEL, prompt="Once upon a time")
    want = expected("Once upon a time", max_tokens=16)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "length"  # vLLM's default max_tokens is 16
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (1 + 4, 16)
    assert text_prompt_tokens("Once upon a time") == 5

    batch = await client.completions.create(model=MODEL, prompt=["a b", "c"], max_tokens=3,
                                            n=2, echo=True)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    echoed = ["a b", "a b", "c", "c"]  # each prompt, then its output
    assert all(c.text.startswith(e) for c, e in zip(batch.choices, echoed, strict=True))
    assert batch.usage is not None
    assert (batch.usage.prompt_tokens, batch.usage.completion_tokens) == (3 + 2, 12)

    ids = await client.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=2)
    assert ids.usage is not None and ids.usage.prompt_tokens == 4


async def test_text_completion_stream(client: AsyncOpenAI) -> None:
    want = expected("Once upon a time", max_tokens=6)
    chunks = await collect(await client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, stream=True,
        stream_options={"include_usage": True}))
    *body, last = chunks
    assert len(body) == 6 and "".join(c.choices[0].text for c in body) == want.text
    assert body[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 6


# --------------------------------------------------------------------------- embeddings


async def test_embeddings(client: AsyncOpenAI, sim: Sim) -> None:
    r = await client.embeddings.create(model=MODEL, input=["hello", "hello world"])
    want = embedding_vector(embedding_key(0, "hello"), 384)
    assert [d.index for d in r.data] == [0, 1]
    assert len(r.data[0].embedding) == 384
    assert r.data[0].embedding == pytest.approx(want, abs=1e-6)  # float32 on the wire
    assert r.usage.prompt_tokens == r.usage.total_tokens == 2 + 3
    async with aiohttp.ClientSession() as s, \
            s.post(f"{sim.base_url}/embeddings",
                   json={"model": MODEL, "input": "hello", "encoding_format": "float"}) as resp:
        body = await resp.json()
    assert body["id"].startswith("embd-") and body["object"] == "list"
    assert body["data"][0]["embedding"] == want
    raw = base64.b64decode((await client.embeddings.with_raw_response.create(
        model=MODEL, input="hello", encoding_format="base64")).http_response.json()
        ["data"][0]["embedding"])
    assert list(struct.unpack("<384f", raw)) == pytest.approx(want, abs=1e-6)


# --------------------------------------------------------------------------- the rest


async def test_models_health_version(client: AsyncOpenAI, sim: Sim) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "vllm"
    assert models.data[0].model_extra is not None
    assert models.data[0].model_extra["max_model_len"] == 8192
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{sim.url}/health") as r:
            assert r.status == 200 and await r.read() == b""
        async with s.get(f"{sim.url}/version") as r:
            assert "version" in await r.json()
        async with s.get(f"{sim.url}/nope") as r:
            assert r.status == 404 and await r.json() == {"detail": "Not Found"}
        async with s.get(f"{sim.base_url}/chat/completions") as r:
            assert r.status == 405 and await r.json() == {"detail": "Method Not Allowed"}


async def test_sync_client_and_stream(sim: Sim) -> None:
    def work() -> tuple[str | None, str]:
        with OpenAI(base_url=sim.base_url, api_key="unused", max_retries=0) as c:
            whole = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6,
                                              seed=4)
            streamed = "".join(
                chunk.choices[0].delta.content or ""
                for chunk in c.chat.completions.create(model=MODEL, messages=HELLO,
                                                       max_tokens=6, seed=4, stream=True))
            return whole.choices[0].message.content, streamed

    whole, streamed = await asyncio.to_thread(work)
    assert whole == streamed == expected("", max_tokens=6, seed=4).text


# --------------------------------------------------------------------------- errors


async def test_unknown_model_is_404_not_found(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-4", messages=HELLO)
    assert info.value.status_code == 404
    assert info.value.body == {"message": "The model `gpt-4` does not exist.",
                               "type": "NotFoundError", "param": "model", "code": 404}


async def test_context_length_and_bad_values_are_400(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8180)
    assert info.value.body == {
        "message": f"You passed {HELLO_PROMPT_TOKENS} input tokens and requested 8180 output "
                   "tokens. However, the model's context length is only 8192 tokens, "
                   "resulting in a maximum input length of 12 tokens. Please reduce the "
                   f"length of the input prompt. (parameter=input_tokens, "
                   f"value={HELLO_PROMPT_TOKENS})",
        "type": "BadRequestError", "param": "input_tokens", "code": 400}
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model=MODEL, prompt="x", max_tokens=10_000)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="n must be at least 1, got 0"):
        await client.chat.completions.create(model=MODEL, messages=HELLO, n=0)


async def test_malformed_requests_are_400_in_vllms_shape(sim: Sim) -> None:
    async def post(data: bytes) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as s, \
                s.post(f"{sim.base_url}/chat/completions", data=data,
                       headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json()

    status, body = await post(b"{not json")
    assert status == 400 and body["error"]["type"] == "Bad Request"
    assert body["error"]["code"] == 400 and "json_invalid" in body["error"]["message"]
    status, body = await post(b'{"model": "%s"}' % MODEL.encode())
    assert status == 400 and body["error"]["param"] == "body.messages"
    assert "Field required" in body["error"]["message"]
    status, body = await post(b'{"messages": [], "max_tokens": "many"}')
    assert status == 400 and body["error"]["param"] == "body.max_tokens"
    status, body = await post(b'{"messages": [], "stream_options": {"include_usage": true}}')
    assert status == 400 and body["error"]["param"] == "stream_options"
