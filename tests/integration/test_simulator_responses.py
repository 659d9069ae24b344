"""The simulator's Responses API (POST /v1/responses, GET /v1/responses/{id}, cancel) over
real HTTP, driven by the real openai SDK where a client would be."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from agent.simulator.generation import Sampling, TextModel, base_key, chat_text
from tests.helpers import eventually
from tests.integration import simulator_fixtures
from tests.integration.simulator_fixtures import MODEL, Sim, StartSim

start_sim = simulator_fixtures.start_sim
sim = simulator_fixtures.sim
client = simulator_fixtures.client

HELLO_TOKENS = 1 + (5 + 1) + 4  # BOS, the user message "Hello", the assistant header


def expected_text(messages: list[tuple[str, str]], max_tokens: int) -> str:
    key, _ = base_key(server_seed=0, prompt=chat_text(messages), seed=None, temperature=None)
    return TextModel().generate(key, Sampling(max_tokens)).text




async def raw_post(sim: Sim, path: str, body: Any) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as s, s.post(f"{sim.base_url}{path}", json=body) as r:
        return r.status, r.headers["Content-Type"], await r.read()


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        kind, data = block.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: "), block
        events.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


async def test_whole_response_parses_with_the_sdk(client: AsyncOpenAI, sim: Sim) -> None:
    r = await client.responses.create(model=MODEL, input="Hello", max_output_tokens=5,
                                      metadata={"k": "v"}, user="u1")
    assert r.id.startswith("resp_") and len(r.id) == len("resp_") + 32
    assert (r.object, r.status, r.model) == ("response", "completed", MODEL)
    assert r.output_text == expected_text([("user", "Hello")], 5)
    message = r.output[0]
    assert message.type == "message" and message.id.startswith("msg_")
    assert message.role == "assistant" and message.status == "completed"
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (
        HELLO_TOKENS, 5, HELLO_TOKENS + 5)
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert (r.max_output_tokens, r.temperature, r.top_p) == (5, 1.0, 1.0)
    assert (r.metadata, r.user, r.previous_response_id) == ({"k": "v"}, "u1", None)

    status, content_type, raw = await raw_post(sim, "/responses",
                                               {"input": "Hello", "max_output_tokens": 5})
    body = json.loads(raw)
    assert status == 200 and content_type == "application/json"
    # vLLM dumps the whole model: every field, nulls included, logprobs null unless asked.
    assert body["output"][0]["content"] == [{
        "annotations": [], "text": r.output_text, "type": "output_text", "logprobs": None}]
    assert body["usage"]["input_tokens_details"] == {
        "cached_tokens": HELLO_TOKENS // 16 * 16,  # the first request's full blocks
        "input_tokens_per_turn": [], "cached_tokens_per_turn": []}
    assert {"incomplete_details", "input_messages", "output_messages", "tools", "tool_choice",
            "parallel_tool_calls", "truncation", "service_tier", "background",
            "top_logprobs"} <= body.keys()


async def test_instructions_and_message_items_make_the_prompt(client: AsyncOpenAI) -> None:
    r = await client.responses.create(
        model=MODEL, instructions="Be brief.", max_output_tokens=3,
        input=[{"role": "user", "content": "Hello, world!"},
               {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "Again"}]}])
    assert r.usage is not None
    assert r.usage.input_tokens == 1 + (5 + 3) + (5 + 4) + (5 + 1) + 4
    assert r.instructions == "Be brief."
    assert r.output_text == expected_text(
        [("system", "Be brief."), ("user", "Hello, world!"), ("user", "Again")], 3)


async def test_streamed_events_are_vllms(sim: Sim) -> None:
    status, content_type, raw = await raw_post(
        sim, "/responses", {"input": "Hello", "max_output_tokens": 3, "stream": True})
    assert status == 200 and content_type.startswith("text/event-stream")
    assert b"[DONE]" not in raw
    events = sse_events(raw)
    kinds = [k for k, _ in events]
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added",
                     *["response.output_text.delta"] * 3, "response.output_text.done",
                     "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert all(d["type"] == k for k, d in events)
    created = events[0][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert created["usage"] is None and events[1][1]["response"]["usage"] is None
    item_id = events[2][1]["item"]["id"]
    deltas = [d for k, d in events if k == "response.output_text.delta"]
    assert all(d["item_id"] == item_id and d["output_index"] == 0 and d["content_index"] == 0
               and d["logprobs"] == [] for d in deltas)
    text = "".join(d["delta"] for d in deltas)
    assert text == expected_text([("user", "Hello")], 3)
    assert events[7][1]["text"] == text
    done = events[9][1]["item"]
    assert (done["id"], done["status"], done["content"][0]["text"]) == (item_id, "completed",
                                                                         text)
    final = events[-1][1]["response"]
    assert final["status"] == "completed" and final["output"][0]["id"] == item_id
    assert final["usage"]["input_tokens"] == HELLO_TOKENS
    assert final["usage"]["output_tokens"] == 3


async def test_the_sdk_consumes_the_stream(client: AsyncOpenAI) -> None:
    stream = await client.responses.create(model=MODEL, input="Hello", max_output_tokens=6,
                                           stream=True)
    events = [e async for e in stream]
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage is not None
    assert events[-1].response.usage.output_tokens == 6
    assert all(getattr(e.response, "usage", None) is None for e in events[:2])

    async with client.responses.stream(model=MODEL, input="Hello",
                                       max_output_tokens=6) as helper:
        texts = [e.delta async for e in helper if e.type == "response.output_text.delta"]
        final = await helper.get_final_response()
    assert "".join(texts) == final.output_text == expected_text([("user", "Hello")], 6)


async def test_follow_up_retrieve_and_unknown_ids(client: AsyncOpenAI, sim: Sim) -> None:
    first = await client.responses.create(model=MODEL, input="Hello", max_output_tokens=4)
    again = await client.responses.retrieve(first.id)
    assert again.model_dump() == first.model_dump()

    second = await client.responses.create(model=MODEL, input="More",
                                           previous_response_id=first.id, max_output_tokens=2)
    assert second.previous_response_id == first.id
    # The previous turn's input and output are prompt tokens of the follow-up.
    assert second.usage is not None
    assert second.usage.input_tokens == 1 + (5 + 1) + (5 + 4) + (5 + 1) + 4
    assert second.output_text == expected_text(
        [("user", "Hello"), ("assistant", first.output_text), ("user", "More")], 2)

    unknown = {"error": {"message": "Response with id 'resp_nope' not found.",
                         "type": "invalid_request_error", "param": None, "code": 404}}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{sim.base_url}/responses/resp_nope") as r:
            assert (r.status, await r.json()) == (404, unknown)
        async with s.post(f"{sim.base_url}/responses",
                          json={"input": "x", "previous_response_id": "resp_nope"}) as r:
            assert (r.status, await r.json()) == (404, unknown)
        async with s.post(f"{sim.base_url}/responses/{first.id}/cancel") as r:
            assert r.status == 400
            assert (await r.json())["error"]["message"] == "Cannot cancel a synchronous response."
        async with s.delete(f"{sim.base_url}/responses/{first.id}") as r:
            assert r.status == 405  # vLLM has no DELETE route
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("resp_nope")


async def test_store_false_keeps_nothing(client: AsyncOpenAI) -> None:
    r = await client.responses.create(model=MODEL, input="Hello", max_output_tokens=2,
                                      store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r.id)


async def test_logprobs_when_included(client: AsyncOpenAI, sim: Sim) -> None:
    r = await client.responses.create(model=MODEL, input="Hello", max_output_tokens=3,
                                      top_logprobs=2, include=["message.output_text.logprobs"])
    part = r.output[0].content[0]  # type: ignore[union-attr]
    assert part.type == "output_text" and part.logprobs is not None
    assert len(part.logprobs) == 3 and r.top_logprobs == 2
    assert "".join(lp.token for lp in part.logprobs) == r.output_text
    assert all(len(lp.top_logprobs) == 2 and lp.top_logprobs[0].token == lp.token
               for lp in part.logprobs)
    # top_logprobs alone does not include them, as in vLLM.
    plain = await client.responses.create(model=MODEL, input="Hello", max_output_tokens=3,
                                          top_logprobs=2)
    assert plain.output[0].content[0].logprobs is None  # type: ignore[union-attr]

    _, _, raw = await raw_post(sim, "/responses", {
        "input": "Hello", "max_output_tokens": 2, "stream": True, "top_logprobs": 1,
        "include": ["message.output_text.logprobs"]})
    deltas = [d for k, d in sse_events(raw) if k == "response.output_text.delta"]
    assert [len(d["logprobs"]) for d in deltas] == [1, 1]
    assert deltas[0]["logprobs"][0]["token"] == deltas[0]["delta"]
    with pytest.raises(openai.BadRequestError, match="greater than max allowed: 20"):
        await client.responses.create(model=MODEL, input="Hello", top_logprobs=21,
                                      include=["message.output_text.logprobs"])


async def test_bad_requests_are_vllms(sim: Sim) -> None:
    status, _, raw = await raw_post(sim, "/responses", {"model": "gpt-4", "input": "x"})
    assert status == 404 and json.loads(raw)["error"]["param"] == "model"
    status, _, raw = await raw_post(sim, "/responses", {"max_output_tokens": 3})
    assert status == 400 and json.loads(raw)["error"]["param"] == "body.input"
    status, _, raw = await raw_post(sim, "/responses", {
        "input": "x", "tools": [{"type": "function", "name": "f", "parameters": {}}]})
    assert status == 400
    assert json.loads(raw)["error"]["message"].startswith("Tool use is not supported")
    status, _, raw = await raw_post(sim, "/responses", {"input": "x", "cache_salt": ""})
    assert status == 400 and json.loads(raw)["error"]["param"] == "cache_salt"
    status, _, raw = await raw_post(sim, "/responses", {"input": "x", "unknown_field": 1,
                                                        "max_output_tokens": 1})
    assert status == 200  # unknown fields are tolerated, as vLLM does


async def test_counted_like_chat_and_salted(client: AsyncOpenAI, sim: Sim) -> None:
    before = await sim.metrics()
    await client.responses.create(model=MODEL, input="Hello", max_output_tokens=4)
    await client.responses.create(model=MODEL, input="Hello", max_output_tokens=4,
                                  stream=True)
    after = await sim.metrics()
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == (
        2 * HELLO_TOKENS)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 8
    assert after["vllm:request_success_total{finished_reason=length}"] - before.get(
        "vllm:request_success_total{finished_reason=length}", 0) == 2
    assert after["http_requests_total{handler=/v1/responses,method=POST,status=2xx}"] == 2

    long_input = " ".join(["word"] * 40)  # 50 tokens with the chat template: 3 blocks of 16
    body: Any = {"input": long_input, "max_output_tokens": 1, "cache_salt": "tenant-a"}
    first = await client.responses.create(model=MODEL, extra_body=body)
    again = await client.responses.create(model=MODEL, extra_body=body)
    other = await client.responses.create(model=MODEL,
                                          extra_body={**body, "cache_salt": "tenant-b"})
    assert first.usage is not None and again.usage is not None and other.usage is not None
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert first.usage.input_tokens == 50
    assert again.usage.input_tokens_details.cached_tokens == 48
    assert other.usage.input_tokens_details.cached_tokens == 0


async def test_a_client_that_leaves_stops_the_generation(start_sim: StartSim) -> None:
    sim = await start_sim(inter_token_latency=0.05)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(f"{sim.base_url}/responses",
                            json={"input": "Hello", "max_output_tokens": 200, "stream": True})
        assert resp.status == 200
        # The created and in_progress events come before the engine runs it.
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert first.startswith(b"event: response.created\n")
        while b"response.output_text.delta" not in await asyncio.wait_for(
                resp.content.readuntil(b"\n\n"), 5):
            pass
        resp.close()

    async def aborted() -> dict[str, float] | None:
        m = await sim.metrics()
        done = m.get("vllm:request_success_total{finished_reason=abort}", 0) == 1
        return m if done and m["vllm:num_requests_running"] == 0 else None

    m = await eventually(aborted, timeout=5, what="the response aborted")
    assert m["vllm:generation_tokens_total"] < 200
