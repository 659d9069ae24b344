"""The admin API's OpenAPI document: a valid 3.1 structure, every route in it with its
schemas, and the checked-in copy current."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from services.admin.app import create_admin_app
from services.admin.openapi import CHECKED_IN, build_document, render, stale
from services.admin.routes import all_routes
from services.admin.settings import AdminSettings
from services.infra.settings import Secret, SettingsError

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return build_document()


def refs_in(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        for value in node.values():
            found += refs_in(value)
        return found
    if isinstance(node, list):
        return [r for item in node for r in refs_in(item)]
    return []


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_structure_is_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] and doc["info"]["version"]
    assert doc["security"] == [{"adminToken": []}]
    scheme = doc["components"]["securitySchemes"]["adminToken"]
    assert scheme == {**scheme, "type": "apiKey", "in": "header", "name": "X-Admin-Token"}
    operation_ids = []
    for path, item in doc["paths"].items():
        assert path.startswith("/admin/v1/")
        for method, op in item.items():
            assert method in METHODS
            operation_ids.append(op["operationId"])
            assert op["responses"], (path, method)
            for status in op["responses"]:
                assert re.fullmatch(r"[1-5]\d\d", status)
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), path
            for p in op.get("parameters", []):
                assert p["in"] in {"path", "query"} and "schema" in p
                assert p["required"] is True or p["in"] == "query"
    assert len(operation_ids) == len(set(operation_ids))
    # Every reference resolves; every schema is a JSON Schema object.
    for ref in refs_in(doc):
        assert isinstance(resolve(doc, ref), dict), ref
    for name, schema in doc["components"]["schemas"].items():
        assert schema.get("type") == "object" or "anyOf" in schema or "oneOf" in schema, name


def test_every_route_is_documented_with_its_schemas(doc: dict[str, Any]) -> None:
    routes = all_routes()
    for route in routes:
        op = doc["paths"][route.full_path][route.method.lower()]
        assert op["operationId"] == route.operation_id
        success = op["responses"][str(route.status)]
        if route.body is not None:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            if "$ref" in schema:
                body = resolve(doc, schema["$ref"])
                assert body["title"] == route.body.__name__
                assert body["additionalProperties"] is False  # unknown fields are refused
            else:  # a union tagged by a field (a subscription by `kind`)
                assert schema["discriminator"]["propertyName"]
                for one in schema["anyOf"]:
                    assert resolve(doc, one["$ref"])["additionalProperties"] is False
        else:
            assert "requestBody" not in op
        if route.response is None:
            assert "content" not in success and route.status == 204
        else:
            assert route.media_type in success["content"]
        if route.public:
            assert op["security"] == []
        else:
            assert "401" in op["responses"]
        if "{" in route.path:
            assert "404" in op["responses"]
    documented = {(p, m) for p, item in doc["paths"].items() for m in item}
    assert documented == {(r.full_path, r.method.lower()) for r in routes}


def test_the_router_serves_exactly_the_documented_routes(doc: dict[str, Any]) -> None:
    app = create_admin_app(AdminSettings(admin_token=Secret("openapi-test-token-1b7e4c9a0f2d5e83")))
    served = set()
    for route in app.router.routes():
        info = route.resource.canonical if route.resource is not None else ""
        if info.startswith("/admin/v1/") and route.method != "HEAD":
            served.add((info, route.method.lower()))
    assert served == {(p, m) for p, item in doc["paths"].items() for m in item}


def test_key_responses_show_the_plaintext_only_when_made(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert "key" in schemas["KeyWithSecret"]["properties"]
    for name, schema in schemas.items():
        props = schema.get("properties", {})
        assert "key_hash" not in props, name
        if name != "KeyWithSecret":
            assert "key" not in props, name


def test_checked_in_copy_is_current() -> None:
    assert not stale(), ("docs/admin-openapi.json is stale: run "
                         "`python -m services.admin.openapi --write`")
    assert json.loads(CHECKED_IN.read_text()) == json.loads(render())


def test_the_app_refuses_to_start_without_a_token() -> None:
    for token in ("", "   "):
        with pytest.raises(SettingsError, match="ADMIN_TOKEN is empty"):
            create_admin_app(AdminSettings(admin_token=Secret(token)))
