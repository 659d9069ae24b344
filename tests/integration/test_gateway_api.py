"""The gateway as tenants see it: the real openai SDK through the gateway to simulated nodes."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from schemas.events import Quota, UsageRecorded, decode_event
from schemas.ids import uuid7
from services.core.node_keys import node_api_key
from tests.helpers import eventually
from tests.integration.gateway_fixtures import MODEL, Node, Platform, platform  # noqa: F401

HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]


@pytest.fixture
async def ready(platform: Platform) -> Platform:  # noqa: F811
    await platform.start_gateway()
    await platform.add_node()
    await platform.routable(1)
    return platform


async def usage_events(p: Platform, count: int) -> list[UsageRecorded]:
    async def enough() -> list[UsageRecorded] | None:
        info = await p.bus.js.stream_info("USAGE")
        if info.state.messages < count:
            return None
        return [decode_event((await p.bus.js.get_msg("USAGE", seq)).data or b"")  # type: ignore[misc]
                for seq in range(info.state.first_seq, info.state.last_seq + 1)]

    return await eventually(enough, what=f"{count} usage events")


async def direct(p: Platform, body: dict[str, Any]) -> dict[str, Any]:
    """The same request straight to the node (with its key): what vLLM itself answers."""
    async with aiohttp.ClientSession() as s, \
            s.post(f"{p.nodes[0].url}/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {p.nodes[0].api_key}"}) as r:
        return msgspec.json.decode(await r.read())  # type: ignore[no-any-return]


async def test_chat_completion_with_exact_usage_and_metering(ready: Platform) -> None:
    p = ready
    client = p.client()
    result = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12,
                                                  seed=3)
    expected = await direct(p, {"model": MODEL, "messages": HELLO, "max_tokens": 12, "seed": 3})
    assert result.id.startswith("chatcmpl-")
    assert result.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert result.usage is not None
    prompt = expected["usage"]["prompt_tokens"]
    assert (result.usage.prompt_tokens, result.usage.completion_tokens,
            result.usage.total_tokens) == (prompt, 12, prompt + 12)
    assert result.choices[0].finish_reason == "length"

    (usage,) = await usage_events(p, 1)
    assert (usage.tenant_id, usage.environment_id, usage.api_key_id) == (
        p.tenant_id, p.environment_id, p.key.key_id)
    assert usage.prompt_tokens == result.usage.prompt_tokens
    assert usage.completion_tokens == 12 and usage.status == 200 and not usage.streamed
    assert usage.model == MODEL and usage.endpoint == "chat" and usage.region == "us-east-1"
    assert str(usage.node_id) == p.nodes[0].node_id and usage.latency_ms > 0
    await client.close()


async def test_request_id_is_echoed_and_reaches_vllm(ready: Platform) -> None:
    async with aiohttp.ClientSession() as s, s.post(
            f"{ready.gateway_url}/v1/chat/completions",
            json={"model": MODEL, "messages": HELLO, "max_tokens": 2},
            headers={"Authorization": f"Bearer {ready.key.plaintext}",
                     "X-Request-ID": "trace-123"}) as r:
        body = await r.json()
        assert r.status == 200
        assert r.headers["X-Request-ID"] == "trace-123"
        assert r.headers["Strict-Transport-Security"].startswith("max-age=31536000")
        assert "x-ratelimit-remaining-requests" in r.headers
    assert body["id"] == "chatcmpl-trace-123"  # vLLM takes X-Request-Id for its id
    (usage,) = await usage_events(ready, 1)
    assert usage.request_id == "trace-123"


async def test_streaming_hides_usage_unless_asked(ready: Platform) -> None:
    client = ready.client()
    plain = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5,
                                                 stream=True)
    chunks = [c async for c in plain]
    assert all(c.usage is None for c in chunks)  # neither per chunk nor a final usage chunk
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"

    asked = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5,
                                                 stream=True,
                                                 stream_options={"include_usage": True})
    chunks = [c async for c in asked]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])

    usage = await usage_events(ready, 2)
    assert [u.completion_tokens for u in usage] == [5, 5] and all(u.streamed for u in usage)
    assert all(u.time_to_first_token_ms is not None for u in usage)
    await client.close()


async def test_completions_and_embeddings(ready: Platform) -> None:
    client = ready.client()
    text = await client.completions.create(model=MODEL, prompt="Once upon a time",
                                           max_tokens=7)
    assert text.usage is not None and text.usage.completion_tokens == 7
    emb = await client.embeddings.create(model=MODEL, input=["a b c", "d e"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384
    assert emb.usage.prompt_tokens > 0
    usage = await usage_events(ready, 2)
    assert [u.endpoint for u in usage] == ["completions", "embeddings"]
    assert usage[1].completion_tokens == 0 and usage[1].prompt_tokens == emb.usage.prompt_tokens
    await client.close()


async def test_the_sync_sdk(ready: Platform) -> None:
    def sync() -> tuple[str, int]:
        # The sync client blocks: it runs in a thread while this loop serves the gateway.
        with OpenAI(base_url=f"{ready.gateway_url}/v1", api_key=ready.key.plaintext,
                    max_retries=0) as c:
            whole = c.chat.completions.create(model=MODEL, messages=HELLO,  # type: ignore[arg-type]
                                              max_tokens=4)
            stream = c.chat.completions.create(model=MODEL, messages=HELLO,  # type: ignore[arg-type]
                                               max_tokens=4, stream=True)
            text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            assert whole.usage is not None
            return text, whole.usage.completion_tokens

    streamed, tokens = await asyncio.to_thread(sync)
    assert streamed and tokens == 4


async def test_models_lists_the_catalog(ready: Platform) -> None:
    client = ready.client()
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "crosslogic"
    await client.close()


# --------------------------------------------------------------------------- bad input


async def raw(p: Platform, body: bytes | None, *, headers: dict[str, str] | None = None,
              path: str = "/v1/chat/completions", key: str | None = None
              ) -> tuple[int, dict[str, Any], dict[str, str]]:
    h = {"Content-Type": "application/json",
         "Authorization": f"Bearer {key if key is not None else p.key.plaintext}"}
    h.update(headers or {})
    async with aiohttp.ClientSession() as s, \
            s.post(f"{p.gateway_url}{path}", data=body, headers=h) as r:
        return r.status, msgspec.json.decode(await r.read()), dict(r.headers)


@pytest.mark.parametrize(("body", "status", "type_", "param", "code"), [
    (b"{not json", 400, "invalid_request_error", None, None),
    (b"[1, 2]", 400, "invalid_request_error", None, None),
    (b"", 400, "invalid_request_error", None, None),
    (b'{"messages": []}', 400, "invalid_request_error", "model", None),
    (b'{"model": "gpt-unknown", "messages": []}', 404, "not_found_error", "model",
     "model_not_found"),
    (b'{"model": "' + MODEL.encode() + b'", "messages": [], "stream": "yes"}', 400,
     "invalid_request_error", "stream", None),
    (b'{"model": "' + MODEL.encode() + b'", "messages": [], "max_tokens": -1}', 400,
     "invalid_request_error", "max_tokens", None),
])
async def test_bad_bodies(ready: Platform, body: bytes, status: int, type_: str,
                          param: str | None, code: str | None) -> None:
    got, err, headers = await raw(ready, body)
    assert got == status
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert (err["error"]["type"], err["error"]["param"], err["error"]["code"]) == \
        (type_, param, code)
    assert err["error"]["message"]
    assert headers["X-Request-ID"]


async def test_upstream_validation_errors_pass_through(ready: Platform) -> None:
    body = msgspec.json.encode({"model": MODEL, "messages": HELLO, "temperature": -1})
    status, err, _ = await raw(ready, body)
    assert status == 400 and err["error"]["type"] == "BadRequestError"  # vLLM's own words
    assert "temperature must be non-negative" in err["error"]["message"]


async def test_wrong_content_type_and_oversized_body(ready: Platform) -> None:
    status, err, _ = await raw(ready, b"model=x", headers={"Content-Type": "text/plain"})
    assert (status, err["error"]["code"]) == (415, "unsupported_media_type")
    big = b'{"model": "' + MODEL.encode() + b'", "prompt": "' + b"a" * (11 * 1024 * 1024) + b'"}'
    status, err, _ = await raw(ready, big, path="/v1/completions")
    assert (status, err["error"]["code"]) == (413, "request_too_large")


@pytest.mark.parametrize(("auth", "status", "code"), [
    (None, 401, "invalid_api_key"),
    ("Basic abc", 401, "invalid_api_key"),
    ("Bearer sk-not-ours", 401, "invalid_api_key"),
    ("Bearer clsk_live_" + "x" * 40, 401, "invalid_api_key"),
])
async def test_missing_or_invalid_keys(ready: Platform, auth: str | None, status: int,
                                       code: str) -> None:
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = auth
    async with aiohttp.ClientSession() as s, s.post(
            f"{ready.gateway_url}/v1/chat/completions", data=b"{}", headers=headers) as r:
        err = await r.json()
        assert r.status == status
    assert err["error"]["type"] == "authentication_error" and err["error"]["code"] == code


async def test_expired_revoked_key_and_suspended_tenant(ready: Platform) -> None:
    p = ready
    expired = await p.catalog.create_api_key(p.environment_id, expires_at=datetime.now(UTC)
                                             - timedelta(seconds=1))
    with pytest.raises(openai.AuthenticationError, match="expired"):
        await p.client(expired.plaintext).models.list()

    doomed = await p.catalog.create_api_key(p.environment_id)
    await p.client(doomed.plaintext).models.list()  # works, and is now cached
    await p.catalog.revoke_api_key(doomed.key_id)

    async def refused() -> bool:
        try:
            await p.client(doomed.plaintext).models.list()
        except openai.AuthenticationError as exc:
            return "revoked" in str(exc)
        return False

    revoked_at = time.monotonic()
    await eventually(refused, timeout=1, what="revocation within 1 s")
    assert time.monotonic() - revoked_at < 1.0

    await p.catalog.suspend_tenant(p.tenant_id, "unpaid")

    async def suspended() -> bool:
        try:
            await p.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
        except openai.PermissionDeniedError as exc:
            return "suspended" in str(exc)
        return False

    suspended_at = time.monotonic()
    await eventually(suspended, timeout=1, what="suspension within 1 s")
    assert time.monotonic() - suspended_at < 1.0


# --------------------------------------------------------------------------- gateway ↔ node


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


async def test_a_node_refusing_the_gateways_key_is_passed_over(platform: Platform) -> None:  # noqa: F811
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
async def test_out_of_bounds_requests_never_reach_a_node(ready: Platform, extra: dict[str, Any],
                                                        param: str) -> None:
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


async def test_the_reservation_counts_n_without_max_tokens(platform: Platform) -> None:  # noqa: F811
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
