"""The edge's settings and the small facts every layer uses: the client IP key, the default
CORS header lists, the status logged for a client that left, content types and method
labels. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import hdrs, web

from services.gateway.real_ip import DEFAULT_TRUSTED_PROXIES, TrustedProxies

REAL_IP = web.RequestKey("real_ip", str)
"""The client's address (see services/gateway/real_ip.py), for rate limits and logs."""


DEFAULT_CORS_HEADERS: tuple[str, ...] = (
    "Authorization", "Content-Type", "X-Request-ID", "OpenAI-Organization", "OpenAI-Project",
    "OpenAI-Beta",
    "X-Session-Id",  # session affinity (LB_STRATEGY=prefix_aware)
    # The official JavaScript SDK sends these from browsers; a preflight asks for them.
    "X-Stainless-Arch", "X-Stainless-Lang", "X-Stainless-OS", "X-Stainless-Package-Version",
    "X-Stainless-Retry-Count", "X-Stainless-Runtime", "X-Stainless-Runtime-Version",
    "X-Stainless-Timeout",
)
DEFAULT_EXPOSE_HEADERS: tuple[str, ...] = (
    "X-Request-ID", "Retry-After",
    "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens",
    "x-ratelimit-scope", "x-budget-max-tokens",
)

BODY_METHODS = frozenset({hdrs.METH_POST, hdrs.METH_PUT, hdrs.METH_PATCH})
KNOWN_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_POST, hdrs.METH_PUT,
                            hdrs.METH_PATCH, hdrs.METH_DELETE, hdrs.METH_OPTIONS})
CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a client that went away before an answer: logged and counted only."""


@dataclass(frozen=True, slots=True)
class MiddlewareConfig:
    """The stack's settings; the gateway's settings object is mapped onto it."""

    max_body_bytes: int = 10 * 1024 * 1024
    request_timeout: float = 60.0
    """Seconds from the request's arrival to its response (or to its first streamed byte)."""
    stream_chunk_timeout: float = 60.0
    """Once streaming, the longest silence allowed between bytes reaching the client."""
    cors_origins: tuple[str, ...] = ("*",)
    cors_methods: tuple[str, ...] = ("GET", "POST", "OPTIONS")
    cors_headers: tuple[str, ...] = DEFAULT_CORS_HEADERS
    """Request headers a browser may send; ``*`` among them echoes what a preflight asks."""
    cors_expose_headers: tuple[str, ...] = DEFAULT_EXPOSE_HEADERS
    cors_max_age: int = 600
    trusted_proxies: tuple[str, ...] = DEFAULT_TRUSTED_PROXIES
    json_content_types: tuple[str, ...] = ("application/json",)
    quiet_routes: tuple[str, ...] = ("/health", "/ready", "/metrics")
    """Route templates logged at debug level (probes and scrapes, every few seconds)."""

    def __post_init__(self) -> None:
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        if self.request_timeout <= 0 or self.stream_chunk_timeout <= 0:
            raise ValueError("request_timeout and stream_chunk_timeout must be positive")
        if not self.cors_origins:
            raise ValueError("cors_origins needs at least one origin (or *)")
        try:
            TrustedProxies(self.trusted_proxies)
        except ValueError as exc:
            raise ValueError(f"trusted_proxies: {exc}") from None


def media_type(content_type: str | None) -> str:
    """``Application/JSON; charset=utf-8`` → ``application/json``; missing → ``""``."""
    if not content_type:
        return ""
    return content_type.partition(";")[0].strip().lower()


def method_label(method: str) -> str:
    """Clients choose the method token: only the standard ones become label values."""
    return method if method in KNOWN_METHODS else "OTHER"
