"""A NATS user credential: its JWT and its seed, in the `.creds` text NATS's tools read.

The seed is secret: it never shows in a repr, and `text()` is for files and secrets only.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

from services.infra.natsauth.identities import Role, inbox_prefix
from services.infra.natsauth.jwt import JwtError, decode
from services.infra.natsauth.keys import public_key, sign

__all__ = ["Credentials", "CredentialsError"]

ROLE_TAG = "role:"

_BLOCK = re.compile(r"-{3,}BEGIN ([A-Z ]+)-{3,}\s*\n(.+?)\n\s*-{3,}END \1-{3,}", re.S)

_NOTICE = """\
************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.
"""


class CredentialsError(ValueError):
    """Text that is not a NATS credential, or one whose parts do not belong together."""


@dataclass(frozen=True)
class Credentials:
    jwt: str
    seed: str = field(repr=False)

    def __post_init__(self) -> None:
        try:
            claims = decode(self.jwt, verify_signature=False)
            key = public_key(self.seed)
        except (JwtError, ValueError, Exception) as exc:
            raise CredentialsError(f"not a NATS user credential: {type(exc).__name__}") \
                from None
        if claims.get("sub") != key:
            raise CredentialsError("the seed is not the JWT's user")

    @property
    def claims(self) -> dict[str, Any]:
        return decode(self.jwt, verify_signature=False)

    @property
    def public_key(self) -> str:
        return str(self.claims["sub"])

    @property
    def name(self) -> str:
        return str(self.claims.get("name", ""))

    @property
    def role(self) -> Role | None:
        for tag in self.claims.get("nats", {}).get("tags", []):
            if isinstance(tag, str) and tag.startswith(ROLE_TAG):
                try:
                    return Role(tag.removeprefix(ROLE_TAG))
                except ValueError:
                    return None
        return None

    @property
    def expires_at(self) -> int:
        """Unix seconds; 0: never."""
        return int(self.claims.get("exp", 0))

    @property
    def inbox_prefix(self) -> str:
        """Where this identity's replies arrive: the only inbox its permissions let it read."""
        role = self.role
        return "_INBOX" if role is None else inbox_prefix(role, self.name)

    def nonce_signature(self, nonce: str) -> bytes:
        """The proof of holding the seed that a server asks for at connect: its nonce signed,
        base64 (what nats-py sends as `sig`)."""
        return base64.b64encode(sign(self.seed, nonce.encode()))

    def text(self) -> str:
        return (f"-----BEGIN NATS USER JWT-----\n{self.jwt}\n------END NATS USER JWT------\n\n"
                f"{_NOTICE}\n-----BEGIN USER NKEY SEED-----\n{self.seed}\n"
                f"------END USER NKEY SEED------\n\n"
                "*************************************************************\n")

    @classmethod
    def parse(cls, text: str) -> Credentials:
        blocks = {name: body.strip() for name, body in _BLOCK.findall(text)}
        jwt, seed = blocks.get("NATS USER JWT"), blocks.get("USER NKEY SEED")
        if not jwt or not seed:
            raise CredentialsError("not a NATS credential: no JWT or no seed block")
        return cls(jwt, seed)
