"""API key roles on the public API, and tenant self-service (real gateway, PostgreSQL, Redis,
NATS, a simulated node): every role against every route; an admin key manages its own
tenant's keys and environments and never another's, never above its environment's quota."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import openai
import pytest

from services.domain.catalog import NewApiKey
from tests.helpers import eventually
from tests.integration.gateway_fixtures import MODEL, Platform, platform  # noqa: F401
from tests.redteam.test_gateway_and_nodes import node_metrics

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class Caller:
    def __init__(self, p: Platform, key: str) -> None:
        self.p, self.key = p, key

    async def call(self, method: str, path: str, body: Any = None,
                   key: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        async with aiohttp.ClientSession() as s, s.request(
                method, self.p.gateway_url + path, json=body, headers=headers) as r:
            return r.status, await r.json(content_type=None)


async def keys(p: Platform) -> dict[str, NewApiKey]:
    return {role: await p.catalog.create_api_key(p.environment_id, name=role, role=role)
            for role in ("readonly", "developer", "admin")}


# (method, path, body, what it needs): every route of the public API. `{key}` is a key of the
# caller's own tenant, made afresh for each call (revoking or rotating spends it); likewise
# `{response}`, a stored response of the caller's tenant.
ROUTES: list[tuple[str, str, Any, str]] = [
    ("GET", "/v1/models", None, "read"),
    ("GET", "/v1/usage", None, "read"),
    ("GET", "/v1/budgets", None, "read"),
    ("POST", "/v1/chat/completions", CHAT, "infer"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}, "infer"),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "hi"}, "infer"),
    ("POST", "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 2}, "infer"),
    ("GET", "/v1/responses/{response}", None, "read"),
    ("DELETE", "/v1/responses/{response}", None, "infer"),
    ("POST", "/v1/rerank", {"model": MODEL, "query": "hi", "documents": ["a", "b"]}, "infer"),
    ("POST", "/v1/score", {"model": MODEL, "text_1": "hi", "text_2": "ho"}, "infer"),
    ("POST", "/tokenize", {"model": MODEL, "prompt": "hi"}, "infer"),
    ("POST", "/detokenize", {"model": MODEL, "tokens": [1, 2]}, "infer"),
    ("GET", "/v1/api_keys", None, "manage"),
    ("POST", "/v1/api_keys", {"name": "made"}, "manage"),
    ("GET", "/v1/api_keys/{key}", None, "manage"),
    ("DELETE", "/v1/api_keys/{key}", None, "manage"),
    ("POST", "/v1/api_keys/{key}/rotate", {}, "manage"),
    ("GET", "/v1/environments", None, "manage"),
    ("POST", "/v1/environments", {"name": "env-{n}", "region": "us-east-1"}, "manage"),
]
NODE_ROUTES = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
               ("POST", "/v1/embeddings"), ("POST", "/v1/responses"),
               ("GET", "/v1/responses/{response}"), ("POST", "/v1/rerank"),
               ("POST", "/v1/score")}
"""The routes a node's vLLM serves under /v1 (its `http_requests_total` counts them)."""
MAY = {"readonly": {"read"}, "developer": {"read", "infer"},
       "admin": {"read", "infer", "manage"}}


async def test_every_role_against_every_route(platform: Platform) -> None:  # noqa: F811
    p = platform
    await p.start_gateway()
    await p.add_node()
    await p.routable(1)
    made = await keys(p)
    reached = 0  # what the nodes should have taken in
    for n, (role, key) in enumerate(made.items()):
        caller = Caller(p, key.plaintext)
        for method, path, body, needs in ROUTES:
            target = await p.catalog.create_api_key(p.environment_id, name="target")
            url = path.replace("{key}", str(target.key_id))
            if "{response}" in url:
                _, stored = await Caller(p, p.key.plaintext).call(
                    "POST", "/v1/responses", {"model": MODEL, "input": "x",
                                              "max_output_tokens": 1})
                url = url.replace("{response}", stored["id"])
                reached += 1
            if isinstance(body, dict) and "name" in body:
                body = {**body, "name": body["name"].replace("{n}", str(n))}
            status, answer = await caller.call(method, url, body)
            if needs in MAY[role]:
                assert status in (200, 201), (role, method, path, status, answer)
                reached += (method, path) in NODE_ROUTES
            else:
                assert status == 403, (role, method, path, status, answer)
                assert answer["error"]["type"] == "permission_error"
                assert answer["error"]["code"] == "insufficient_permissions"
                assert f"'{role}' role" in answer["error"]["message"]
                assert set(answer["error"]) == {"message", "type", "param", "code"}
    # The SDK sees a refusal as what it is.
    with pytest.raises(openai.PermissionDeniedError):
        await p.client(made["readonly"].plaintext).chat.completions.create(**CHAT)
    # A refused request never reached the node: only the allowed ones did, and the readonly
    # key's SDK call did not.
    assert reached == 2 * 6 + 3 + 3 * 2
    assert await inference_served(p) == reached


async def inference_served(p: Platform) -> float:
    """Inference requests the nodes' vLLM took in (past its key check)."""
    total = 0.0
    for node in p.nodes:
        metrics = await node_metrics(node)
        total += sum(v for k, v in metrics.items()
                     if k.startswith("http_requests_total|") and "|handler=/v1/" in k)
    return total


async def test_an_admin_key_manages_its_own_tenant(platform: Platform) -> None:  # noqa: F811
    p = platform
    await p.start_gateway()
    admin = Caller(p, (await keys(p))["admin"].plaintext)

    # Create: the plaintext once, in the caller's environment by default; it works at once.
    status, created = await admin.call("POST", "/v1/api_keys",
                                       {"name": "ci", "role": "readonly"})
    assert status == 201 and created["key"].startswith("clsk_")
    assert created["environment_id"] == str(p.environment_id)
    assert (created["role"], created["name"], created["status"]) == ("readonly", "ci", "active")
    assert (await Caller(p, created["key"]).call("GET", "/v1/models"))[0] == 200
    # Listed masked, never with a plaintext or a hash.
    status, listed = await admin.call("GET", "/v1/api_keys")
    assert status == 200 and created["id"] in {k["id"] for k in listed["data"]}
    assert all("key" not in k and "key_hash" not in k for k in listed["data"])
    # The event says who did it.
    actor = await p.pool.fetchval(
        "SELECT metadata->>'actor' FROM events WHERE type = 'apikey.created' "
        "AND data->>'key_id' = $1", created["id"])
    assert actor.startswith("api-key:")

    # Rotate: the old key stops, the new one works.
    status, rotated = await admin.call("POST", f"/v1/api_keys/{created['id']}/rotate", {})
    assert status == 201 and rotated["id"] != created["id"] and rotated["role"] == "readonly"
    old, new = Caller(p, created["key"]), Caller(p, rotated["key"])

    async def old_refused() -> bool:
        return (await old.call("GET", "/v1/models"))[0] == 401

    await eventually(old_refused, timeout=15, what="the rotated key refused")
    assert (await new.call("GET", "/v1/models"))[0] == 200
    # Revoke: idempotent, and the key stops.
    for _ in range(2):
        status, revoked = await admin.call("DELETE", f"/v1/api_keys/{rotated['id']}")
        assert status == 200 and revoked["status"] == "revoked"

    async def new_refused() -> bool:
        return (await new.call("GET", "/v1/models"))[0] == 401

    await eventually(new_refused, timeout=15, what="the revoked key refused")
    # Rotating a revoked key is a conflict, in OpenAI's shape.
    status, answer = await admin.call("POST", f"/v1/api_keys/{rotated['id']}/rotate", {})
    assert status == 409 and answer["error"]["type"] == "conflict_error"

    # Environments: made within the caller's, listed, and a key made in one.
    status, env = await admin.call("POST", "/v1/environments",
                                   {"name": "staging", "region": "eu-west-1"})
    assert status == 201 and env["tenant_id"] == str(p.tenant_id)
    status, envs = await admin.call("GET", "/v1/environments")
    assert {e["name"] for e in envs["data"]} >= {"staging"}
    status, there = await admin.call("POST", "/v1/api_keys",
                                     {"name": "staging-ci", "environment_id": env["id"]})
    assert status == 201 and there["environment_id"] == env["id"]
    # A name taken: conflict. Bad input: 400 naming the field, nothing made.
    assert (await admin.call("POST", "/v1/environments",
                             {"name": "staging", "region": "eu-west-1"}))[0] == 409
    status, answer = await admin.call("POST", "/v1/api_keys", {"role": "owner"})
    assert status == 400 and answer["error"]["param"] == "role"
    status, answer = await admin.call("POST", "/v1/api_keys", {"name": "x", "secret": 1})
    assert status == 400 and answer["error"]["param"] == "secret"
    status, answer = await admin.call("POST", "/v1/api_keys",
                                      {"expires_at": "2000-01-01T00:00:00Z"})
    assert status == 400 and answer["error"]["param"] == "expires_at"
    status, answer = await admin.call("GET", "/v1/api_keys/not-a-uuid")
    assert status == 400 and answer["error"]["param"] == "key_id"


async def test_an_admin_key_never_touches_another_tenant(platform: Platform) -> None:  # noqa: F811
    p = platform
    await p.start_gateway()
    admin = Caller(p, (await keys(p))["admin"].plaintext)
    other_tenant = await p.catalog.create_tenant("Other", "ops@other.test")
    other_env = await p.catalog.create_environment(other_tenant, "production", "us-east-1")
    victim = await p.catalog.create_api_key(other_env, name="victim", role="admin")
    before = await p.pool.fetchval("SELECT count(*) FROM events")

    for method, path, body in [
            ("GET", f"/v1/api_keys/{victim.key_id}", None),
            ("DELETE", f"/v1/api_keys/{victim.key_id}", None),
            ("POST", f"/v1/api_keys/{victim.key_id}/rotate", {}),
            ("POST", "/v1/api_keys", {"environment_id": str(other_env)}),
            ("GET", f"/v1/api_keys?environment_id={other_env}", None)]:
        status, answer = await admin.call(method, path, body)
        # Exactly as for an id that does not exist: nothing says the other tenant's is there.
        assert status == 404, (method, path, answer)
        assert answer["error"]["type"] == "not_found_error"
        assert "in your organization" in answer["error"]["message"]
    status, missing = await admin.call("GET", f"/v1/api_keys/{uuid.uuid4()}")
    assert status == 404 and missing["error"]["code"] == "api_key_not_found"
    # Lists hold the caller's tenant only.
    status, listed = await admin.call("GET", "/v1/api_keys")
    assert status == 200 and {k["tenant_id"] for k in listed["data"]} == {str(p.tenant_id)}
    status, envs = await admin.call("GET", "/v1/environments")
    assert {e["tenant_id"] for e in envs["data"]} == {str(p.tenant_id)}
    # Nothing was written, and the victim's key still works.
    assert await p.pool.fetchval("SELECT count(*) FROM events") == before
    assert (await Caller(p, victim.plaintext).call("GET", "/v1/models"))[0] == 200


async def test_nothing_above_the_environment_s_quota(platform: Platform) -> None:  # noqa: F811
    p = platform
    await p.catalog.update_environment(p.environment_id, quota={
        "requests_per_minute": 100, "tokens_per_day": 50_000})
    await p.start_gateway()
    admin = Caller(p, (await keys(p))["admin"].plaintext)

    status, answer = await admin.call("POST", "/v1/api_keys",
                                      {"limits": {"requests_per_minute": 101}})
    assert status == 403 and answer["error"]["param"] == "limits.requests_per_minute"
    assert answer["error"]["code"] == "quota_exceeded"
    status, answer = await admin.call("POST", "/v1/environments", {
        "name": "big", "region": "us-east-1", "quota": {"tokens_per_day": 50_001}})
    assert status == 403 and answer["error"]["param"] == "quota.tokens_per_day"
    assert await p.pool.fetchval("SELECT count(*) FROM environments WHERE name = 'big'") == 0

    # At or under the quota: made. A new environment's unset limits are the caller's.
    status, key = await admin.call("POST", "/v1/api_keys", {
        "limits": {"requests_per_minute": 100, "concurrency": 5}})
    assert status == 201 and key["limits"]["requests_per_minute"] == 100
    status, env = await admin.call("POST", "/v1/environments", {
        "name": "small", "region": "us-east-1", "quota": {"requests_per_minute": 10}})
    assert status == 201
    assert env["quota"] == {"requests_per_minute": 10, "tokens_per_minute": None,
                            "tokens_per_day": 50_000}


async def test_admin_keys_cannot_multiply_keys_without_end(platform: Platform) -> None:  # noqa: F811
    """Each key made has its own budget of calls: a ceiling per tenant keeps admin keys from
    making admin keys for ever (SELF_SERVICE_MAX_KEYS, _ENVIRONMENTS)."""
    p = platform
    made = await keys(p)  # with the platform's own key: 4 active
    await p.start_gateway(self_service_max_keys=5, self_service_max_environments=2)
    admin = Caller(p, made["admin"].plaintext)
    status, fifth = await admin.call("POST", "/v1/api_keys", {"name": "fifth"})
    assert status == 201
    status, answer = await admin.call("POST", "/v1/api_keys", {"name": "sixth"})
    assert status == 403 and answer["error"]["code"] == "tenant_limit_reached"
    assert "5 active API keys" in answer["error"]["message"]
    assert await p.pool.fetchval("SELECT count(*) FROM api_keys WHERE name = 'sixth'") == 0
    # At the ceiling a rotation still works (one revoked, one made), and a revocation makes
    # room.
    status, rotated = await admin.call("POST", f"/v1/api_keys/{fifth['id']}/rotate", {})
    assert status == 201
    assert (await admin.call("DELETE", f"/v1/api_keys/{rotated['id']}"))[0] == 200
    assert (await admin.call("POST", "/v1/api_keys", {"name": "sixth"}))[0] == 201
    # Environments likewise.
    assert (await admin.call("POST", "/v1/environments",
                             {"name": "second", "region": "us-east-1"}))[0] == 201
    status, answer = await admin.call("POST", "/v1/environments",
                                      {"name": "third", "region": "us-east-1"})
    assert status == 403 and answer["error"]["code"] == "tenant_limit_reached"
