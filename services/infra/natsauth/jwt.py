"""NATS JWTs (operator, account, user) written as NATS's ADR-14 describes, without a JWT library.

The header is fixed (``{"typ":"JWT","alg":"ed25519-nkey"}``); the claims are JSON with the
field names of NATS's Go `jwt/v2` package; `jti` is the base32 SHA-512/256 of the claims with
an empty `jti`, as that package computes it; the signature is ed25519 by the issuer's seed over
``base64url(header) "." base64url(claims)``. Pure: the same inputs give the same token.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from services.infra.natsauth.keys import public_key, sign, verify

__all__ = [
    "NO_LIMIT",
    "JwtError",
    "Permissions",
    "ScopedKey",
    "account_claims",
    "decode",
    "encode",
    "operator_claims",
    "user_claims",
]

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
NO_LIMIT = -1


class JwtError(ValueError):
    """A token that is not a NATS JWT, or whose signature does not hold."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def encode(claims: dict[str, Any], issuer_seed: str) -> str:
    """Sign `claims` (without `iss` and `jti`, which this sets) with `issuer_seed`."""
    body = {**claims, "iss": public_key(issuer_seed), "jti": ""}
    body["jti"] = base64.b32encode(hashlib.new("sha512_256", _json(body)).digest()) \
        .rstrip(b"=").decode()
    signed = f"{_b64(_json(HEADER))}.{_b64(_json(body))}"
    return f"{signed}.{_b64(sign(issuer_seed, signed.encode()))}"


def decode(token: str, *, verify_signature: bool = True) -> dict[str, Any]:
    """The claims of `token`; JwtError unless its issuer (`iss`) signed it."""
    try:
        head, body, signature = token.split(".")
        header = json.loads(_unb64(head))
        claims: dict[str, Any] = json.loads(_unb64(body))
    except (ValueError, json.JSONDecodeError) as exc:
        raise JwtError(f"not a JWT: {exc}") from exc
    if header != HEADER or not isinstance(claims, dict):
        raise JwtError("not a NATS JWT")
    if verify_signature and not verify(str(claims.get("iss", "")), f"{head}.{body}".encode(),
                                       _unb64(signature)):
        raise JwtError("signature does not match the issuer")
    return claims


@dataclass(frozen=True)
class Permissions:
    """What a user may do: subjects it may publish to and subscribe to (NATS wildcards), how
    many replies it may send to requests it receives, and its limits (-1: none)."""

    pub_allow: tuple[str, ...] = ()
    sub_allow: tuple[str, ...] = ()
    pub_deny: tuple[str, ...] = ()
    sub_deny: tuple[str, ...] = ()
    responses: int = 0
    """Replies allowed to each request received (0: none); `response_ttl_seconds` to send
    them."""
    response_ttl_seconds: float = 0.0
    subs: int = NO_LIMIT
    payload: int = NO_LIMIT
    data: int = NO_LIMIT
    connection_types: tuple[str, ...] = ()
    """How the user may connect (NATS's `allowed_connection_types`, e.g. STANDARD); () any."""

    def claims(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pub": _allow_deny(self.pub_allow, self.pub_deny),
            "sub": _allow_deny(self.sub_allow, self.sub_deny),
            "subs": self.subs, "data": self.data, "payload": self.payload,
        }
        if self.connection_types:
            out["allowed_connection_types"] = list(self.connection_types)
        if self.responses:
            out["resp"] = {"max": self.responses,
                           "ttl": int(self.response_ttl_seconds * 1_000_000_000)}
        return out


def _allow_deny(allow: tuple[str, ...], deny: tuple[str, ...]) -> dict[str, list[str]]:
    # NATS reads a missing allow list as "everything": nothing allowed must be said as
    # everything denied.
    out: dict[str, list[str]] = {"allow": list(allow)} if allow else {"deny": [">"]}
    if allow and deny:
        out["deny"] = list(deny)
    return out


@dataclass(frozen=True)
class ScopedKey:
    """An account signing key whose users get `template`'s permissions, whatever their own JWT
    says; ``{{name()}}`` in a subject is replaced by the user's name."""

    key: str
    role: str
    template: Permissions = field(default_factory=Permissions)
    description: str = ""

    def claims(self) -> dict[str, Any]:
        return {"kind": "user_scope", "key": self.key, "role": self.role,
                "template": self.template.claims(), "description": self.description}


def operator_claims(*, name: str, operator: str, signing_keys: tuple[str, ...],
                    system_account: str, issued_at: int) -> dict[str, Any]:
    return {"sub": operator, "name": name, "iat": issued_at,
            "nats": {"type": "operator", "version": 2, "signing_keys": list(signing_keys),
                     "system_account": system_account}}


def account_claims(*, name: str, account: str, issued_at: int,
                   signing_keys: tuple[str | ScopedKey, ...] = (),
                   jetstream: bool = False,
                   revocations: dict[str, int] | None = None) -> dict[str, Any]:
    """An account; `revocations` maps a user's public key to a time (unix seconds): every JWT
    of that user issued before it is refused, and its connections closed."""
    limits: dict[str, Any] = {"subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT,
                              "imports": NO_LIMIT, "exports": NO_LIMIT, "wildcards": True,
                              "conn": NO_LIMIT, "leaf": NO_LIMIT}
    if jetstream:
        limits.update(mem_storage=NO_LIMIT, disk_storage=NO_LIMIT, streams=NO_LIMIT,
                      consumer=NO_LIMIT)
    # A user of the account without permissions of its own may do nothing (NATS's default
    # would be everything); every identity of the platform carries its own.
    nats: dict[str, Any] = {
        "type": "account", "version": 2, "limits": limits,
        "signing_keys": [k.claims() if isinstance(k, ScopedKey) else k for k in signing_keys],
        "default_permissions": {"pub": {"deny": [">"]}, "sub": {"deny": [">"]}},
    }
    if revocations:
        nats["revocations"] = dict(sorted(revocations.items()))
    return {"sub": account, "name": name, "iat": issued_at, "nats": nats}


def user_claims(*, name: str, user: str, issuer_account: str, issued_at: int,
                expires_at: int = 0, tags: tuple[str, ...] = (),
                permissions: Permissions | None = None) -> dict[str, Any]:
    """A user of `issuer_account`. `permissions` None: the user is issued by a scoped key,
    whose template the server applies instead (a plain user needs its own, or it may do
    nothing: NATS reads missing limits as 0)."""
    nats: dict[str, Any] = {"type": "user", "version": 2, "issuer_account": issuer_account}
    if tags:
        nats["tags"] = list(tags)
    if permissions is not None:
        nats.update(permissions.claims())
    claims: dict[str, Any] = {"sub": user, "name": name, "iat": issued_at, "nats": nats}
    if expires_at:
        claims["exp"] = expires_at
    return claims
