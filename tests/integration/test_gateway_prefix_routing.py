"""Prefix-aware routing through the real gateway (issue 15): multi-turn conversations over
four simulated nodes whose prefix caches are vLLM's (blocks chained from a tenant-salted
first block). With `prefix_aware` every turn of a conversation lands where its earlier turns
are cached, so the nodes' own hit rate (`vllm:prefix_cache_hits` / `_queries`) is far above
what round robin gets on the same conversations."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.app import create_gateway_app
from services.gateway.gateway import GATEWAY
from services.infra.devstack import free_port
from tests.helpers import eventually
from tests.integration.gateway_fixtures import MODEL, Node, Platform, usage_events
from tests.integration.gateway_fixtures import platform as platform

TURNS = 3
CONVERSATIONS = 13  # not a multiple of the nodes: round robin is not sticky by chance


async def start(p: Platform, strategy: str) -> tuple[str, web.AppRunner]:
    runner = web.AppRunner(create_gateway_app(p.settings(lb_strategy=strategy)),
                           shutdown_timeout=1.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}", runner


async def cache_counts(nodes: list[Node]) -> tuple[float, float]:
    """(tokens queried, tokens hit) over every node's prefix cache."""
    queried = hit = 0.0
    async with aiohttp.ClientSession() as s:
        for node in nodes:
            async with s.get(f"{node.url}/metrics") as r:
                text = await r.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "vllm:prefix_cache_queries_total":
                        queried += sample.value
                    elif sample.name == "vllm:prefix_cache_hits_total":
                        hit += sample.value
    return queried, hit


async def converse(s: aiohttp.ClientSession, url: str, key: str, name: str) -> None:
    """One user's conversation, turn after turn, each repeating the ones before it."""
    messages = [{"role": "system", "content": "You answer questions about our products."}]
    for turn in range(TURNS):
        messages.append({"role": "user",
                         "content": f"{name}, question {turn}: " + f"{name} details " * 200})
        async with s.post(f"{url}/v1/chat/completions",
                          json={"model": MODEL, "messages": messages, "max_tokens": 4},
                          headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        messages.append({"role": "assistant",
                         "content": answer["choices"][0]["message"]["content"]})


async def hit_rate(p: Platform, url: str, label: str) -> float:
    before = await cache_counts(p.nodes)
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(converse(s, url, p.key.plaintext, f"{label}-user-{i}")
                               for i in range(CONVERSATIONS)))
    after = await cache_counts(p.nodes)
    return (after[1] - before[1]) / (after[0] - before[0])


async def test_prefix_aware_keeps_conversations_on_their_cache(platform: Platform) -> None:
    p = platform
    # No spilling here (the bound is unit-tested): on a busy machine more requests overlap,
    # and a spill would move a turn off its cache.
    await p.start_gateway(lb_strategy="prefix_aware", lb_prefix_spill=100.0)
    for _ in range(4):
        await p.add_node()
    await p.routable(4)
    robin_url, robin = await start(p, "round_robin")
    try:
        async def robin_routes() -> bool:
            gw = robin.app[GATEWAY]  # type: ignore[union-attr]
            return len(gw.table.candidates(MODEL, time.monotonic(), gw.proxy.rules)) >= 4

        await eventually(robin_routes, timeout=15, what="the second gateway sees the nodes")
        robin_rate = await hit_rate(p, robin_url, "robin")
        prefix_rate = await hit_rate(p, p.gateway_url, "prefix")
    finally:
        await robin.cleanup()
    events = await usage_events(p, 2 * CONVERSATIONS * TURNS)
    assert len({e.node_id for e in events[-CONVERSATIONS * TURNS:]}) > 1  # spread out
    # Every turn after the first finds the conversation so far in its node's cache: turns of
    # about L, 2L and 3L tokens hit 0, L and 2L, half of all, which is the most there is.
    assert prefix_rate > 0.45, prefix_rate
    assert prefix_rate > 1.5 * robin_rate, (prefix_rate, robin_rate)
