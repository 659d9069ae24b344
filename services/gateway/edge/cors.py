"""CORS: which origins may call the API from a browser, the headers that say so
(precomputed), and the layer that answers preflights before auth."""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict, istr

from services.gateway.edge.config import MiddlewareConfig


class CorsPolicy:
    """Which origins may call us from a browser, and the headers that say so (precomputed)."""

    __slots__ = (
        "_allow_headers",
        "_allow_methods",
        "_echo_headers",
        "_expose",
        "_max_age",
        "any_origin",
        "origins",
    )

    def __init__(self, origins: tuple[str, ...], methods: tuple[str, ...],
                 headers: tuple[str, ...], expose: tuple[str, ...], max_age: int) -> None:
        self.any_origin = "*" in origins
        self.origins = frozenset(o.strip().rstrip("/").lower() for o in origins)
        self._allow_methods = ", ".join(methods)
        self._echo_headers = "*" in headers
        self._allow_headers = ", ".join(h for h in headers if h != "*")
        self._expose = ", ".join(expose)
        self._max_age = str(max_age)

    @classmethod
    def from_config(cls, config: MiddlewareConfig) -> CorsPolicy:
        return cls(config.cors_origins, config.cors_methods, config.cors_headers,
                   config.cors_expose_headers, config.cors_max_age)

    @property
    def varies_by_origin(self) -> bool:
        return not self.any_origin

    def allow_origin(self, origin: str) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for `origin`, or None to refuse it.
        Credentials are never allowed (API keys travel in headers, not cookies), so ``*``
        is a valid answer."""
        if self.any_origin:
            return "*"
        return origin if origin.lower() in self.origins else None

    def preflight_headers(self, origin: str | None,
                          requested_headers: str | None) -> dict[str, str]:
        """Headers of the 204 answering a preflight; without CORS headers when refused."""
        headers: dict[str, str] = {}
        if self.varies_by_origin:
            headers[hdrs.VARY] = "Origin"
        allowed = self.allow_origin(origin) if origin else None
        if allowed is None:
            return headers
        headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
        headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = self._allow_methods
        if self._echo_headers and requested_headers:
            headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = requested_headers
        elif self._allow_headers:
            headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = self._allow_headers
        headers[hdrs.ACCESS_CONTROL_MAX_AGE] = self._max_age
        return headers

    def response_headers(self, origin: str) -> tuple[tuple[istr, str], ...]:
        """Headers for an actual (non-preflight) cross-origin response."""
        allowed = self.allow_origin(origin)
        if allowed is None:
            return ()
        if not self._expose:
            return ((hdrs.ACCESS_CONTROL_ALLOW_ORIGIN, allowed),)
        return ((hdrs.ACCESS_CONTROL_ALLOW_ORIGIN, allowed),
                (hdrs.ACCESS_CONTROL_EXPOSE_HEADERS, self._expose))


def add_vary_origin(headers: CIMultiDict[str]) -> None:
    """Add ``Origin`` to ``Vary`` (keeping what a handler put there)."""
    current = headers.get(hdrs.VARY)
    if not current:
        headers[hdrs.VARY] = "Origin"
    elif "origin" not in current.lower():
        headers[hdrs.VARY] = f"{current}, Origin"


def cors_preflight(cors: CorsPolicy) -> Middleware:
    """``OPTIONS`` preflights answered here, before auth."""

    @web.middleware
    async def cors_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        if (request.method == hdrs.METH_OPTIONS
                and hdrs.ACCESS_CONTROL_REQUEST_METHOD in headers):
            return web.Response(status=204, headers=cors.preflight_headers(
                headers.get(hdrs.ORIGIN), headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)))
        return await handler(request)

    return cors_preflight
