"""Revoking users: the account JWT's `revocations`, merged and signed anew (pure), then
looked up and pushed through the system account (`AccountResolver`, the I/O).

A revocation names a user's public key and a time: every JWT of that key issued before it is
refused, and the servers close that user's connections as soon as they take the update. A
revocation can be forgotten once the credential it stops has expired.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping

from nats.aio.client import Client as NATS

from services.infra.natsauth.jwt import decode, encode

__all__ = ["AccountResolver", "ResolverError", "resign", "revised"]


class ResolverError(RuntimeError):
    """The servers refused an account update or lookup (the message says why)."""


def revised(current: Mapping[str, int], revoke: Mapping[str, int],
            forget: Collection[str]) -> dict[str, int] | None:
    """The revocations to publish: `current` with `revoke` added (an earlier time is kept:
    it already covers the same JWTs... a later one covers more, so the later wins) and the
    keys in `forget` dropped; None when that changes nothing."""
    merged = {k: v for k, v in current.items() if k not in forget}
    for key, at in revoke.items():
        if key in forget:
            continue
        merged[key] = max(at, merged.get(key, at))
    return None if merged == dict(current) else merged


def resign(account_jwt: str, revocations: Mapping[str, int], *, signing_seed: str,
           now: int) -> str:
    """`account_jwt` with `revocations`, issued at `now` (or one second after the current
    one, so the servers take it as newer), signed by an operator signing key."""
    claims = decode(account_jwt, verify_signature=False)
    claims.pop("iss", None)
    claims.pop("jti", None)
    claims["iat"] = max(now, int(claims.get("iat", 0)) + 1)
    nats = dict(claims.get("nats", {}))
    if revocations:
        nats["revocations"] = dict(sorted(revocations.items()))
    else:
        nats.pop("revocations", None)
    claims["nats"] = nats
    return encode(claims, signing_seed)


def revocations_of(account_jwt: str) -> dict[str, int]:
    found = decode(account_jwt, verify_signature=False).get("nats", {}).get("revocations", {})
    return {str(k): int(v) for k, v in found.items()} if isinstance(found, dict) else {}


class AccountResolver:
    """The servers' account store, reached as a system-account user."""

    def __init__(self, nc: NATS, account: str, *, timeout: float = 5.0) -> None:
        self.nc = nc
        self.account = account
        self.timeout = timeout

    async def lookup(self) -> str:
        msg = await self.nc.request(f"$SYS.REQ.ACCOUNT.{self.account}.CLAIMS.LOOKUP", b"",
                                    timeout=self.timeout)
        text = msg.data.decode()
        if not text or text.startswith("{"):
            raise ResolverError(f"account lookup failed: {text[:200] or 'no JWT'}")
        return text

    async def push(self, account_jwt: str) -> None:
        msg = await self.nc.request(f"$SYS.REQ.ACCOUNT.{self.account}.CLAIMS.UPDATE",
                                    account_jwt.encode(), timeout=self.timeout)
        try:
            answer = json.loads(msg.data)
        except ValueError:
            raise ResolverError(f"account update: unreadable answer {msg.data[:200]!r}") \
                from None
        error = answer.get("error") if isinstance(answer, dict) else None
        if error:
            raise ResolverError(f"account update refused: {error}")
