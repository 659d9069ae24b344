"""Resuming requests cut by a lost node (issue 16), through the real gateway over simulators
that cut their streams (the `drop_after_tokens` fault: the connection closes mid-stream) or
fail (`error_rate`). The client's stream goes on on another node with vLLM's
`continue_final_message`; the text it gets is exactly the uninterrupted answer, and it is
billed the original prompt and what it received, once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.events import NodeSpotWarning
from tests.helpers import eventually
from tests.integration.gateway_fixtures import MODEL, Node, Platform, usage_events
from tests.integration.gateway_fixtures import platform as platform

STORY = [{"role": "user", "content": "Tell me a long story about a careful tenant."}]


async def reference(node: Node, body: dict[str, Any]) -> dict[str, Any]:
    """The uninterrupted answer, straight from a healthy node (every node serves the same
    model: same seed, same text)."""
    async with aiohttp.ClientSession() as s, s.post(
            f"{node.url}/v1/chat/completions",
            json={**{k: v for k, v in body.items() if k != "stream_options"}, "stream": False},
            headers={"Authorization": f"Bearer {node.api_key}"}) as r:
        assert r.status == 200, await r.text()
        answer: dict[str, Any] = await r.json()
        return answer


async def stream(p: Platform, body: dict[str, Any], *, leave_after: int | None = None,
                 before_leaving: Callable[[], Awaitable[object]] | None = None,
                 midway: tuple[int, Callable[[], Awaitable[object]]] | None = None
                 ) -> tuple[list[dict[str, Any]], bool, bytes]:
    """The chunks the client got, whether [DONE] came, and the raw stream; with
    `leave_after`, the client hangs up after that many text chunks (and `before_leaving`);
    `midway`: (after so many text chunks, what to do then)."""
    chunks: list[dict[str, Any]] = []
    raw = b""
    done = False
    async with aiohttp.ClientSession() as s, s.post(
            f"{p.gateway_url}/v1/chat/completions", json={**body, "stream": True},
            headers={"Authorization": f"Bearer {p.key.plaintext}"}) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            raw += line
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                done = True
                continue
            chunks.append(msgspec.json.decode(line[6:]))
            text_chunks = [c for c in chunks if c.get("choices") and
                           c["choices"][0]["delta"].get("content")]
            if midway is not None and len(text_chunks) == midway[0]:
                await midway[1]()
                midway = None
            if leave_after is not None and len(text_chunks) >= leave_after:
                if before_leaving is not None:
                    await before_leaving()
                break  # the client hangs up
    return chunks, done, raw


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c.get("choices"))


async def sorted_nodes(p: Platform, count: int, **sim: Any) -> list[Node]:
    for _ in range(count):
        await p.add_node(**sim)
    await p.routable(count)
    # Round robin takes them in id order: the first request goes to the first.
    return sorted(p.nodes, key=lambda n: n.node_id)


@pytest.mark.timeout(120)
async def test_a_stream_cut_twice_reads_as_one_uninterrupted_answer_billed_once(
        platform: Platform) -> None:
    p = platform
    await p.start_gateway()
    first, healthy, second = await sorted_nodes(p, 3)
    await first.faults(drop_after_tokens=7)
    await second.faults(drop_after_tokens=9)
    body = {"model": MODEL, "messages": STORY, "max_tokens": 40,
            "stream_options": {"include_usage": True}}
    expected = await reference(healthy, body)
    chunks, done, _ = await stream(p, body)
    assert done
    assert text_of(chunks) == expected["choices"][0]["message"]["content"]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    finishes = [c["choices"][0]["finish_reason"] for c in chunks
                if c.get("choices") and c["choices"][0].get("finish_reason")]
    assert finishes == [expected["choices"][0]["finish_reason"]]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usage) == 1 and usage[0]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
    assert usage[0]["completion_tokens"] == expected["usage"]["completion_tokens"]
    [event] = await usage_events(p, 1)
    assert (event.prompt_tokens, event.completion_tokens, event.resumed) == (
        expected["usage"]["prompt_tokens"], expected["usage"]["completion_tokens"], 2)
    assert str(event.node_id) == healthy.node_id  # where it ended


@pytest.mark.timeout(120)
async def test_a_stream_is_resumed_once_and_a_whole_answer_sent_again(
        platform: Platform) -> None:
    p = platform
    await p.start_gateway()
    cutter, healthy = await sorted_nodes(p, 2)
    await cutter.faults(drop_after_tokens=5)
    body = {"model": MODEL, "messages": STORY, "max_tokens": 30}
    expected = await reference(healthy, body)
    chunks, done, _ = await stream(p, body)
    assert done and text_of(chunks) == expected["choices"][0]["message"]["content"]
    # A whole answer whose node fails (a 500) is sent to another: the client sees a 200.
    await cutter.faults(drop_after_tokens=None, error_rate=1.0)
    async with aiohttp.ClientSession() as s, s.post(
            f"{p.gateway_url}/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {p.key.plaintext}"}) as r:
        assert r.status == 200, await r.text()
        whole = await r.json()
    assert whole["choices"][0]["message"]["content"] == \
        expected["choices"][0]["message"]["content"]
    events = await usage_events(p, 2)
    assert [(e.completion_tokens, e.resumed) for e in events] == [
        (expected["usage"]["completion_tokens"], 1)] * 2


@pytest.mark.timeout(120)
async def test_a_refused_continuation_is_not_tried_again_and_the_stream_ends_in_error(
        platform: Platform) -> None:
    p = platform
    await p.start_gateway()
    # The other nodes' context is too short for the continuation: vLLM answers 400, which
    # would fail anywhere, so the third node is never asked.
    cutter = await p.add_node()
    await p.routable(1)
    await cutter.faults(drop_after_tokens=5)
    body = {"model": MODEL, "messages": STORY, "max_tokens": 40}
    short = [await p.add_node(max_model_len=30) for _ in range(2)]
    await p.routable(3)
    assert all(n.node_id > cutter.node_id for n in short)
    chunks, done, raw = await stream(p, body)
    assert not done and b'"error"' in raw
    [event] = await usage_events(p, 1)
    assert event.resumed == 1 and event.completion_tokens == len(
        [c for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("content")])


@pytest.mark.timeout(120)
async def test_a_client_that_leaves_during_a_resume_is_billed_what_it_received(
        platform: Platform) -> None:
    p = platform
    await p.start_gateway()
    cutter, slow = await sorted_nodes(p, 2)
    await cutter.faults(drop_after_tokens=4)
    # The continuation's first token comes long after the client has left (which it does as
    # soon as the resume is under way): nothing more reaches it.
    await slow.faults(slow_seconds=5.0)

    async def resuming() -> bool:
        async with aiohttp.ClientSession() as s, s.get(f"{p.gateway_url}/metrics") as r:
            return 'gateway_resumed_requests_total{reason="dropped"} 1.0' in await r.text()

    body = {"model": MODEL, "messages": STORY, "max_tokens": 40}
    _, done, _ = await stream(p, body, leave_after=4, before_leaving=lambda: eventually(
        resuming, timeout=30, what="the resume under way"))
    assert not done
    [event] = await usage_events(p, 1)
    assert event.completion_tokens == 4 and event.resumed == 1


@pytest.mark.timeout(120)
async def test_a_stream_moves_off_a_node_before_its_spot_deadline(platform: Platform) -> None:
    p = platform
    # Streams on a leaving node move this long before its deadline: here, at once.
    await p.start_gateway(resume_cutover_seconds=600)
    leaving, staying = await sorted_nodes(p, 2, inter_token_latency=0.02)
    body = {"model": MODEL, "messages": STORY, "max_tokens": 60}
    expected = await reference(staying, body)

    async def spot_notice() -> None:
        await p.bus.publish(NodeSpotWarning(
            node_id=uuid.UUID(leaving.node_id), provider="aws", action="terminate",
            deadline=datetime.now(UTC) + timedelta(seconds=120)))

    chunks, done, _ = await stream(p, body, midway=(5, spot_notice))
    assert done and text_of(chunks) == expected["choices"][0]["message"]["content"]
    [event] = await usage_events(p, 1)
    assert event.resumed == 1 and str(event.node_id) == staying.node_id
    assert event.completion_tokens == expected["usage"]["completion_tokens"]


@pytest.mark.timeout(120)
async def test_a_whole_answer_whose_node_dies_mid_generation_is_answered_by_another(
        platform: Platform) -> None:
    """vLLM sends a whole answer's head only when it is done: a node that dies while
    generating closes the connection without a byte of answer, seconds after the request.
    That is a failure mid-request (resumed, counted), not a node that never took it."""
    p = platform
    await p.start_gateway()
    dying, healthy = await sorted_nodes(p, 2, inter_token_latency=0.05)
    body = {"model": MODEL, "messages": STORY, "max_tokens": 60}
    expected = await reference(healthy, body)

    async def ask() -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.post(
                f"{p.gateway_url}/v1/chat/completions", json=body,
                headers={"Authorization": f"Bearer {p.key.plaintext}"}) as r:
            assert r.status == 200, await r.text()
            answer: dict[str, Any] = await r.json()
            return answer

    asking = asyncio.create_task(ask())

    async def generating() -> bool:
        async with aiohttp.ClientSession() as s, s.get(f"{dying.url}/metrics") as r:
            text = await r.text()
        return any(sample.value >= 1 for family in text_string_to_metric_families(text)
                   for sample in family.samples
                   if sample.name == "vllm:num_requests_running")

    await eventually(generating, timeout=30, what="the first node generating")
    await asyncio.sleep(1.2)  # past the gateway's "never took it" second: it was working
    # The machine dies mid-generation: its connections cut at once, nothing more said.
    server = dying.sim_runner.server
    assert server is not None
    for handler in list(server.connections):
        if handler.transport is not None:
            handler.transport.abort()
    await dying.stop()
    answer = await asking
    assert answer["choices"][0]["message"]["content"] == \
        expected["choices"][0]["message"]["content"]
    [event] = await usage_events(p, 1)
    assert event.resumed == 1 and str(event.node_id) == healthy.node_id
