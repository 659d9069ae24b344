"""Local webhook receivers that behave like the real services, over real HTTP.

- Discord-like (``/api/webhooks/<id>/<token>``): checks every message limit and answers 400
  ``Invalid Form Body`` when one is broken, as Discord does; 204 otherwise; can be scripted
  to answer 429 with Discord's JSON ``retry_after`` (and headers) first, or 404 (a deleted
  webhook).
- Slack-like (``/services/<T>/<B>/<token>``): checks Block Kit limits (400
  ``invalid_blocks``), answers 200 ``ok``; scriptable to 404 ``no_service`` / 410
  ``channel_is_archived``.
- Generic (``/hooks/<name>``): verifies the Standard Webhooks signature with the
  `standardwebhooks` library (401 when it does not verify), then answers as scripted.

Each endpoint records what it got (body, headers, when) and how many requests overlapped.
Waiting for requests is waiting on an event with a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from services.infra.devstack import free_port
from services.notifier import discord, slack


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def discord_rate_limited(retry_after: float) -> Reply:
    return Reply(429, {"message": "You are being rate limited.", "retry_after": retry_after,
                       "global": False},
                 {"Retry-After": str(max(1, round(retry_after))),
                  "X-RateLimit-Remaining": "0",
                  "X-RateLimit-Reset-After": f"{retry_after:.3f}",
                  "X-RateLimit-Scope": "user"})


DISCORD_UNKNOWN_WEBHOOK = Reply(404, {"message": "Unknown Webhook", "code": 10015})
SLACK_NO_SERVICE = Reply(404, "no_service")
SLACK_ARCHIVED = Reply(410, "channel_is_archived")


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]
    at: float
    """time.monotonic() when it arrived."""
    status: int
    """What the receiver answered."""

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Endpoint:
    def __init__(self, kind: str, path: str, *, script: list[Reply] | None = None,
                 default: Reply | None = None, secret: str | None = None,
                 latency: float = 0.0) -> None:
        self.kind = kind
        self.path = path
        self.script: deque[Reply] = deque(script or [])
        self.default = default or Reply(204 if kind == "discord" else 200,
                                        "ok" if kind == "slack" else None)
        self.secret = secret
        self.latency = latency
        """Seconds each answer takes (a slow endpoint, to see requests overlap)."""
        self.received: list[Received] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._changed = asyncio.Event()
        self.url = ""

    @property
    def delivered(self) -> list[Received]:
        return [r for r in self.received if 200 <= r.status < 300]

    async def wait_for(self, n: int, *, delivered: bool = False, timeout: float = 10.0
                       ) -> list[Received]:
        """Until `n` requests (or `n` answered 2xx) have arrived; AssertionError after
        `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.delivered if delivered else self.received
            if len(got) >= n:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.path}: {len(got)} of {n} requests within "
                                     f"{timeout}s")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)

    def _reply(self, body: bytes, headers: dict[str, str]) -> Reply:
        if self.kind == "generic" and self.secret is not None:
            try:
                Webhook(self.secret).verify(body, headers)
            except WebhookVerificationError as exc:
                return Reply(401, {"error": str(exc)})
        if self.kind in ("discord", "slack"):
            try:
                payload = json.loads(body)
            except ValueError:
                return Reply(400, "invalid_payload")
            problems = discord.check(payload) if self.kind == "discord" else slack.check(payload)
            if problems:
                return Reply(400, {"message": "Invalid Form Body", "errors": problems}
                             if self.kind == "discord" else "invalid_blocks")
        return self.script.popleft() if self.script else self.default

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = await request.read()
            headers = dict(request.headers)
            reply = self._reply(body, headers)
            if self.latency:
                await asyncio.sleep(self.latency)
            self.received.append(Received(body, headers, time.monotonic(), reply.status))
        finally:
            self.in_flight -= 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if isinstance(reply.body, dict | list):
            return web.json_response(reply.body, status=reply.status, headers=reply.headers)
        if reply.body is None:
            return web.Response(status=reply.status, headers=reply.headers)
        return web.Response(text=str(reply.body), status=reply.status, headers=reply.headers)


class WebhookReceivers:
    """One local HTTP server holding any number of endpoints."""

    def __init__(self) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self._runner: web.AppRunner | None = None
        self.base = ""
        self._count = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.base = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _dispatch(self, request: web.Request) -> web.Response:
        endpoint = self.endpoints.get(request.path)
        if endpoint is None:
            return web.Response(status=404, text="no such endpoint")
        return await endpoint.handle(request)

    def _add(self, endpoint: Endpoint) -> Endpoint:
        endpoint.url = self.base + endpoint.path
        self.endpoints[endpoint.path] = endpoint
        return endpoint

    def _next(self) -> int:
        self._count += 1
        return self._count

    def discord(self, **kwargs: Any) -> Endpoint:
        n = self._next()
        return self._add(Endpoint("discord", f"/api/webhooks/{1000 + n}/tok-discord-{n}",
                                  **kwargs))

    def slack(self, **kwargs: Any) -> Endpoint:
        n = self._next()
        return self._add(Endpoint("slack", f"/services/T000{n}/B000{n}/tok-slack-{n}",
                                  **kwargs))

    def generic(self, secret: str, **kwargs: Any) -> Endpoint:
        n = self._next()
        return self._add(Endpoint("generic", f"/hooks/endpoint-{n}", secret=secret, **kwargs))
