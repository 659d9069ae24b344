"""The admin API's OpenAPI 3.1 document, generated from the route table and the msgspec types
the handlers decode and encode with (msgspec's schema components).

``python -m services.admin.openapi`` prints it, ``--write`` rewrites the checked-in copy
(docs/admin-openapi.json), ``--check`` exits 1 when that copy is stale (a test does the same).
The service serves it at ``/admin/v1/openapi.json``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from schemas.schema_components import schema_components
from services.admin.bodies import ErrorBody
from services.admin.context import TOKEN_HEADER
from services.admin.routes import all_routes
from services.admin.routing import Route

CHECKED_IN = Path(__file__).resolve().parents[2] / "docs" / "admin-openapi.json"
OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"
SECURITY_SCHEME = "adminToken"
_PATH_PARAM = re.compile(r"{(\w+)}")

ERROR_DESCRIPTIONS = {
    400: "Bad request: malformed JSON, a wrong type, an unknown field or a value out of range; "
         "`error.param` names the field",
    401: f"Missing or wrong {TOKEN_HEADER}",
    404: "No such resource",
    409: "Conflict: a duplicate, a change made concurrently (retry), or a state that does not "
         "allow it",
    413: "Body too large",
    415: "The body is not application/json",
    502: "A component behind the API answered badly: a node's agent or billing with something "
         "unreadable (`bad_agent_reply`, `bad_billing_reply`), Stripe with a refusal "
         "(`stripe_refused`)",
    503: "A component behind the API is missing or did not answer: Stripe is not configured "
         "on the admin service (`stripe_not_configured`) or unreachable (`stripe_unavailable`), "
         "no billing leader (`billing_unavailable`)",
    504: "A component behind the API did not answer in time and may still act "
         "(`settle_timeout`): look before trying again",
}

DESCRIPTION = f"""\
The CrossLogic control plane: tenants, environments, API keys, models, deployments, and the
event log. Every route but this document needs the `{TOKEN_HEADER}` header. Every write is an
event in the log, applied to the catalog in the same transaction: a read that follows a write
sees it. Errors use OpenAI's shape, `{{"error": {{"message", "type", "param", "code"}}}}`.
Generated from services/admin (`python -m services.admin.openapi --write`): do not edit."""


def _types_overridden(node: Any) -> Any:
    """msgspec writes its own `type` over `extra_json_schema`'s: a schema that needs another
    (a price is a string or a number) says so in `x-type`, applied here."""
    if isinstance(node, list):
        return [_types_overridden(v) for v in node]
    if not isinstance(node, dict):
        return node
    found = {k: _types_overridden(v) for k, v in node.items()}
    if "x-type" in found:
        found["type"] = found.pop("x-type")
        found.pop("format", None)
    return found


def _schema_of(tp: Any, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    return refs[tp]


def _response_name(status: int) -> str:
    return f"Error{status}"


def error_statuses(route: Route) -> list[int]:
    """What a route may answer besides success: by its kind, plus its own `errors`. Every
    route checks its query string (400 for a parameter it does not take); every write is
    an event appended with an expected stream version, so two at once make one a 409."""
    statuses = set(route.errors)
    statuses.add(400)
    if not route.public:
        statuses.add(401)
    if route.method != "GET":
        statuses.add(409)
    if route.body is not None:
        statuses.update((413, 415))
    if _PATH_PARAM.search(route.path):
        statuses.add(404)
    return sorted(statuses)


def _operation(route: Route, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary,
                          "tags": [route.tag]}
    if route.description:
        op["description"] = route.description
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True,
         "schema": {"type": "string", "format": "uuid"}}
        for name in _PATH_PARAM.findall(route.path)]
    for qp in route.query:
        schema = {"type": "array", "items": qp.schema} if qp.repeatable else qp.schema
        param: dict[str, Any] = {"name": qp.name, "in": "query", "required": False,
                                 "description": qp.description, "schema": schema}
        if qp.repeatable:
            param.update(style="form", explode=True)
        params.append(param)
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": route.body_required,
                             "content": {"application/json": {
                                 "schema": _schema_of(route.body, refs)}}}
    success: dict[str, Any] = {"description": route.summary}
    if route.response is not None:
        success["content"] = {route.media_type: {"schema": _schema_of(route.response, refs)}}
    responses: dict[str, Any] = {str(route.status): success}
    for status in error_statuses(route):
        responses[str(status)] = {"$ref": f"#/components/responses/{_response_name(status)}"}
    op["responses"] = responses
    if route.public:
        op["security"] = []
    return op


def build_document(routes: Sequence[Route] | None = None) -> dict[str, Any]:
    routes = all_routes() if routes is None else routes
    types: list[Any] = [ErrorBody]
    for route in routes:
        for tp in (route.body, route.response):
            if tp is not None and tp not in types:
                types.append(tp)
    schemas, components = schema_components(types, ref_template="#/components/schemas/{name}")
    components = _types_overridden(components)
    refs = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.full_path, {})[route.method.lower()] = _operation(route, refs)
    error_responses = {
        _response_name(status): {"description": text,
                                 "content": {"application/json": {"schema": refs[ErrorBody]}}}
        for status, text in sorted(ERROR_DESCRIPTIONS.items())}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "CrossLogic admin API", "version": API_VERSION,
                 "description": DESCRIPTION},
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": error_responses,
            "securitySchemes": {SECURITY_SCHEME: {
                "type": "apiKey", "in": "header", "name": TOKEN_HEADER,
                "description": "The ADMIN_TOKEN the admin service was started with"}},
        },
        "security": [{SECURITY_SCHEME: []}],
    }


def render() -> str:
    return json.dumps(build_document(), indent=2) + "\n"


def stale(path: Path = CHECKED_IN) -> bool:
    return not path.exists() or path.read_text() != render()


def main(argv: Sequence[str]) -> int:
    if "--write" in argv:
        CHECKED_IN.write_text(render())
        print(f"wrote {CHECKED_IN}")
    elif "--check" in argv:
        if stale():
            print(f"stale: {CHECKED_IN}; run `python -m services.admin.openapi --write`",
                  file=sys.stderr)
            return 1
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
