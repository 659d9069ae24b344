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

from tests.helpers import eventually
from tests.integration import gateway_fixtures
from tests.integration.gateway_fixtures import (  # noqa: F401 - fixtures
    MODEL,
    Node,
    Platform,
    platform,
    usage_events,
)

ready = gateway_fixtures.ready

HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]






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
