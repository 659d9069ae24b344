"""Connecting to NATS as an identity, and giving up on a credential the servers refuse.

NATS being away is waited out for ever; the servers refusing the credential (empty, expired,
revoked) a few times in a row is not (`RefusalStreak`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import structlog
from nats.aio.client import Client as NATS

from services.infra.natsauth.creds import Credentials

log = structlog.get_logger("bus")


class NatsAuthError(ConnectionError):
    """NATS refused the credential (missing, expired, revoked, or not this server's)."""


AUTH_REFUSALS = ("authorization violation", "authentication expired",
                 "authentication revoked", "credentials revoked", "authorization failed")
"""How the servers (and nats-py) word a refused credential: `'Authorization Violation'` at
CONNECT (none, forged, expired or revoked), `user authentication expired` / `… revoked` on a
live connection. Not "authentication timeout": that is a slow client on a busy machine, and
the next attempt passes. Nor "permissions violation": a refused subject, not a refused
identity."""

REFUSALS_BEFORE_GIVING_UP = 3
"""Refusals in a row (with no connection in between) after which `Bus.connect` gives up: not
one, because a server of a cluster can refuse for a moment while it catches up with an
account update (a re-issued account, a new signing key) that its peers already have."""


def auth_refusal(error: str) -> bool:
    """Whether `error` (a nats-py error's text) is the servers refusing the credential, rather
    than NATS being unreachable or restarting. Pure."""
    text = error.lower()
    return any(refusal in text for refusal in AUTH_REFUSALS)


@dataclass
class RefusalStreak:
    """Counts the servers' refusals of the credential since the last successful connection;
    other errors (connection refused, timeouts: NATS away) neither count nor reset it. Pure."""

    limit: int = REFUSALS_BEFORE_GIVING_UP
    count: int = 0

    def failed(self, error: str) -> bool:
        """Note an error; True once the credential has been refused `limit` times in a row."""
        if auth_refusal(error):
            self.count += 1
        return self.count >= self.limit

    def connected(self) -> None:
        self.count = 0


@dataclass(frozen=True)
class NatsConnection:
    """A connected client, the identity it connected as (None: anonymous), and the event set
    when the connection is closed for good."""

    nc: NATS
    identity: Credentials | None
    closed: asyncio.Event


async def connect_nats(url: str, *, name: str, creds: str, connect_timeout: float,
                       refusals: int, closing: Callable[[], bool]) -> NatsConnection:
    """The connection `Bus.connect` makes (which says how it behaves). `closing()` says
    whether the connection's owner is closing it on purpose: a disconnection then is no news.
    """
    credentials = Credentials.parse(creds) if creds else None
    # Names the identity, never the URL (it may carry a password) nor the credential.
    who = (f"{name} (anonymous)" if credentials is None else
           f"{name} (identity {credentials.name!r}, key {credentials.public_key})")

    said: dict[str, float] = {}
    streak = RefusalStreak(max(1, refusals))
    refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    giving_up: list[asyncio.Task[None]] = []
    abandoned = False
    # Once the first connection is made, a credential refused on reconnection closes the
    # client instead of failing the call.
    established = False
    nc = NATS()

    async def on_error(exc: Exception) -> None:
        # While NATS is away the client fails every 0.5 s: say each kind of error once a
        # minute, not twice a second from every process.
        error = str(exc) or type(exc).__name__
        now = time.monotonic()
        if now - said.get(error, -60.0) >= 60.0:
            said[error] = now
            log.warning("nats error", error=error)
        if not streak.failed(error):
            return
        if not established:
            # The first connection, which nats-py (max_reconnect_attempts=-1) would retry
            # for ever: connect_nats stops it and raises.
            if not refused.done():
                refused.set_result(error)
        elif not giving_up and not nc.is_closed:
            # Revoked or expired while disconnected: nats-py fires closed_cb only when
            # the -ERR reaches a live connection, and retries a refused reconnection for
            # ever. Close for good, from a task of our own: close() cancels the
            # reconnection task that is calling us.
            log.error("nats refused this credential on reconnection: closing for good",
                      identity=who, refusals=streak.count, error=error)
            giving_up.append(asyncio.create_task(nc.close(), name=f"nats-give-up-{name}"))

    async def on_disconnect() -> None:
        if abandoned:  # our own close of a first connection given up on
            return
        if not established or not closing():
            log.warning("nats disconnected")

    async def on_reconnect() -> None:
        streak.connected()
        log.info("nats reconnected")

    closed = asyncio.Event()

    async def on_closed() -> None:
        # For good: the servers refused the credential (revoked, expired) on a live
        # connection or on every reconnection; otherwise only close() does this.
        closed.set()
        if established and not closing():
            log.error("nats connection closed for good (credential refused?)",
                      identity=who)

    auth: dict[str, Any] = {}
    if credentials is not None:
        identity = credentials
        must_be_tls = urllib.parse.urlsplit(url).scheme == "tls"

        def user_jwt() -> bytearray:
            return bytearray(identity.jwt.encode())

        def signature(nonce: str) -> bytes:
            # nats-py moves to TLS only when the server asks for it: a tls:// URL answered
            # in plain text may be someone in the middle, and the nonce it hands us
            # signed would let it connect as us. Refuse to sign (the client retries).
            if must_be_tls and not nc._server_info.get("tls_required"):
                raise NatsAuthError(f"{url} answered without TLS: not signing in")
            return identity.nonce_signature(nonce)

        auth = {"user_jwt_cb": user_jwt, "signature_cb": signature,
                "inbox_prefix": credentials.inbox_prefix}

    async def abandon() -> None:
        nonlocal abandoned
        abandoned = True
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        # Whatever state the first connection was left in (a socket half open, or never
        # started): nothing of it may outlive this call.
        with contextlib.suppress(Exception):
            await nc.close()

    # A task, so that a refusal can stop it: nats-py never returns from a first
    # connection that keeps failing.
    connecting = asyncio.ensure_future(nc.connect(
        # reconnect_time_wait is typed int, but is any number of seconds
        servers=[url], name=name, connect_timeout=int(max(1, connect_timeout)),
        allow_reconnect=True, max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,  # type: ignore[arg-type]
        error_cb=on_error, disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect, closed_cb=on_closed, **auth))
    try:
        waits: set[asyncio.Future[Any]] = {connecting, refused}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled: a stop before NATS answered
        await abandon()
        raise
    if not connecting.done():
        await abandon()
        raise NatsAuthError(
            f"NATS refused the credential of {who} {streak.count} times "
            f"({refused.result()}): empty, expired or revoked? Set NATS_CREDS to this "
            "identity's .creds (see docs/security.md)")
    try:
        connecting.result()
    except nats.errors.Error as exc:
        if auth_refusal(str(exc)):
            raise NatsAuthError(f"NATS refused the credential of {who} ({exc}): set "
                                "NATS_CREDS to this identity's .creds (see "
                                "docs/security.md)") from None
        raise
    streak.connected()
    established = True
    return NatsConnection(nc, credentials, closed)

