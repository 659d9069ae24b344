"""OpenAI-shaped errors: the table, the constructors, the bodies, aiohttp's exceptions."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from services.gateway.errors import (
    ERROR_TYPES,
    ApiError,
    api_error_for_http,
    error_kind,
    error_response,
    sse_error_event,
)


def shape(err: ApiError) -> dict[str, object]:
    body = json.loads(err.encode())
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    inner: dict[str, object] = body["error"]
    return inner


@pytest.mark.parametrize(("err", "status", "type_", "code"), [
    (ApiError.invalid_request("bad", param="model"), 400, "invalid_request_error", None),
    (ApiError.authentication(), 401, "authentication_error", "invalid_api_key"),
    (ApiError.permission("no"), 403, "permission_error", None),
    (ApiError.not_found("gone"), 404, "not_found_error", None),
    (ApiError.request_too_large(10), 413, "invalid_request_error", "request_too_large"),
    (ApiError.unsupported_media_type("text/plain"), 415, "invalid_request_error",
     "unsupported_media_type"),
    (ApiError.rate_limited("slow"), 429, "rate_limit_error", "rate_limit_exceeded"),
    (ApiError.internal("req-1"), 500, "server_error", None),
    (ApiError.bad_gateway(), 502, "bad_gateway", None),
    (ApiError.unavailable(), 503, "service_unavailable", None),
    (ApiError.timeout(), 504, "timeout", None),
])
def test_constructors_follow_the_table(err: ApiError, status: int, type_: str,
                                       code: str | None) -> None:
    assert err.status == status
    body = shape(err)
    assert body["type"] == type_ == ERROR_TYPES[status][0]
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]


def test_param_and_code_go_into_the_body() -> None:
    body = shape(ApiError.invalid_request("temperature must be <= 2", param="temperature",
                                          code="invalid_value"))
    assert body == {"message": "temperature must be <= 2", "type": "invalid_request_error",
                    "param": "temperature", "code": "invalid_value"}


def test_unknown_statuses_fall_back_by_class() -> None:
    assert error_kind(418) == ("invalid_request_error", None)
    assert error_kind(507) == ("server_error", None)
    assert ApiError(409, "conflict").type == "invalid_request_error"
    assert ApiError.from_status(429, "x").code == "rate_limit_exceeded"


def test_internal_error_names_only_the_request_id() -> None:
    msg = ApiError.internal("abc123").message
    assert "abc123" in msg
    assert "Traceback" not in msg


def test_unsupported_media_type_caps_what_it_echoes() -> None:
    assert len(ApiError.unsupported_media_type("x" * 10_000).message) < 200
    assert "'none'" in ApiError.unsupported_media_type(None).message


async def test_error_response_carries_status_headers_and_json() -> None:
    err = ApiError.rate_limited("Slow down.", {"Retry-After": "3",
                                               "x-ratelimit-remaining-requests": "0"})
    resp = error_response(err)
    assert resp.status == 429
    assert resp.content_type == "application/json"
    assert resp.headers["Retry-After"] == "3"
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert isinstance(resp.body, bytes)
    assert json.loads(resp.body)["error"]["code"] == "rate_limit_exceeded"


def test_sse_error_event_is_one_data_event() -> None:
    frame = sse_error_event(ApiError.timeout("stalled", code="stream_timeout"))
    assert frame.startswith(b"data: {") and frame.endswith(b"}\n\n")
    assert frame.count(b"\n\n") == 1
    assert json.loads(frame[len(b"data: "):])["error"]["code"] == "stream_timeout"


def test_aiohttp_exceptions_are_translated() -> None:
    not_found = api_error_for_http(web.HTTPNotFound(), "GET", "/v1/nope")
    assert (not_found.status, not_found.type, not_found.message) == (
        404, "not_found_error", "Invalid URL (GET /v1/nope)")

    not_allowed = api_error_for_http(web.HTTPMethodNotAllowed("GET", ["POST"]), "GET", "/x")
    assert not_allowed.status == 405 and not_allowed.code == "method_not_allowed"
    assert not_allowed.headers["Allow"] == "POST"
    assert "Content-Type" not in not_allowed.headers

    too_large = api_error_for_http(web.HTTPRequestEntityTooLarge(1024, 2048), "POST", "/x",
                                   max_body_bytes=1024)
    assert too_large.status == 413 and too_large.code == "request_too_large"
    assert "1024" in too_large.message

    custom = api_error_for_http(web.HTTPBadRequest(text="messages must not be empty"),
                                "POST", "/x")
    assert custom.message == "messages must not be empty"
    plain = api_error_for_http(web.HTTPBadRequest(), "POST", "/x")
    assert plain.message == "Bad Request"


def test_echoed_paths_are_capped() -> None:
    err = api_error_for_http(web.HTTPNotFound(), "GET", "/" + "a" * 5000)
    assert len(err.message) < 300
