"""The Responses API and vLLM's other routes through the gateway, as a new user of the real
openai SDK tries them: whole, streamed, continued, retrieved, deleted; each billed exactly
what the node says it used; a stored response reachable by its own tenant only, and only on
the node that holds it."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import aiohttp
import msgspec
import openai
import pytest

from schemas.events import NodeTerminated
from tests.helpers import eventually
from tests.integration import gateway_fixtures
from tests.integration.gateway_fixtures import (  # noqa: F401 - fixtures
    MODEL,
    Platform,
    platform,
    usage_events,
)
from tests.redteam.test_gateway_and_nodes import node_metrics

ready = gateway_fixtures.ready

QUESTION = "What is the capital of France? Answer in one sentence."






async def call(p: Platform, method: str, path: str, body: Any = None,
               key: str | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(
            method, f"{p.gateway_url}{path}", json=body,
            headers={"Authorization": f"Bearer {key or p.key.plaintext}"}) as r:
        return r.status, msgspec.json.decode(await r.read())


async def test_a_response_whole_and_streamed_billed_exactly(ready: Platform) -> None:
    p = ready
    client = p.client()
    whole = await client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=9)
    assert whole.id.startswith("resp_") and whole.status == "completed"
    assert whole.output_text
    assert whole.usage is not None and whole.usage.output_tokens == 9

    stream = await client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=6,
                                           stream=True)
    events = [e async for e in stream]
    kinds = Counter(e.type for e in events)
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert kinds["response.output_text.delta"] >= 1
    final = events[-1].response  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.output_tokens == 6
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert text == final.output_text
    # Stored from the stream too: its node was noted from the first event.
    assert (await client.responses.retrieve(final.id)).output_text == text

    billed = await usage_events(p, 2)
    assert [(u.endpoint, u.streamed, u.status) for u in billed] == [
        ("responses", False, 200), ("responses", True, 200)]
    assert (billed[0].prompt_tokens, billed[0].completion_tokens) == (
        whole.usage.input_tokens, 9)
    assert (billed[1].prompt_tokens, billed[1].completion_tokens) == (
        final.usage.input_tokens, 6)
    assert billed[1].time_to_first_token_ms is not None
    await client.close()


async def test_a_follow_up_reaches_the_node_that_holds_the_conversation(
        platform: Platform) -> None:  # noqa: F811
    p = platform
    await p.start_gateway()
    await p.add_node()
    await p.add_node()
    await p.routable(2)
    client = p.client()
    firsts = [await client.responses.create(model=MODEL, input=f"{QUESTION} ({i})",
                                            max_output_tokens=4) for i in range(6)]
    billed = await usage_events(p, 6)
    holder = {r.id: u.node_id for r, u in zip(firsts, billed, strict=True)}
    assert len(set(holder.values())) == 2  # both nodes hold some: routing matters

    follow_ups = [await client.responses.create(model=MODEL, input="And of Italy?",
                                                previous_response_id=r.id,
                                                max_output_tokens=3) for r in firsts]
    billed = (await usage_events(p, 12))[6:]
    for first, follow_up, usage in zip(firsts, follow_ups, billed, strict=True):
        assert usage.node_id == holder[first.id]
        assert follow_up.previous_response_id == first.id
        assert follow_up.usage is not None and first.usage is not None
        # The earlier turn, asked and answered, is part of the follow-up's prompt.
        assert follow_up.usage.input_tokens > first.usage.input_tokens + 4
        assert (usage.prompt_tokens, usage.completion_tokens) == (
            follow_up.usage.input_tokens, 3)

    fetched = await client.responses.retrieve(firsts[0].id)
    assert fetched.id == firsts[0].id and fetched.output_text == firsts[0].output_text
    await client.close()


async def test_a_stored_response_is_its_own_tenants_only(ready: Platform) -> None:
    p = ready
    client = p.client()
    mine = await client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2)
    other_tenant = await p.catalog.create_tenant("Other")
    other_env = await p.catalog.create_environment(other_tenant, "production", "us-east-1")
    other_key = await p.catalog.create_api_key(other_env, name="other")
    stranger = p.client(other_key.plaintext)
    with pytest.raises(openai.NotFoundError) as err:
        await stranger.responses.retrieve(mine.id)
    assert err.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        await stranger.responses.create(model=MODEL, input="more", previous_response_id=mine.id)
    with pytest.raises(openai.NotFoundError):
        await stranger.responses.delete(mine.id)
    # Still there for its own tenant, including a read-only key of it.
    reader = await p.catalog.create_api_key(p.environment_id, name="reader", role="readonly")
    assert (await p.client(reader.plaintext).responses.retrieve(mine.id)).id == mine.id
    with pytest.raises(openai.PermissionDeniedError):
        await p.client(reader.plaintext).responses.create(model=MODEL, input="x")

    await client.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(mine.id)
    unstored = await client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2,
                                             store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)
    for c in (client, stranger):
        await c.close()


async def test_a_follow_up_whose_node_has_gone_is_a_clear_404(ready: Platform) -> None:
    p = ready
    client = p.client()
    first = await client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2)
    node = p.nodes[0]
    await p.add_node()  # another node serves the model: still not the one with the answer
    await p.routable(2)
    await p.bus.publish(NodeTerminated(node_id=uuid.UUID(node.node_id), reason="test"))

    async def gone() -> bool:
        return node.node_id not in p.gw.table.nodes

    await eventually(gone, timeout=30, what="the node leaves the gateway's table")
    with pytest.raises(openai.NotFoundError) as err:
        await client.responses.create(model=MODEL, input="And then?",
                                      previous_response_id=first.id)
    assert err.value.code == "response_gone"
    assert err.value.param == "previous_response_id"  # type: ignore[attr-defined]
    assert "no longer available" in err.value.message
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)
    # An id the platform never made: not found, and nothing sent to any node.
    status, body = await call(p, "POST", "/v1/responses",
                              {"model": MODEL, "input": "x", "previous_response_id": "resp_0"})
    assert status == 404 and body["error"]["code"] == "response_not_found"
    status, body = await call(p, "GET", "/v1/responses/not%20an%20id")
    assert status == 400 and body["error"]["param"] == "response_id"
    await client.close()


async def test_a_client_that_leaves_a_response_stream_is_billed_what_the_node_made(
        platform: Platform) -> None:  # noqa: F811
    p = platform
    await p.start_gateway()
    node = await p.add_node(inter_token_latency=0.02)  # slow enough to leave mid-answer
    await p.routable(1)
    async with aiohttp.ClientSession() as s:
        r = await s.post(f"{p.gateway_url}/v1/responses",
                         json={"model": MODEL, "input": QUESTION, "max_output_tokens": 100,
                               "stream": True},
                         headers={"Authorization": f"Bearer {p.key.plaintext}"})
        assert r.status == 200
        deltas = 0
        async for line in r.content:
            deltas += line.startswith(b"event: response.output_text.delta")
            if deltas == 5:
                break
        r.close()  # hangs up five tokens in
    (usage,) = await usage_events(p, 1)
    assert usage.endpoint == "responses" and usage.status == 499 and usage.streamed
    # The node's own count, from its final event, which the client never saw: all it made.
    made = await node_metrics(node)
    assert usage.completion_tokens == made["vllm:generation_tokens_total"] > 5
    assert usage.prompt_tokens == made["vllm:prompt_tokens_total"] > 0


async def test_rerank_score_and_tokenization_pass_through_and_are_metered(
        ready: Platform) -> None:
    p = ready
    status, rerank = await call(p, "POST", "/v1/rerank", {
        "model": MODEL, "query": "capital of France",
        "documents": ["Paris is the capital of France.", "Bananas are yellow."]})
    assert status == 200, rerank
    assert sorted(r["index"] for r in rerank["results"]) == [0, 1]
    status, score = await call(p, "POST", "/v1/score", {
        "model": MODEL, "text_1": "capital of France", "text_2": "Paris"})
    assert status == 200, score
    assert score["data"][0]["object"] == "score"
    status, tokens = await call(p, "POST", "/tokenize", {"model": MODEL, "prompt": QUESTION})
    assert status == 200, tokens
    assert tokens["count"] == len(tokens["tokens"]) > 0
    status, text = await call(p, "POST", "/detokenize",
                              {"model": MODEL, "tokens": tokens["tokens"]})
    assert status == 200 and isinstance(text["prompt"], str), text
    status, missing = await call(p, "POST", "/tokenize", {"prompt": QUESTION})
    assert status == 400 and missing["error"]["param"] == "model"

    billed = await usage_events(p, 4)
    assert [u.endpoint for u in billed] == ["rerank", "score", "tokenize", "detokenize"]
    assert billed[0].prompt_tokens == rerank["usage"]["total_tokens"] > 0
    assert billed[1].prompt_tokens == score["usage"]["prompt_tokens"] > 0
    assert all(u.completion_tokens == 0 for u in billed)
    assert (billed[2].prompt_tokens, billed[3].prompt_tokens) == (0, 0)  # no model ran


async def test_two_unreachable_nodes_are_a_502_not_a_500(platform: Platform) -> None:  # noqa: F811
    p = platform
    await p.start_gateway()
    for _ in range(2):
        await p.add_node(advertise="http://127.0.0.1:9")  # nothing listens on the discard port
    await p.routable(2)
    status, body = await call(p, "POST", "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert status == 502, body
    assert body["error"]["type"]
