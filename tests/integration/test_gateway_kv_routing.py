"""kv_aware routing through the real gateway (issue 15): simulators publish vLLM's KV cache
events on ZeroMQ, their real agents relay them over NATS on each node's own subject, and the
gateway's index sends a prompt to the node whose cache holds it, whichever that is."""

from __future__ import annotations

import aiohttp
import pytest

from services.gateway.kv_prompt import PromptBlocks
from tests.helpers import eventually
from tests.integration.gateway_fixtures import MODEL, Node, Platform, usage_events
from tests.integration.gateway_fixtures import platform as platform

BLOCK = 16


def conversation(name: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": f"You are {name}'s assistant. " * 60},
            {"role": "user", "content": f"What does {name} sell?"}]


async def prime(node: Node, messages: list[dict[str, str]], salt: str) -> None:
    """The prompt cached on `node` behind the gateway's back, as the gateway salts it."""
    async with aiohttp.ClientSession() as s, s.post(
            f"{node.url}/v1/chat/completions",
            json={"model": MODEL, "messages": messages, "max_tokens": 1, "cache_salt": salt},
            headers={"Authorization": f"Bearer {node.api_key}"}) as r:
        assert r.status == 200, await r.text()


def overlap(p: Platform, messages: list[dict[str, str]], tenant: str) -> dict[str, int]:
    index = p.gw.balancer.kv_index
    assert index is not None
    keys = PromptBlocks().keys("chat", {"messages": messages}, tenant, BLOCK)
    return index.overlaps(keys, [n.node_id for n in p.nodes])


@pytest.mark.timeout(120)
async def test_a_prompt_goes_to_the_node_whose_kv_events_say_it_holds_it(
        platform: Platform) -> None:
    p = platform
    await p.start_gateway(lb_strategy="kv_aware")
    for _ in range(3):
        await p.add_node(kv_events=True, block_size=BLOCK)
    await p.routable(3)
    tenant = str(p.tenant_id)
    other = await p.catalog.create_tenant("another")
    # Each node caches a different prompt; prefix_aware's hashing would find one in three.
    for i, node in enumerate(p.nodes):
        messages = conversation(f"shop-{i}")
        await prime(node, messages, tenant)

        async def known(messages: list[dict[str, str]] = messages,
                        node: Node = node) -> bool:
            return overlap(p, messages, tenant).get(node.node_id, 0) > 10

        await eventually(known, timeout=30, what=f"node {i}'s blocks in the gateway's index")
        # The same prompt from another tenant matches nothing: its cache is salted apart.
        assert overlap(p, messages, str(other)) == {}
    client = p.client()
    for i in range(3):
        await client.chat.completions.create(
            model=MODEL, messages=conversation(f"shop-{i}"), max_tokens=2)  # type: ignore[arg-type]
    events = await usage_events(p, 3)
    assert [str(e.node_id) for e in events[-3:]] == [n.node_id for n in p.nodes]
    # The node's cache emptied (vLLM's /reset_prefix_cache): the index forgets it at once.
    async with aiohttp.ClientSession() as s, s.post(
            f"{p.nodes[0].url}/reset_prefix_cache",
            headers={"Authorization": f"Bearer {p.nodes[0].api_key}"}) as r:
        assert r.status == 200, await r.text()

    async def forgotten() -> bool:
        return not overlap(p, conversation("shop-0"), tenant)

    await eventually(forgotten, timeout=30, what="node 0's blocks gone from the index")
    async with aiohttp.ClientSession() as s, s.get(f"{p.gateway_url}/metrics") as r:
        assert 'gateway_kv_events_total{outcome="applied"}' in await r.text()
