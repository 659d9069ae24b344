"""The gateway and the nodes, attacked: a VPC neighbour calls a node's vLLM, a node answers with
another key, a tenant asks for outputs enough to take a shared node down, or dodges its token
quota, or reaches for another tenant's prefix cache. Each refused before it reaches a node, or
by the node itself; the node's request counter shows what reached it."""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.events import Quota
from schemas.ids import uuid7
from services.infra.node_keys import node_api_key
from tests.integration.gateway_fixtures import MODEL, Node, Platform
from tests.integration.test_gateway_api import HELLO, raw


async def node_post(node: Node, body: dict[str, Any], key: str | None
                    ) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with aiohttp.ClientSession() as s, \
            s.post(f"{node.url}/v1/chat/completions", json=body, headers=headers) as r:
        return r.status, await r.read()


async def node_metrics(node: Node) -> dict[str, float]:
    """The node's /metrics (open without a key, as vLLM's), by sample name and labels."""
    async with aiohttp.ClientSession() as s, s.get(f"{node.url}/metrics") as r:
        text = await r.text()
    return {s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items())
                             if k not in ("model_name", "engine")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def served(node: Node) -> float:
    """Requests the node's vLLM took in (past its key check, whatever it answered)."""
    return sum(v for k, v in (await node_metrics(node)).items()
               if k.startswith("http_requests_total|"))


async def test_each_node_serves_only_with_its_own_key(ready: Platform) -> None:
    p = ready
    second = await p.add_node()
    await p.routable(2)
    first = p.nodes[0]
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    unauthorized = (401, b'{"error":"Unauthorized"}')
    # Anyone on the network: no key, a tenant's key, another node's key, a made-up one.
    for node, other in ((first, second), (second, first)):
        for key in (None, p.key.plaintext, other.api_key,
                    node_api_key(p.node_key_secret, uuid7())):
            assert await node_post(node, body, key) == unauthorized
        assert (await node_post(node, body, node.api_key))[0] == 200
    # The gateway holds no list of keys: it derives each node's from the secret.
    assert first.api_key == node_api_key(p.node_key_secret, first.node_id)
    before = [await served(n) for n in (first, second)]
    async with p.client() as client:
        for _ in range(4):
            reply = await client.chat.completions.create(model=MODEL, messages=HELLO,
                                                         max_tokens=2)
            assert reply.choices[0].finish_reason == "length"
    after = [await served(n) for n in (first, second)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2]  # round robin


async def test_a_node_refusing_the_gateways_key_is_passed_over(platform: Platform) -> None:
    """A node keyed with another secret (or something else at its address) answers 401: the
    request goes to a node that takes it, the refusal is counted against the node, and the
    tenant never sees a 401 that is not about its own key."""
    p = platform
    await p.start_gateway(circuit_min_requests=100)
    stranger = await p.add_node(api_key="clnk_keyed-by-another-secret-0123456789ab")
    await p.routable(1)
    status, err, _ = await raw(p, msgspec.json.encode(
        {"model": MODEL, "messages": HELLO, "max_tokens": 2}))
    assert status == 502 and err["error"]["type"] == "bad_gateway"
    assert "refused the gateway's key (401)" in err["error"]["message"]
    await p.add_node()
    await p.routable(2)
    async with p.client() as client:
        for _ in range(4):  # whichever node the balancer picks first, each one succeeds
            await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    refused = p.gw.metrics.lb_errors.labels(MODEL, stranger.node_id, "unauthorized")
    assert refused._value.get() >= 3


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 9}, "n"), ({"n": 2**63}, "n"), ({"n": 10**30}, "n"), ({"n": 0}, "n"),
    ({"max_tokens": 8193}, "max_tokens"), ({"max_tokens": 2**63}, "max_tokens"),
    ({"max_completion_tokens": 8193}, "max_completion_tokens"),
])
async def test_out_of_bounds_requests_never_reach_a_node(
        ready: Platform, extra: dict[str, Any], param: str) -> None:
    p = ready
    before = await served(p.nodes[0])
    for path, body in (("/v1/chat/completions", {"model": MODEL, "messages": HELLO}),
                       ("/v1/completions", {"model": MODEL, "prompt": "x"})):
        if path == "/v1/completions" and param == "max_completion_tokens":
            continue
        status, err, _ = await raw(p, msgspec.json.encode({**body, **extra}), path=path)
        assert status == 400, err
        assert (err["error"]["type"], err["error"]["param"]) == ("invalid_request_error", param)
        assert len(err["error"]["message"]) < 300
    # Within bounds the same request goes through, and reaches the node.
    ok = {"n": 8} if param == "n" else {param: 8192 - 40}
    status, _, _ = await raw(p, msgspec.json.encode({"model": MODEL, "messages": HELLO,
                                                     "max_tokens": 1, **ok}))
    assert status == 200
    assert await served(p.nodes[0]) == before + 1


def batch(count: int, item: bytes = b'"x"') -> bytes:
    return b"[" + b",".join([item] * count) + b"]"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


COMPLETIONS = b'{"model": "' + MODEL.encode() + b'", "max_tokens": 1, "prompt": '
EMBEDDINGS = b'{"model": "' + MODEL.encode() + b'", "input": '


@pytest.mark.parametrize(("path", "body", "param"), [
    # A batch of prompts is n times as many sequences on one node: bounded like n.
    ("/v1/completions", COMPLETIONS + batch(65) + b"}", "prompt"),
    ("/v1/completions", COMPLETIONS + batch(9) + b', "n": 8}', "prompt"),
    ("/v1/completions", COMPLETIONS + batch(1_000_000) + b', "n": 8}', "prompt"),
    ("/v1/completions", COMPLETIONS + batch(65, b"[1,2]") + b"}", "prompt"),
    ("/v1/embeddings", EMBEDDINGS + batch(2049) + b"}", "input"),
    ("/v1/embeddings", EMBEDDINGS + batch(1_000_000) + b"}", "input"),
    # Nested past the interpreter's stack (was a 500), or past what re-encoding survives.
    ("/v1/chat/completions", b'{"model": "m", "messages": ' + nested(1000) + b"}", None),
    ("/v1/completions", COMPLETIONS + nested(100_000) + b"}", None),
    ("/v1/embeddings", EMBEDDINGS + b'"x", "extra": ' + nested(900) + b"}", None),
    ("/v1/chat/completions", b'{"model": "m", "extra": ' + nested(64) + b"}", None),
])
async def test_too_big_batches_and_too_deep_bodies_never_reach_a_node(
        ready: Platform, path: str, body: bytes, param: str | None) -> None:
    p = ready
    before = await served(p.nodes[0])
    status, err, _ = await raw(p, body, path=path)
    assert status == 400, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert (err["error"]["type"], err["error"]["param"]) == ("invalid_request_error", param)
    assert len(err["error"]["message"]) < 300
    # The same requests within their bounds go through, and reach the node.
    for path, ok in (("/v1/completions", COMPLETIONS + batch(8) + b', "n": 8}'),
                     ("/v1/embeddings", EMBEDDINGS + batch(2048) + b"}"),
                     ("/v1/chat/completions", msgspec.json.encode(
                         {"model": MODEL, "messages": HELLO, "max_tokens": 1,
                          "extra": msgspec.json.decode(nested(62))}))):
        status, answer, _ = await raw(p, ok, path=path)
        assert status == 200, answer
    assert await served(p.nodes[0]) == before + 3


async def test_the_batch_bounds_are_settings(platform: Platform) -> None:
    p = platform
    await p.start_gateway(max_batch_sequences=6, max_embedding_inputs=3)
    await p.add_node()
    await p.routable(1)
    before = await served(p.nodes[0])
    for path, body, param in (
            ("/v1/completions", COMPLETIONS + batch(4) + b', "n": 2}', "prompt"),
            ("/v1/completions", COMPLETIONS + b'"x", "n": 7}', "n"),
            ("/v1/embeddings", EMBEDDINGS + batch(4) + b"}", "input")):
        status, err, _ = await raw(p, body, path=path)
        assert (status, err["error"]["param"]) == (400, param), err
    for path, body in (("/v1/completions", COMPLETIONS + batch(3) + b', "n": 2}'),
                       ("/v1/embeddings", EMBEDDINGS + batch(3) + b"}")):
        status, answer, _ = await raw(p, body, path=path)
        assert status == 200, answer
    assert await served(p.nodes[0]) == before + 2


async def test_the_reservation_counts_n_without_max_tokens(platform: Platform) -> None:
    """n outputs of up to DEFAULT_RESERVED_TOKENS each, even when max_tokens is not given: a
    key with 3,000 tokens a minute may ask for one such output, not four."""
    p = platform
    await p.start_gateway(default_reserved_tokens=1000)
    await p.add_node()
    await p.routable(1)
    key = await p.catalog.create_api_key(p.environment_id, limits=Quota(tokens_per_minute=3000))
    before = await served(p.nodes[0])
    async with p.client(key.plaintext) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model=MODEL, messages=HELLO, n=4)
        one = await client.chat.completions.create(model=MODEL, messages=HELLO, n=1)
    assert one.usage is not None and len(one.choices) == 1
    assert await served(p.nodes[0]) == before + 1  # the refused one never left


async def test_the_prefix_cache_is_salted_with_the_tenant(ready: Platform) -> None:
    """Tenant B sends tenant A's prompt, even naming A's id as its salt: nothing of A's
    cached prefix is shared. The node stored A's blocks under A's id."""
    p = ready
    node = p.nodes[0]
    other_tenant = await p.catalog.create_tenant("Globex")
    other_env = await p.catalog.create_environment(other_tenant, "production", "us-east-1")
    other_key = await p.catalog.create_api_key(other_env)
    prompt = [{"role": "user", "content": " ".join(f"secret{i}" for i in range(120))}]

    async def hits() -> float:
        return (await node_metrics(node))["vllm:prefix_cache_hits_total"]

    async def ask(key: str, salt: str | None = None) -> float:
        async with p.client(key) as client:
            await client.chat.completions.create(
                model=MODEL, messages=prompt, max_tokens=1,  # type: ignore[arg-type]
                extra_body={"cache_salt": salt} if salt is not None else None)
        return await hits()

    assert await ask(p.key.plaintext) == 0
    warm = await ask(p.key.plaintext, salt="anything-the-client-says")
    assert warm >= 112  # A again: its own cached blocks, whatever salt it sent
    assert await ask(other_key.plaintext, salt=str(p.tenant_id)) == warm  # B: none of A's
    assert await ask(other_key.plaintext) > warm  # B's second time: B's own blocks
    # Straight to the node, salted with A's id: A's blocks are there, under A's id.
    before = await hits()
    body = {"model": MODEL, "messages": prompt, "max_tokens": 1, "cache_salt": str(p.tenant_id)}
    assert (await node_post(node, body, node.api_key))[0] == 200
    assert await hits() >= before + 112
