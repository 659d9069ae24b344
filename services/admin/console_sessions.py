"""Signed-in console browsers (issue 17). The admin token is typed once into the console's
sign-in form; the browser then holds only a session: a random id in an ``HttpOnly``,
``SameSite=Strict`` cookie (never readable by the page's scripts, never sent by another
site), kept in Redis under its hash with a time to live, so any admin replica knows it and
signing out ends it everywhere. Each session has a CSRF token the page sends back in
``X-CSRF-Token`` on every write: a request another page forges carries the cookie at most,
never the token. The token never appears in a URL or in the browser's storage.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Final

import redis.asyncio as aioredis

COOKIE: Final = "crosslogic_console"
CSRF_HEADER: Final = "X-CSRF-Token"
SESSION_SECONDS: Final = 12 * 3600
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_MAX_ID = 64
"""Longer cookie values are not ours: refused before touching Redis."""
SIGN_IN_ATTEMPTS: Final = 10
"""Wrong tokens a client address may try in `SIGN_IN_WINDOW` seconds."""
SIGN_IN_WINDOW: Final = 300


@dataclass(frozen=True)
class Session:
    session_id: str
    csrf: str

    def __repr__(self) -> str:  # secrets both: never in a log line
        return "Session(…)"

    def allows(self, method: str, csrf_given: str | None) -> bool:
        """A read, or a write carrying this session's CSRF token."""
        if method in SAFE_METHODS:
            return True
        return csrf_given is not None and hmac.compare_digest(
            csrf_given.encode("utf-8", "surrogateescape"), self.csrf.encode())


def _key(session_id: str) -> str:
    return "console:session:" + hashlib.sha256(session_id.encode()).hexdigest()


class ConsoleSessions:
    def __init__(self, redis: aioredis.Redis, ttl: int = SESSION_SECONDS) -> None:
        self.redis = redis
        self.ttl = ttl

    async def start(self) -> Session:
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32))
        await self.redis.set(_key(session.session_id), session.csrf, ex=self.ttl)
        return session

    async def find(self, session_id: str | None) -> Session | None:
        if not session_id or len(session_id) > _MAX_ID:
            return None
        csrf = await self.redis.get(_key(session_id))
        if csrf is None:
            return None
        return Session(session_id, csrf.decode() if isinstance(csrf, bytes) else str(csrf))

    async def end(self, session_id: str) -> None:
        await self.redis.delete(_key(session_id))

    async def blocked(self, client: str) -> bool:
        """Whether `client` has tried too many wrong tokens lately (a guesser is stopped, not
        the operator who mistyped once)."""
        count = await self.redis.get(_attempts_key(client))
        return count is not None and int(count) >= SIGN_IN_ATTEMPTS

    async def failed(self, client: str) -> None:
        key = _attempts_key(client)
        pipe = self.redis.pipeline()
        pipe.set(key, 0, ex=SIGN_IN_WINDOW, nx=True)  # the window opens at the first miss
        pipe.incr(key)  # (keeps the key's time to live)
        await pipe.execute()


def _attempts_key(client: str) -> str:
    return "console:signin:" + hashlib.sha256(client.encode()).hexdigest()
