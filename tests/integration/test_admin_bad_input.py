"""Issue 20, the admin half: no input gets a 500, and the OpenAPI document says what the server
does. Each reproducer of the issue is here, against the real admin app over HTTP and real
PostgreSQL: NUL bytes in free text and filters, integers and durations past what the columns
and the clock can hold, empty filter values, the values the document allows and the server
used to refuse, the statuses the document did not list, PATCH without a body, and a body
whose gzip encoding is broken."""

from __future__ import annotations

import gzip
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from structlog.testing import capture_logs

from services.admin.openapi import build_document
from tests.integration import test_admin_api
from tests.integration.test_admin_api import TOKEN, Admin, assert_error, seed

NUL = "a\u0000b"
MODEL = {"name": "m", "family": "f", "vram_gb": 1, "input_price_per_million": "1",
         "output_price_per_million": 1, "context_length": 10}
DEPLOYMENT = {"model": "m", "regions": ["r"], "gpu_type": "g", "spot": False, "min_nodes": 0,
              "max_nodes": 1}
DOCUMENT = build_document()


admin = test_admin_api.admin  # the real admin service, as test_admin_api runs it


async def _world(admin: Admin) -> dict[str, str]:
    tenant, env, key = await seed(admin)
    model = await admin.ok("POST", "/models", MODEL, 201)
    deployment = await admin.ok("POST", "/deployments", DEPLOYMENT, 201)
    return {"tenant": tenant["id"], "environment": env["id"], "key": key["id"],
            "model": model["id"], "deployment": deployment["id"]}


def _documented(method: str, path: str) -> set[int]:
    template = path
    operation = None
    for doc_path, ops in DOCUMENT["paths"].items():
        if method.lower() in ops and _matches(doc_path, template):
            operation = ops[method.lower()]
    assert operation is not None, (method, path)
    return {int(s) for s in operation["responses"]}


def _matches(doc_path: str, path: str) -> bool:
    a, b = doc_path.removeprefix("/admin/v1").split("/"), path.split("?")[0].split("/")
    return len(a) == len(b) and all(x == y or x.startswith("{") for x, y in zip(a, b,
                                                                               strict=True))


async def expect(admin: Admin, method: str, path: str, body: Any = None, *, status: int = 400,
                 param: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """The answer is `status`, in the error shape, naming `param`; and the document lists it."""
    got, answer = await admin.call(method, path, body, **kwargs)
    assert got == status, (method, path, body, got, answer)
    assert got in _documented(method, path), (method, path, got)
    if status >= 400:
        assert_error(answer, answer["error"]["type"], param)
    result: dict[str, Any] = answer
    return result


# --------------------------------------------------------------------------- NUL bytes


async def test_nul_bytes_in_every_free_text_field_are_a_400(admin: Admin,
                                                             pool: asyncpg.Pool) -> None:
    ids = await _world(admin)
    before = await pool.fetchval("SELECT count(*) FROM events")
    t, e, k, d = ids["tenant"], ids["environment"], ids["key"], ids["deployment"]
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("POST", "/tenants", {"name": NUL}, "name"),
        ("POST", "/tenants", {"name": "n", "email": "a\u0000@b.c"}, "email"),
        ("PATCH", f"/tenants/{t}", {"name": NUL}, "name"),
        ("POST", f"/tenants/{t}/suspend", {"reason": NUL}, "reason"),
        ("POST", f"/tenants/{t}/reactivate", {"reason": NUL}, "reason"),
        ("POST", f"/tenants/{t}/environments", {"name": NUL, "region": "r"}, "name"),
        ("PATCH", f"/environments/{e}", {"name": NUL}, "name"),
        ("POST", f"/environments/{e}/keys", {"name": NUL}, "name"),
        ("PATCH", f"/keys/{k}", {"name": NUL}, "name"),
        ("POST", f"/keys/{k}/revoke", {"reason": NUL}, "reason"),
        ("POST", f"/keys/{k}/rotate", {"reason": NUL}, "reason"),
        ("POST", "/models", {**MODEL, "name": NUL}, "name"),
        ("POST", "/models", {**MODEL, "name": "m2", "family": NUL}, "family"),
        ("POST", "/models", {**MODEL, "name": "m3", "weights_source": "hf://a/b\u0000"},
         "weights_source"),
        ("PATCH", f"/models/{ids['model']}", {"family": NUL}, "family"),
        ("POST", "/deployments", {**DEPLOYMENT, "model": NUL}, "model"),
        ("POST", "/deployments", {**DEPLOYMENT, "gpu_type": NUL}, "gpu_type"),
        ("PATCH", f"/deployments/{d}", {"gpu_type": NUL}, "gpu_type"),
        ("POST", f"/nodes/{uuid.uuid4()}/drain", {"reason": NUL}, "reason"),
        ("POST", f"/nodes/{uuid.uuid4()}/terminate", {"reason": NUL}, "reason"),
        ("POST", f"/tenants/{t}/billing/exports/settle",
         {"identifier": NUL, "action": "mark_exported"}, "identifier"),
        ("POST", "/subscriptions", {"kind": "email", "target": "ops@acme.test",
                                    "event_types": ["node.*"], "description": NUL},
         "description"),
        ("POST", "/subscriptions", {"kind": "email", "target": NUL,
                                    "event_types": ["node.*"]}, "target"),
        ("POST", "/subscriptions", {"kind": "email", "target": "ops@acme.test",
                                    "event_types": [NUL]}, "event_types[0]"),
    ]
    for method, path, body, param in cases:
        answer = await expect(admin, method, path, body, param=param)
        assert "NUL" in answer["error"]["message"] or param in answer["error"]["message"]
    assert await pool.fetchval("SELECT count(*) FROM events") == before


@pytest.mark.parametrize("path", ["/usage?model=a%00b", "/nodes?model=a%00b",
                                  "/events?stream=a%00b", "/events?type=a%00b",
                                  "/usage?start=a%00b"])
async def test_nul_bytes_in_query_filters_are_a_400(admin: Admin, path: str) -> None:
    param = path.split("?")[1].split("=")[0]
    await expect(admin, "GET", path, param=param)


# --------------------------------------------------------------------------- overflow


@pytest.mark.parametrize("path", [
    "/events?from=9223372036854775808",
    "/events?from=99999999999999999999999999",
    "/events?cursor=9223372036854775808:1",
    "/events?since=99999999999d",
    "/events?since=1e400d",
    "/usage?start=99999999999d",
    "/usage?end=99999999999h",
    "/usage?start=0001-01-01T00:00:00%2B01:00",
    "/tenants?limit=99999999999999999999",
])
async def test_numbers_past_what_the_server_can_hold_are_a_400(admin: Admin, path: str) -> None:
    param = path.split("?")[1].split("=")[0]
    await expect(admin, "GET", path, param=param)


async def test_the_event_stream_refuses_a_bad_query_before_it_starts(admin: Admin) -> None:
    for query in ("from=9223372036854775808", "since=99999999999d", "from=", "stream="):
        async with admin.session.get(admin.server.make_url(f"/admin/v1/events/stream?{query}"),
                                     headers={"X-Admin-Token": TOKEN}) as r:
            assert r.status == 400, query
            assert r.content_type == "application/json"
            assert_error(await r.json(), "invalid_request_error", query.split("=")[0])


async def test_times_far_ahead_in_bodies_are_a_400(admin: Admin) -> None:
    ids = await _world(admin)
    # past the end of year 9999 in UTC: the clock cannot hold it
    when = "9999-12-31T23:59:59-05:00"
    await expect(admin, "POST", f"/environments/{ids['environment']}/keys",
                 {"expires_at": when}, param="expires_at")
    await expect(admin, "PATCH", f"/keys/{ids['key']}", {"expires_at": when},
                 param="expires_at")
    await expect(admin, "POST", f"/keys/{ids['key']}/rotate", {"expires_at": when},
                 param="expires_at")
    # the last hour it can
    await admin.ok("PATCH", f"/keys/{ids['key']}", {"expires_at": "9999-12-31T23:00:00Z"})


# --------------------------------------------------------------------------- empty filters


@pytest.mark.parametrize("path", [
    "/usage?tenant_id=", "/usage?environment_id=", "/usage?api_key_id=", "/usage?model=",
    "/usage?start=", "/usage?end=", "/usage?granularity=", "/usage?group_by=",
    "/nodes?model=", "/nodes?status=", "/nodes?cursor=", "/nodes?limit=",
    "/tenants?cursor=", "/tenants?limit=", "/models?cursor=", "/deployments?cursor=",
    "/subscriptions?tenant_id=", "/subscriptions?scope=", "/subscriptions?cursor=",
    "/events?type=", "/events?stream=", "/events?since=", "/events?from=", "/events?cursor=",
    "/events?limit=", "/billing/exports?status=", "/billing/exports?limit=",
])
async def test_an_empty_filter_is_a_400_not_no_filter(admin: Admin, path: str) -> None:
    param = path.split("?")[1].split("=")[0]
    await expect(admin, "GET", path, param=param)


async def test_empty_filters_on_lists_under_an_id(admin: Admin) -> None:
    ids = await _world(admin)
    for path in (f"/tenants/{ids['tenant']}/environments?cursor=",
                 f"/tenants/{ids['tenant']}/keys?cursor=",
                 f"/environments/{ids['environment']}/keys?limit=",
                 f"/subscriptions/{uuid.uuid4()}/deliveries?status=",
                 f"/subscriptions/{uuid.uuid4()}/attempts?cursor="):
        await expect(admin, "GET", path, param=path.split("?")[1].split("=")[0])


async def test_every_route_refuses_an_unknown_query_parameter(admin: Admin) -> None:
    ids = await _world(admin)
    fill = {"tenant_id": ids["tenant"], "environment_id": ids["environment"],
            "key_id": ids["key"], "model_id": ids["model"], "deployment_id": ids["deployment"]}
    for doc_path, operations in DOCUMENT["paths"].items():
        path = doc_path.removeprefix("/admin/v1")
        for name, value in fill.items():
            path = path.replace("{" + name + "}", value)
        path = path.replace("{", "").replace("}", "")
        path = "/".join(str(uuid.uuid4()) if p.endswith("_id") else p for p in path.split("/"))
        for method in operations:
            if method not in ("get", "delete"):
                continue
            await expect(admin, method.upper(), path + "?bogus=1", param="bogus")


# --------------------------------------------------------------------------- the document's word


async def test_what_the_document_allows_the_server_takes(admin: Admin) -> None:
    ids = await _world(admin)
    # whole numbers of the right type, a price as a decimal string or number
    await admin.ok("POST", "/models", {**MODEL, "name": "m-1", "input_price_per_million": "0",
                                       "output_price_per_million": 0.000123}, 201)
    # an expiry in the future, in another zone
    soon = (datetime.now(UTC) + timedelta(days=1)).astimezone().isoformat()
    await admin.ok("PATCH", f"/keys/{ids['key']}", {"expires_at": soon})
    # a cursor of the right shape that matches no row
    page = await admin.ok("GET", "/tenants?cursor=AAAAAAAAAAAAAAAAAAAAAA")
    assert page["data"][0]["id"] == ids["tenant"]
    await admin.ok("GET", "/events?cursor=0:0&from=9223372036854775807&since=99999d")


def _schema(ref: dict[str, Any]) -> dict[str, Any]:
    name = ref["$ref"].rsplit("/", 1)[1]
    schema: dict[str, Any] = DOCUMENT["components"]["schemas"][name]
    return schema


def test_the_document_states_the_servers_constraints() -> None:
    paths = DOCUMENT["paths"]
    tenant = _schema(paths["/admin/v1/tenants"]["post"]["requestBody"]["content"]
                     ["application/json"]["schema"])
    assert tenant["properties"]["name"]["minLength"] == 1
    assert "\\x00" in tenant["properties"]["name"]["pattern"]
    for path, ops in paths.items():
        for operation in ops.values():
            for param in operation.get("parameters", ()):
                if param["in"] != "query":
                    continue
                schema = param["schema"]
                if schema.get("type") == "array":
                    schema = schema["items"]
                if schema.get("type") == "string" and "enum" not in schema \
                        and "format" not in schema:
                    assert schema.get("minLength", 0) >= 1, (path, param)
                    assert "maxLength" in schema, (path, param)
                if schema.get("type") == "integer":
                    assert "maximum" in schema and "minimum" in schema, (path, param)
    deployment = _schema(paths["/admin/v1/deployments"]["post"]["requestBody"]["content"]
                         ["application/json"]["schema"])
    assert deployment["properties"]["regions"]["uniqueItems"] is True
    assert deployment["properties"]["min_nodes"]["type"] == "integer"
    model = _schema(paths["/admin/v1/models"]["post"]["requestBody"]["content"]
                    ["application/json"]["schema"])
    price = model["properties"]["input_price_per_million"]
    assert set(price["type"]) == {"string", "number"} and "pattern" in price
    assert "exclusiveMaximum" in price and price["minimum"] == 0


async def test_the_statuses_the_server_answers_are_documented(admin: Admin) -> None:
    ids = await _world(admin)
    await expect(admin, "POST", "/deployments", {**DEPLOYMENT, "model": "nope"}, status=404,
                 param="model")
    await expect(admin, "POST", f"/tenants/{ids['tenant']}/environments",
                 {"name": "production", "region": "r"}, status=409)
    await expect(admin, "POST", f"/tenants/{ids['tenant']}/billing/customer", status=503)
    await expect(admin, "POST", f"/tenants/{ids['tenant']}/billing/exports/settle",
                 {"identifier": "x", "action": "resend"}, status=503)
    await expect(admin, "POST", "/subscriptions",
                 {"kind": "email", "target": "ops@acme.test", "event_types": ["node.*"],
                  "tenant_id": str(uuid.uuid4())}, status=404, param="tenant_id")


async def test_a_patch_needs_a_body(admin: Admin, pool: asyncpg.Pool) -> None:
    ids = await _world(admin)
    before = await pool.fetchval("SELECT count(*) FROM events")
    for path in (f"/tenants/{ids['tenant']}", f"/environments/{ids['environment']}",
                 f"/keys/{ids['key']}", f"/models/{ids['model']}",
                 f"/deployments/{ids['deployment']}"):
        answer = await expect(admin, "PATCH", path, raw=b"")
        assert "body" in answer["error"]["message"]
        # `{}` is a body: it changes nothing and writes no event
        await admin.ok("PATCH", path, {})
    assert await pool.fetchval("SELECT count(*) FROM events") == before


async def test_the_values_the_document_now_refuses(admin: Admin) -> None:
    ids = await _world(admin)
    for body, param in (({**MODEL, "name": "m-2", "input_price_per_million": ""},
                         "input_price_per_million"),
                        ({**MODEL, "name": "m-3", "vram_gb": 2.0}, "vram_gb")):
        await expect(admin, "POST", "/models", body, param=param)
    await expect(admin, "POST", "/deployments", {**DEPLOYMENT, "min_nodes": 1882.0},
                 param="min_nodes")
    await expect(admin, "POST", "/deployments", {**DEPLOYMENT, "regions": ["r", "r"]},
                 param="regions[1]")
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    await expect(admin, "POST", f"/environments/{ids['environment']}/keys",
                 {"expires_at": past}, param="expires_at")
    await expect(admin, "POST", "/subscriptions",
                 {"kind": "email", "target": "0", "event_types": ["node.*"]}, param="target")
    # and the document says so: a past expiry is described, an e-mail target has a pattern
    key = _schema(DOCUMENT["paths"]["/admin/v1/environments/{environment_id}/keys"]["post"]
                  ["requestBody"]["content"]["application/json"]["schema"])
    assert "future" in json.dumps(key["properties"]["expires_at"])


# --------------------------------------------------------------------------- gzip


async def test_a_body_that_is_not_the_gzip_it_claims_is_the_clients_error(admin: Admin) -> None:
    url = admin.server.make_url("/admin/v1/tenants")
    headers = {"X-Admin-Token": TOKEN, "Content-Type": "application/json",
               "Content-Encoding": "gzip"}
    with capture_logs() as logs:
        async with admin.session.post(url, data=b'{"name": "t"}', headers=headers) as r:
            assert r.status == 400
            assert_error(await r.json(), "invalid_request_error")
    assert not [e for e in logs if e["log_level"] in ("error", "critical", "exception")], logs
    assert not [e for e in logs if "exc_info" in e], logs
    # a real gzip body is read
    async with admin.session.post(url, data=gzip.compress(b'{"name": "gz"}'),
                                  headers=headers) as r:
        assert r.status == 201, await r.text()


async def test_a_broken_body_never_answers_500(admin: Admin) -> None:
    url = admin.server.make_url("/admin/v1/tenants")
    for raw in (b'{"name": "\\ud800"}', b"\xff\xfe", b'{"name": "a"' + b" " * 10):
        async with aiohttp.ClientSession() as session, session.post(
                url, data=raw, headers={"X-Admin-Token": TOKEN,
                                        "Content-Type": "application/json"}) as r:
            assert r.status in (201, 400), (raw, r.status, await r.text())
