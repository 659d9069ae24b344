"""The stack's pure parts: header sets, CORS decisions, content types, labels, config."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from services.gateway.middleware import (
    DEFAULT_EXPOSE_HEADERS,
    SECURITY_HEADERS,
    CorsPolicy,
    MiddlewareConfig,
    add_vary_origin,
    media_type,
    method_label,
)


def test_security_headers_are_exactly_the_reference_set() -> None:
    assert {str(k): v for k, v in SECURITY_HEADERS} == {
        "Strict-Transport-Security": "max-age=31536000; includeSubDomains; preload",
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "X-XSS-Protection": "1; mode=block",
        "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
        "Referrer-Policy": "strict-origin-when-cross-origin",
        "Permissions-Policy": "geolocation=(), microphone=(), camera=()",
    }


@pytest.mark.parametrize(("given", "expected"), [
    ("application/json", "application/json"),
    ("Application/JSON; charset=utf-8", "application/json"),
    ("  application/json ;charset=UTF-8", "application/json"),
    ("text/plain", "text/plain"),
    ("", ""),
    (None, ""),
])
def test_media_type(given: str | None, expected: str) -> None:
    assert media_type(given) == expected


def test_method_label_is_bounded() -> None:
    assert method_label("POST") == "POST"
    assert method_label("BREW") == "OTHER"
    assert method_label("post") == "OTHER"  # methods are case-sensitive tokens


def test_cors_any_origin() -> None:
    cors = CorsPolicy.from_config(MiddlewareConfig())
    assert cors.allow_origin("https://app.example") == "*"
    assert not cors.varies_by_origin
    pre = cors.preflight_headers("https://app.example", "authorization, content-type")
    assert pre["Access-Control-Allow-Origin"] == "*"
    assert pre["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    allowed = {h.strip().lower() for h in pre["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-request-id", "openai-organization",
            "openai-beta", "x-stainless-os"} <= allowed
    assert pre["Access-Control-Max-Age"] == "600"
    assert "Vary" not in pre
    actual = dict(cors.response_headers("https://app.example"))
    assert actual["Access-Control-Allow-Origin"] == "*"
    exposed = actual["Access-Control-Expose-Headers"].split(", ")
    assert exposed == list(DEFAULT_EXPOSE_HEADERS)
    assert "X-Request-ID" in exposed and "Retry-After" in exposed
    assert "x-ratelimit-remaining-tokens" in exposed


def test_cors_listed_origins() -> None:
    cors = CorsPolicy.from_config(MiddlewareConfig(
        cors_origins=("https://App.example/", "http://localhost:3000")))
    assert cors.varies_by_origin
    assert cors.allow_origin("https://app.example") == "https://app.example"
    assert cors.allow_origin("http://localhost:3000") == "http://localhost:3000"
    assert cors.allow_origin("https://evil.example") is None
    assert cors.response_headers("https://evil.example") == ()
    refused = cors.preflight_headers("https://evil.example", None)
    assert refused == {"Vary": "Origin"}
    assert cors.preflight_headers(None, None) == {"Vary": "Origin"}
    ok = cors.preflight_headers("https://app.example", None)
    assert ok["Access-Control-Allow-Origin"] == "https://app.example"


def test_cors_wildcard_headers_echo_the_request() -> None:
    cors = CorsPolicy.from_config(MiddlewareConfig(cors_headers=("*",)))
    pre = cors.preflight_headers("https://a.example", "x-custom, authorization")
    assert pre["Access-Control-Allow-Headers"] == "x-custom, authorization"
    assert "Access-Control-Allow-Headers" not in cors.preflight_headers("https://a.example",
                                                                         None)


def test_vary_origin_keeps_what_is_there() -> None:
    headers: CIMultiDict[str] = CIMultiDict()
    add_vary_origin(headers)
    assert headers["Vary"] == "Origin"
    headers = CIMultiDict({"Vary": "Accept-Encoding"})
    add_vary_origin(headers)
    assert headers["Vary"] == "Accept-Encoding, Origin"
    add_vary_origin(headers)
    assert headers["Vary"] == "Accept-Encoding, Origin"


def test_config_defaults_and_validation() -> None:
    config = MiddlewareConfig()
    assert config.max_body_bytes == 10 * 1024 * 1024
    assert config.request_timeout == 60.0 and config.stream_chunk_timeout == 60.0
    assert config.cors_origins == ("*",)
    assert config.trusted_proxies == ("127.0.0.1/32", "::1/128")
    with pytest.raises(ValueError, match="trusted_proxies"):
        MiddlewareConfig(trusted_proxies=("10.0.0.0/33",))
    with pytest.raises(ValueError, match="max_body_bytes"):
        MiddlewareConfig(max_body_bytes=0)
    with pytest.raises(ValueError, match="timeout"):
        MiddlewareConfig(stream_chunk_timeout=0)
    with pytest.raises(ValueError, match="cors_origins"):
        MiddlewareConfig(cors_origins=())
