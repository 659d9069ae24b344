"""`vllm serve --api-key`: which requests need ``Authorization: Bearer <key>``, and the answer
to those that lack it, as vLLM's AuthenticationMiddleware gives them
(vllm/entrypoints/serve/utils/server_utils.py).

- Guarded: every path under vLLM's fail-closed prefixes (``/v1``, ``/v2``, ``/inference``,
  ``/cohere``), whether or not a route serves it (``/v1/nothing`` is 401 before it is 404),
  and under the static prefix of every other route it serves that is not public
  (``build_guarded_prefixes``: ``/tokenize``, ``/detokenize``, ``/score``, ``/rerank``).
  vLLM 0.11 guarded ``/v1`` only, so those four and ``/v2/rerank`` were open there; nodes run
  a current release, which guards them.
- Open: ``/health``, ``/ping``, ``/load``, ``/version``, ``/metrics`` (probes and scrapers: the
  agent reads ``/health`` and ``/metrics``, the monitor probes ``/health``), and any OPTIONS.
- The header is ``Bearer`` (any case) then one space then the key, compared in constant time
  (SHA-256 of each side), against any of the server's keys.
- Refused: 401 with the body ``{"error":"Unauthorized"}`` (not OpenAI's error shape: that is
  vLLM's answer) and no ``WWW-Authenticate``.

The simulator's own ``/admin/faults`` is left open: it is the test harness's hand on the
machine (the cloud's, in the local cloud), not part of vLLM, and no real node has it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from agent.simulator.serving import JSON_HEADERS

__all__ = ["GUARDED_PREFIXES", "UNAUTHORIZED_BODY", "ApiKeys", "auth_middleware", "guarded"]

GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere", "/tokenize", "/detokenize",
                    "/score", "/rerank")
"""vLLM's MIN_GUARDED_PREFIXES plus the prefixes it derives from the simulator's routes."""
UNAUTHORIZED_BODY = b'{"error":"Unauthorized"}'


def guarded(method: str, path: str) -> bool:
    """Whether vLLM with `--api-key` wants the key for this request."""
    return method != "OPTIONS" and path.startswith(GUARDED_PREFIXES)


class ApiKeys:
    """The keys a server takes (`--api-key k1 k2`, else VLLM_API_KEY)."""

    __slots__ = ("_hashes",)

    def __init__(self, keys: Iterable[str]) -> None:
        self._hashes = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    def __bool__(self) -> bool:
        return bool(self._hashes)

    def verify(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, param = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = hashlib.sha256(param.encode()).digest()
        match = False
        for expected in self._hashes:  # all of them, whichever matches: no timing to read
            match |= secrets.compare_digest(given, expected)
        return match

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._hashes)} key(s))"


def auth_middleware(keys: ApiKeys) -> Middleware:
    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if guarded(request.method, request.path) and not keys.verify(
                request.headers.get("Authorization")):
            return web.Response(body=UNAUTHORIZED_BODY, status=401, headers=JSON_HEADERS)
        return await handler(request)

    return check_api_key
