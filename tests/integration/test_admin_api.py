"""The admin API over real HTTP, against real PostgreSQL and NATS: every route's happy path,
bad input, the token, unknown ids, conflicts, read-your-writes and tenant isolation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from schemas.events import TenantUpdated
from services.admin.app import create_admin_app
from services.admin.routes import all_routes
from services.admin.settings import AdminSettings
from services.domain.catalog import Catalog, hash_api_key
from services.infra.eventlog import EventLog
from services.infra.natsauth.identities import Role
from services.infra.settings import Secret
from tests.conftest import Servers
from tests.helpers import eventually

TOKEN = "admin-test-token-6f1c2b9e8d7a4c3b"


@dataclass
class Admin:
    server: TestServer
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def call(self, method: str, path: str, body: Any = None, *,
                   token: str | None = TOKEN, raw: bytes | None = None,
                   content_type: str | None = None,
                   params: Any = None) -> tuple[int, Any]:
        headers = {}
        if token is not None:
            headers["X-Admin-Token"] = token
        data: bytes | None = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = content_type or "application/json"
        async with self.session.request(method, self.server.make_url(f"/admin/v1{path}"),
                                        data=data, headers=headers, params=params) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else None)

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200,
                 **kwargs: Any) -> Any:
        got, answer = await self.call(method, path, body, **kwargs)
        assert got == status, (got, answer)
        return answer


@contextlib.asynccontextmanager
async def running_admin(database_url: str, nats_url: str, redis_url: str, *, creds: str,
                        **overrides: Any) -> AsyncIterator[Admin]:
    """The admin API; `creds`: its NATS identity (`servers.creds(Role.ADMIN_API)`)."""
    settings = AdminSettings(database_url=Secret(database_url), nats_url=Secret(nats_url),
                             nats_creds=Secret(creds),
                             redis_url=Secret(redis_url),
                             admin_token=Secret(TOKEN), db_min_connections=1,
                             event_poll_interval=0.5, **overrides)
    server = TestServer(create_admin_app(settings), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Admin(server, session)
    finally:
        await server.close()


@pytest.fixture
async def admin(servers: Servers, database_url: str, nats_url: str,
                redis_url: str) -> AsyncIterator[Admin]:
    async with running_admin(database_url, nats_url, redis_url,
                             creds=servers.creds(Role.ADMIN_API)) as running:
        yield running


def assert_error(answer: Any, type_: str, param: str | None = None) -> str:
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param",
                                                                  "code"}
    assert answer["error"]["type"] == type_, answer
    if param is not None:
        assert answer["error"]["param"] == param, answer
    message: str = answer["error"]["message"]
    return message


async def seed(admin: Admin, name: str = "Acme") -> tuple[dict[str, Any], dict[str, Any],
                                                         dict[str, Any]]:
    tenant = await admin.ok("POST", "/tenants", {"name": name}, 201)
    env = await admin.ok("POST", f"/tenants/{tenant['id']}/environments",
                         {"name": "production", "region": "us-east-1"}, 201)
    key = await admin.ok("POST", f"/environments/{env['id']}/keys", {"name": "ci"}, 201)
    return tenant, env, key


# --------------------------------------------------------------------------- tenants


async def test_tenants(admin: Admin, pool: asyncpg.Pool) -> None:
    created = await admin.ok("POST", "/tenants", {"name": "Acme", "email": "ops@acme.test"},
                             201)
    assert set(created) == {"id", "name", "email", "status", "status_reason",
                            "stripe_customer_id", "created_at", "updated_at"}
    assert (created["name"], created["email"], created["status"]) == \
        ("Acme", "ops@acme.test", "active")
    assert created["stripe_customer_id"] is None  # until `billing link`
    assert created["created_at"].endswith("Z")
    # Read-your-writes: the command updated the projection in its own transaction.
    assert await admin.ok("GET", f"/tenants/{created['id']}") == created

    renamed = await admin.ok("PATCH", f"/tenants/{created['id']}", {"name": "Acme Corp"})
    assert (renamed["name"], renamed["email"]) == ("Acme Corp", "ops@acme.test")
    assert await admin.ok("PATCH", f"/tenants/{created['id']}", {}) == renamed  # no change

    suspended = await admin.ok("POST", f"/tenants/{created['id']}/suspend", {"reason": "unpaid"})
    assert (suspended["status"], suspended["status_reason"]) == ("suspended", "unpaid")
    active = await admin.ok("POST", f"/tenants/{created['id']}/reactivate")  # no body at all
    assert active["status"] == "active"

    rows = await pool.fetch("SELECT type, metadata FROM events ORDER BY position")
    assert [r["type"] for r in rows] == ["tenant.created", "tenant.updated", "tenant.suspended",
                                         "tenant.reactivated"]
    assert all(r["metadata"]["actor"] == "admin-api" and r["metadata"]["correlation_id"]
               for r in rows)


async def test_tenant_list_pages_in_id_order(admin: Admin) -> None:
    ids = [(await admin.ok("POST", "/tenants", {"name": f"t{i}"}, 201))["id"] for i in range(5)]
    first = await admin.ok("GET", "/tenants", params={"limit": "2"})
    assert [t["id"] for t in first["data"]] == ids[:2] and first["next_cursor"]
    second = await admin.ok("GET", "/tenants", params={"limit": "2",
                                                       "cursor": first["next_cursor"]})
    third = await admin.ok("GET", "/tenants", params={"limit": "2",
                                                      "cursor": second["next_cursor"]})
    assert [t["id"] for t in second["data"] + third["data"]] == ids[2:]
    assert third["next_cursor"] is None
    everything = await admin.ok("GET", "/tenants")
    assert [t["id"] for t in everything["data"]] == ids and everything["next_cursor"] is None
    for params, param in (({"limit": "0"}, "limit"), ({"limit": "201"}, "limit"),
                          ({"limit": "x"}, "limit"), ({"cursor": "!!"}, "cursor"),
                          ({"sort": "name"}, "sort")):
        status, answer = await admin.call("GET", "/tenants", params=params)
        assert status == 400
        assert_error(answer, "invalid_request_error", param)


# --------------------------------------------------------------------------- environments


async def test_environments(admin: Admin, pool: asyncpg.Pool) -> None:
    tenant = await admin.ok("POST", "/tenants", {"name": "Acme"}, 201)
    env = await admin.ok("POST", f"/tenants/{tenant['id']}/environments",
                         {"name": "production", "region": "us-east-1",
                          "quota": {"requests_per_minute": 600, "tokens_per_minute": 10_000,
                                    "tokens_per_day": 1_000_000}}, 201)
    assert env["tenant_id"] == tenant["id"] and env["status"] == "active"
    assert env["quota"] == {"requests_per_minute": 600, "tokens_per_minute": 10_000,
                            "tokens_per_day": 1_000_000}
    assert await admin.ok("GET", f"/environments/{env['id']}") == env
    other = await admin.ok("POST", f"/tenants/{tenant['id']}/environments",
                           {"name": "staging", "region": "eu-west-1"}, 201)
    assert other["quota"] == {"requests_per_minute": None, "tokens_per_minute": None,
                              "tokens_per_day": None}
    listed = await admin.ok("GET", f"/tenants/{tenant['id']}/environments")
    assert [e["id"] for e in listed["data"]] == [env["id"], other["id"]]

    # A quota change merges: given fields are set, null clears one, the rest stay.
    changed = await admin.ok("PATCH", f"/environments/{env['id']}",
                             {"quota": {"requests_per_minute": 1200, "tokens_per_minute": None},
                              "status": "suspended", "name": "prod"})
    assert changed["quota"] == {"requests_per_minute": 1200, "tokens_per_minute": None,
                                "tokens_per_day": 1_000_000}
    assert (changed["status"], changed["name"], changed["region"]) == \
        ("suspended", "prod", "us-east-1")
    assert await pool.fetchval(
        "SELECT count(*) FROM events WHERE type = 'environment.updated'") == 1

    status, answer = await admin.call("PATCH", f"/environments/{env['id']}",
                                      {"status": "deleted"})
    assert status == 400
    assert_error(answer, "invalid_request_error", "status")


# --------------------------------------------------------------------------- keys


async def test_keys(admin: Admin, pool: asyncpg.Pool) -> None:
    tenant, env, _ = await seed(admin)
    expires = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    created = await admin.ok("POST", f"/environments/{env['id']}/keys",
                             {"name": "batch", "role": "readonly", "expires_at": expires,
                              "limits": {"requests_per_minute": 60, "concurrency": 2}}, 201)
    plaintext = created.pop("key")
    assert plaintext.startswith("clsk_live_") and created["last_four"] == plaintext[-4:]
    assert set(created) == {"id", "tenant_id", "environment_id", "name", "last_four", "role",
                            "status", "limits", "expires_at", "created_at", "revoked_at"}
    assert created["limits"] == {"requests_per_minute": 60, "tokens_per_minute": None,
                                 "tokens_per_day": None, "concurrency": 2}
    assert (created["tenant_id"], created["environment_id"], created["role"]) == \
        (tenant["id"], env["id"], "readonly")
    assert await pool.fetchval("SELECT key_hash FROM api_keys WHERE id = $1",
                               uuid.UUID(created["id"])) == hash_api_key(plaintext)

    # Masked from now on: never the key, never its hash.
    got = await admin.ok("GET", f"/keys/{created['id']}")
    assert got == created
    for path in (f"/tenants/{tenant['id']}/keys", f"/environments/{env['id']}/keys",
                 f"/keys/{created['id']}"):
        text = json.dumps(await admin.ok("GET", path))
        assert plaintext not in text and hash_api_key(plaintext) not in text
        assert "key_hash" not in text and '"key"' not in text

    patched = await admin.ok("PATCH", f"/keys/{created['id']}",
                             {"limits": {"tokens_per_day": 5000, "concurrency": None},
                              "role": "developer"})
    assert patched["limits"] == {"requests_per_minute": 60, "tokens_per_minute": None,
                                 "tokens_per_day": 5000, "concurrency": None}
    assert patched["role"] == "developer" and patched["name"] == "batch"

    rotated = await admin.ok("POST", f"/keys/{created['id']}/rotate", None, 201)
    new_plaintext = rotated.pop("key")
    assert new_plaintext != plaintext and rotated["id"] != created["id"]
    assert (rotated["name"], rotated["role"], rotated["limits"], rotated["environment_id"],
            rotated["expires_at"]) == (patched["name"], patched["role"], patched["limits"],
                                       env["id"], patched["expires_at"])
    old = await admin.ok("GET", f"/keys/{created['id']}")
    assert old["status"] == "revoked" and old["revoked_at"]

    revoked = await admin.ok("POST", f"/keys/{rotated['id']}/revoke", {"reason": "leaked"})
    assert revoked["status"] == "revoked"
    again = await admin.ok("POST", f"/keys/{rotated['id']}/revoke")  # idempotent
    assert again == revoked
    assert await pool.fetchval("SELECT count(*) FROM events WHERE type = 'apikey.revoked' "
                               "AND stream = $1", f"apikey:{rotated['id']}") == 1
    for method, path, body in (("POST", f"/keys/{rotated['id']}/rotate", None),
                               ("PATCH", f"/keys/{rotated['id']}", {"name": "x"})):
        status, answer = await admin.call(method, path, body)
        assert status == 409
        assert "revoked" in assert_error(answer, "conflict_error")
    # Neither plaintext was ever written to the log.
    log_text = str(await pool.fetch("SELECT data FROM events"))
    assert plaintext not in log_text and new_plaintext not in log_text

    status, answer = await admin.call("POST", f"/environments/{env['id']}/keys",
                                      {"expires_at": "2001-01-01T00:00:00Z"})
    assert status == 400
    assert_error(answer, "invalid_request_error", "expires_at")
    status, answer = await admin.call("POST", f"/environments/{env['id']}/keys",
                                      {"expires_at": "2999-01-01T00:00:00"})  # no zone
    assert status == 400
    assert_error(answer, "invalid_request_error", "expires_at")


async def test_key_listings_never_cross_tenants(admin: Admin) -> None:
    tenant_a, env_a, key_a = await seed(admin, "A")
    tenant_b, env_b, key_b = await seed(admin, "B")
    extra_a = await admin.ok("POST", f"/environments/{env_a['id']}/keys", {}, 201)
    for path, mine, theirs in (
            (f"/tenants/{tenant_a['id']}/keys", {key_a["id"], extra_a["id"]}, key_b["id"]),
            (f"/environments/{env_a['id']}/keys", {key_a["id"], extra_a["id"]}, key_b["id"]),
            (f"/tenants/{tenant_b['id']}/keys", {key_b["id"]}, key_a["id"]),
            (f"/environments/{env_b['id']}/keys", {key_b["id"]}, key_a["id"])):
        listed = await admin.ok("GET", path)
        ids = {k["id"] for k in listed["data"]}
        assert ids == mine and theirs not in ids
    page = await admin.ok("GET", f"/tenants/{tenant_a['id']}/keys", params={"limit": "1"})
    rest = await admin.ok("GET", f"/tenants/{tenant_a['id']}/keys",
                          params={"cursor": page["next_cursor"]})
    assert {k["id"] for k in page["data"] + rest["data"]} == {key_a["id"], extra_a["id"]}


# --------------------------------------------------------------------------- models


async def test_models(admin: Admin) -> None:
    body = {"name": "llama-8b", "family": "llama", "vram_gb": 16,
            "input_price_per_million": "0.15", "output_price_per_million": 0.6,
            "context_length": 8192}
    model = await admin.ok("POST", "/models", body, 201)
    assert (model["input_price_per_million"], model["output_price_per_million"]) == \
        ("0.15", "0.6")
    assert model["status"] == "active"
    assert await admin.ok("GET", f"/models/{model['id']}") == model
    status, answer = await admin.call("POST", "/models", body)
    assert status == 409
    assert "already exists" in assert_error(answer, "conflict_error")

    patched = await admin.ok("PATCH", f"/models/{model['id']}",
                             {"output_price_per_million": "100", "status": "suspended"})
    assert (patched["output_price_per_million"], patched["input_price_per_million"],
            patched["status"]) == ("100", "0.15", "suspended")
    listed = await admin.ok("GET", "/models")
    assert [m["id"] for m in listed["data"]] == [model["id"]]

    for price in ("0.1234567", -1, "NaN", "Infinity", "1e15", "abc"):
        status, answer = await admin.call("POST", "/models",
                                          {**body, "name": "m2", "input_price_per_million": price})
        assert status == 400, (price, answer)
        assert_error(answer, "invalid_request_error", "input_price_per_million")
    status, answer = await admin.call("PATCH", f"/models/{model['id']}", {"name": "renamed"})
    assert status == 400
    assert_error(answer, "invalid_request_error", "name")


async def test_model_weights_source(admin: Admin) -> None:
    body = {"name": "acme/llama-8b", "family": "llama", "vram_gb": 16,
            "input_price_per_million": "0.1", "output_price_per_million": "0.2",
            "context_length": 8192}
    plain = await admin.ok("POST", "/models", body, 201)
    assert plain["weights_source"] is None  # the Hub repo of its name, as before
    model = await admin.ok("POST", "/models", {
        **body, "name": "acme/llama-r2", "weights_source": "r2://crosslogic-models/llama/v1/"},
        201)
    assert model["weights_source"] == "r2://crosslogic-models/llama/v1"  # canonical
    assert await admin.ok("GET", f"/models/{model['id']}") == model

    patched = await admin.ok("PATCH", f"/models/{model['id']}",
                             {"weights_source": "hf://meta-llama/Llama-3.1-8B-Instruct"})
    assert patched["weights_source"] == "hf://meta-llama/Llama-3.1-8B-Instruct"
    patched = await admin.ok("PATCH", f"/models/{model['id']}", {"vram_gb": 24})
    assert patched["weights_source"] == "hf://meta-llama/Llama-3.1-8B-Instruct"  # kept
    local = await admin.ok("PATCH", f"/models/{plain['id']}",
                           {"weights_source": "file:///srv/models/llama"})
    assert local["weights_source"] == "file:///srv/models/llama"

    for source in ("s3://bucket/x", "r2://Bad_Bucket/x", "r2://ab", "file:///srv/../etc",
                   "file://host/srv", "hf://gpt2", "r2://models/a b", "", "r2://models/"
                   + "a" * 1100, 42, ["hf://a/b"]):
        for method, path, sent in (("POST", "/models", {**body, "name": "m3",
                                                        "weights_source": source}),
                                   ("PATCH", f"/models/{model['id']}",
                                    {"weights_source": source})):
            status, answer = await admin.call(method, path, sent)
            assert status == 400, (method, source, answer)
            assert_error(answer, "invalid_request_error", "weights_source")
    status, answer = await admin.call("PATCH", f"/models/{model['id']}",
                                      {"weights_source": None})
    assert status == 400  # changed, not removed: hf://<org>/<repo> goes back to the Hub
    assert_error(answer, "invalid_request_error", "weights_source")
    assert (await admin.ok("GET", f"/models/{model['id']}"))["weights_source"] == \
        "hf://meta-llama/Llama-3.1-8B-Instruct"


# --------------------------------------------------------------------------- deployments


async def test_deployments(admin: Admin) -> None:
    model = await admin.ok("POST", "/models", {
        "name": "llama-8b", "family": "llama", "vram_gb": 16, "input_price_per_million": 0.1,
        "output_price_per_million": 0.2, "context_length": 8192}, 201)
    body = {"model": "llama-8b", "regions": ["us-east-1", "us-west-2"], "gpu_type": "A10G",
            "spot": True, "min_nodes": 1, "max_nodes": 4}
    by_name = await admin.ok("POST", "/deployments", body, 201)
    assert (by_name["model_id"], by_name["model_name"], by_name["regions"], by_name["spot"],
            by_name["allow_on_demand_fallback"], by_name["status"]) == \
        (model["id"], "llama-8b", ["us-east-1", "us-west-2"], True, True, "active")
    by_id = await admin.ok("POST", "/deployments",
                           {**body, "model": model["id"], "allow_on_demand_fallback": False},
                           201)
    assert by_id["model_name"] == "llama-8b" and by_id["allow_on_demand_fallback"] is False
    assert await admin.ok("GET", f"/deployments/{by_name['id']}") == by_name

    patched = await admin.ok("PATCH", f"/deployments/{by_name['id']}",
                             {"max_nodes": 8, "regions": ["eu-west-1"]})
    assert (patched["min_nodes"], patched["max_nodes"], patched["regions"]) == \
        (1, 8, ["eu-west-1"])
    # Bounds are checked as they will be after the change.
    status, answer = await admin.call("PATCH", f"/deployments/{by_name['id']}",
                                      {"min_nodes": 9})
    assert status == 400
    assert_error(answer, "invalid_request_error", "max_nodes")

    for change, param in (({"max_nodes": 0}, "max_nodes"), ({"regions": []}, "regions"),
                          ({"regions": ["a", "a"]}, "regions[1]"),
                          ({"min_nodes": -1}, "min_nodes"), ({"spot": "yes"}, "spot"),
                          ({"regions": ["bad region"]}, "regions[0]")):
        status, answer = await admin.call("POST", "/deployments", {**body, **change})
        assert status == 400, (change, answer)
        assert_error(answer, "invalid_request_error", param)
    status, answer = await admin.call("POST", "/deployments", {**body, "model": "nope"})
    assert status == 404
    assert_error(answer, "not_found_error", "model")

    async with admin.session.delete(admin.server.make_url(
            f"/admin/v1/deployments/{by_name['id']}"), headers={"X-Admin-Token": TOKEN}) as r:
        assert r.status == 204 and await r.read() == b""
    gone = await admin.ok("GET", f"/deployments/{by_name['id']}")
    assert gone["status"] == "deleted" and gone["deleted_at"]
    await admin.ok("DELETE", f"/deployments/{by_name['id']}", status=204)  # idempotent
    listed = await admin.ok("GET", "/deployments")
    assert [d["id"] for d in listed["data"]] == [by_id["id"]]
    status, answer = await admin.call("PATCH", f"/deployments/{by_name['id']}",
                                      {"max_nodes": 2})
    assert status == 409
    assert_error(answer, "conflict_error")


# --------------------------------------------------------------------------- every route


def _fill(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"{(\w+)}", lambda m: ids[m.group(1)], path)


async def _ids(admin: Admin) -> dict[str, str]:
    tenant, env, key = await seed(admin)
    model = await admin.ok("POST", "/models", {
        "name": "m", "family": "f", "vram_gb": 1, "input_price_per_million": 1,
        "output_price_per_million": 1, "context_length": 10}, 201)
    deployment = await admin.ok("POST", "/deployments", {
        "model": "m", "regions": ["r"], "gpu_type": "g", "spot": False, "min_nodes": 0,
        "max_nodes": 1}, 201)
    return {"tenant_id": tenant["id"], "environment_id": env["id"], "key_id": key["id"],
            "model_id": model["id"], "deployment_id": deployment["id"],
            "node_id": str(uuid.uuid4()), "subscription_id": str(uuid.uuid4()),
            "delivery_id": str(uuid.uuid4())}


MODEL = {"name": "m-new", "family": "f", "vram_gb": 1, "input_price_per_million": 1,
         "output_price_per_million": 1, "context_length": 10}
DEPLOYMENT = {"model": "m", "regions": ["r"], "gpu_type": "g", "spot": False, "min_nodes": 0,
              "max_nodes": 1}
LONG = "x" * 1001

# operation → (a valid body, (wrong type, param), (out of range, param))
BODIES: dict[str, tuple[dict[str, Any], tuple[dict[str, Any], str], tuple[dict[str, Any], str]]]
BODIES = {
    "create_tenant": ({"name": "t"}, ({"name": 5}, "name"), ({"name": ""}, "name")),
    "update_tenant": ({"name": "t2"}, ({"email": 1}, "email"), ({"name": "x" * 201}, "name")),
    "suspend_tenant": ({}, ({"reason": 1}, "reason"), ({"reason": LONG}, "reason")),
    "reactivate_tenant": ({}, ({"reason": []}, "reason"), ({"reason": LONG}, "reason")),
    "create_environment": (
        {"name": "e", "region": "r"},
        ({"name": "e", "region": "r", "quota": {"requests_per_minute": "1"}},
         "quota.requests_per_minute"),
        ({"name": "e", "region": "r", "quota": {"tokens_per_day": -1}}, "quota.tokens_per_day")),
    "update_environment": ({"name": "e2"}, ({"quota": []}, "quota"),
                           ({"quota": {"requests_per_minute": 2**31}},
                            "quota.requests_per_minute")),
    "create_key": ({}, ({"role": 1}, "role"), ({"limits": {"concurrency": -1}},
                                                "limits.concurrency")),
    "update_key": ({"name": "n"}, ({"expires_at": 5}, "expires_at"), ({"role": "root"}, "role")),
    "revoke_key": ({}, ({"reason": {}}, "reason"), ({"reason": LONG}, "reason")),
    "rotate_key": ({}, ({"reason": 1.5}, "reason"), ({"reason": LONG}, "reason")),
    "create_model": (MODEL, ({**MODEL, "vram_gb": "16"}, "vram_gb"),
                     ({**MODEL, "context_length": 0}, "context_length")),
    "update_model": ({"family": "g"}, ({"vram_gb": 1.5}, "vram_gb"), ({"vram_gb": 0}, "vram_gb")),
    "create_deployment": (DEPLOYMENT, ({**DEPLOYMENT, "regions": "r"}, "regions"),
                          ({**DEPLOYMENT, "max_nodes": 10_001}, "max_nodes")),
    "update_deployment": ({"max_nodes": 2}, ({"spot": "no"}, "spot"),
                          ({"min_nodes": -1}, "min_nodes")),
    "drain_node": ({}, ({"reason": 3}, "reason"),
                   ({"deadline_seconds": 0}, "deadline_seconds")),
    "terminate_node": ({}, ({"reason": 3}, "reason"), ({"reason": LONG}, "reason")),
    "settle_export": ({"identifier": "t:input_tokens:2026-12-01T10", "action": "mark_exported"},
                      ({"identifier": "x", "action": 5}, "action"),
                      ({"identifier": "", "action": "resend"}, "identifier")),
    "setup_billing": ({}, ({"switch": "yes"}, "switch"),
                      ({"switch_at": "2030-01-01T00:30:00"}, "switch_at")),
    **{f"set_{scope}_budget": ({"amount": "12.5", "period": "month"},
                               ({"amount": 12.5, "period": "month"}, "amount"),
                               ({"amount": "1000000", "period": "day"}, "amount"))
       for scope in ("tenant", "environment", "key")},
    "create_notification_subscription": (
        {"kind": "email", "target": "ops@acme.test", "event_types": ["node.*"]},
        ({"kind": "email", "target": 5, "event_types": ["node.*"]}, "target"),
        ({"kind": "email", "target": "ops@acme.test", "event_types": []}, "event_types")),
}


def test_every_route_with_a_body_has_bad_input_cases() -> None:
    assert {r.operation_id for r in all_routes() if r.body is not None} == set(BODIES)


async def test_bad_input_on_every_route(admin: Admin, pool: asyncpg.Pool) -> None:
    ids = await _ids(admin)
    events_before = await pool.fetchval("SELECT count(*) FROM events")
    for route in all_routes():
        path = _fill(route.path, ids)
        if route.body is None:
            if route.query:
                status, answer = await admin.call(route.method, path, params={"bogus": "1"})
                assert status == 400, route
                assert_error(answer, "invalid_request_error", "bogus")
            continue
        valid, (wrong, wrong_param), (out_of_range, range_param) = BODIES[route.operation_id]
        status, answer = await admin.call(route.method, path, raw=b'{"name": ')
        assert status == 400, (route, answer)
        assert "not valid JSON" in assert_error(answer, "invalid_request_error")
        for body, param in ((wrong, wrong_param), ({**valid, "bogus": 1}, "bogus"),
                            (out_of_range, range_param)):
            status, answer = await admin.call(route.method, path, body)
            assert status == 400, (route, body, answer)
            message = assert_error(answer, "invalid_request_error", param)
            assert param in message
        status, answer = await admin.call(route.method, path, raw=json.dumps(valid).encode(),
                                          content_type="text/plain")
        assert status == 415, (route, answer)
        assert_error(answer, "invalid_request_error")
    assert await pool.fetchval("SELECT count(*) FROM events") == events_before


async def test_the_token_is_required_and_never_logged(admin: Admin) -> None:
    wrong = "wrong-token-0123456789abcdef"
    routes = [r for r in all_routes() if not r.public]
    with capture_logs() as logs:
        for route in routes:
            path = _fill(route.path, {name: str(uuid.uuid4()) for name in (
                "tenant_id", "environment_id", "key_id", "model_id", "deployment_id",
                "node_id", "subscription_id", "delivery_id")})
            for token, code in ((None, "missing_admin_token"), (wrong, "invalid_admin_token"),
                                (TOKEN[:-1], "invalid_admin_token")):
                status, answer = await admin.call(route.method, path, {}, token=token)
                assert status == 401, (route, token)
                assert_error(answer, "authentication_error")
                assert answer["error"]["code"] == code
        await admin.ok("GET", "/tenants")  # and a success, logged too
    assert logs
    assert any(e["event"] == "admin token rejected" for e in logs)
    everything = repr(logs)
    assert TOKEN not in everything and wrong not in everything and TOKEN[:-1] not in everything
    # The document itself needs no token; the probes neither.
    async with admin.session.get(admin.server.make_url("/admin/v1/openapi.json")) as r:
        assert r.status == 200 and (await r.json())["openapi"] == "3.1.0"
    async with admin.session.get(admin.server.make_url("/ready")) as r:
        assert r.status == 200
        assert (await r.json())["checks"] == {"postgres": "ok", "redis": "ok", "nats": "ok"}


async def test_unknown_and_malformed_ids(admin: Admin) -> None:
    ids = await _ids(admin)
    for route in all_routes():
        names = re.findall(r"{(\w+)}", route.path)
        if not names:
            continue
        body = BODIES[route.operation_id][0] if route.body is not None else None
        unknown = _fill(route.path, {**ids, **{n: str(uuid.uuid4()) for n in names}})
        status, answer = await admin.call(route.method, unknown, body)
        assert status == 404, (route, answer)
        assert "not found" in assert_error(answer, "not_found_error")
        malformed = _fill(route.path, {**ids, **{n: "not-a-uuid" for n in names}})
        status, answer = await admin.call(route.method, malformed, body)
        assert status == 400, (route, answer)
        assert_error(answer, "invalid_request_error", names[0])
    status, answer = await admin.call("GET", "/nowhere")
    assert status == 404
    assert_error(answer, "not_found_error")
    status, answer = await admin.call("PUT", "/tenants")
    assert status == 405


async def test_a_concurrent_change_is_a_409(admin: Admin, pool: asyncpg.Pool) -> None:
    tenant = await admin.ok("POST", "/tenants", {"name": "Acme"}, 201)
    tenant_id = uuid.UUID(tenant["id"])
    # Another writer appends to the tenant's stream and holds its transaction open: the API's
    # command read version 1, waits on the stream's row, then finds version 2.
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await EventLog(conn).append(f"tenant:{tenant_id}",
                                        [TenantUpdated(tenant_id=tenant_id, name="other")], 1,
                                        conn=conn)
            patch = asyncio.create_task(admin.call("PATCH", f"/tenants/{tenant_id}",
                                                   {"name": "mine"}))

            async def waiting() -> bool:
                return bool(await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'UPDATE streams%'"))

            await eventually(waiting, timeout=10, what="the command to wait on the stream")
        finally:
            await tx.commit()
    status, answer = await asyncio.wait_for(patch, 10)
    assert status == 409
    assert "retry" in assert_error(answer, "conflict_error")


# --------------------------------------------------------------------------- conflicts


async def test_a_status_change_that_changes_nothing_is_a_409(admin: Admin,
                                                             pool: asyncpg.Pool) -> None:
    tenant = await admin.ok("POST", "/tenants", {"name": "Acme"}, 201)
    status, answer = await admin.call("POST", f"/tenants/{tenant['id']}/reactivate")
    assert status == 409 and "active already" in assert_error(answer, "conflict_error")
    await admin.ok("POST", f"/tenants/{tenant['id']}/suspend", {"reason": "unpaid"})
    status, answer = await admin.call("POST", f"/tenants/{tenant['id']}/suspend",
                                      {"reason": "something else"})
    assert status == 409 and "suspended already" in assert_error(answer, "conflict_error")
    # The first suspension's reason stands; one event each.
    assert (await admin.ok("GET", f"/tenants/{tenant['id']}"))["status_reason"] == "unpaid"
    assert await pool.fetchval("SELECT count(*) FROM events "
                               "WHERE type IN ('tenant.suspended', 'tenant.reactivated')") == 1


async def test_environment_names_are_unique_within_a_tenant(admin: Admin,
                                                            pool: asyncpg.Pool) -> None:
    tenant_a, _, _ = await seed(admin, "A")  # has "production"
    path = f"/tenants/{tenant_a['id']}/environments"
    status, answer = await admin.call("POST", path, {"name": "production", "region": "r"})
    assert status == 409 and "production" in assert_error(answer, "conflict_error")
    tenant_b = await admin.ok("POST", "/tenants", {"name": "B"}, 201)
    await admin.ok("POST", f"/tenants/{tenant_b['id']}/environments",
                   {"name": "production", "region": "r"}, 201)  # another tenant's: fine
    staging = await admin.ok("POST", path, {"name": "staging", "region": "r"}, 201)
    status, answer = await admin.call("PATCH", f"/environments/{staging['id']}",
                                      {"name": "production"})
    assert status == 409
    assert_error(answer, "conflict_error")
    assert (await admin.ok("PATCH", f"/environments/{staging['id']}",
                           {"name": "staging", "region": "r2"}))["region"] == "r2"

    # Racing creators of one name: one wins.
    results = await asyncio.gather(*(admin.call("POST", path, {"name": "qa", "region": "r"})
                                     for _ in range(6)))
    assert sorted(status for status, _ in results) == [201] + [409] * 5
    assert await pool.fetchval("SELECT count(*) FROM environments WHERE tenant_id = $1 "
                               "AND name = 'qa'", uuid.UUID(tenant_a["id"])) == 1


async def test_rotation_sets_keeps_or_clears_the_expiry(admin: Admin,
                                                        pool: asyncpg.Pool) -> None:
    _, env, key = await seed(admin)
    later = (datetime.now(UTC) + timedelta(days=60)).replace(microsecond=0)
    rotated = await admin.ok("POST", f"/keys/{key['id']}/rotate",
                             {"expires_at": later.isoformat()}, 201)
    assert datetime.fromisoformat(rotated["expires_at"]) == later
    kept = await admin.ok("POST", f"/keys/{rotated['id']}/rotate", {}, 201)
    assert kept["expires_at"] == rotated["expires_at"]
    cleared = await admin.ok("POST", f"/keys/{kept['id']}/rotate", {"expires_at": None}, 201)
    assert cleared["expires_at"] is None

    # An expired key's successor must not be born expired: the caller says what it wants.
    expired = await Catalog(EventLog(pool), actor="test").create_api_key(
        uuid.UUID(env["id"]), expires_at=datetime.now(UTC) - timedelta(hours=1))
    status, answer = await admin.call("POST", f"/keys/{expired.key_id}/rotate")
    assert status == 400
    assert "expired" in assert_error(answer, "invalid_request_error", "expires_at")
    status, answer = await admin.call(
        "POST", f"/keys/{expired.key_id}/rotate",
        {"expires_at": (datetime.now(UTC) - timedelta(minutes=1)).isoformat()})
    assert status == 400
    assert_error(answer, "invalid_request_error", "expires_at")
    assert (await admin.ok("GET", f"/keys/{expired.key_id}"))["status"] == "active"
    renewed = await admin.ok("POST", f"/keys/{expired.key_id}/rotate",
                             {"expires_at": later.isoformat()}, 201)
    assert datetime.fromisoformat(renewed["expires_at"]) == later
    assert (await admin.ok("GET", f"/keys/{expired.key_id}"))["status"] == "revoked"
