"""NKeys: ed25519 key pairs encoded as NATS spells them (seed ``S…``, public ``O…``/``A…``/``U…``).

The `nkeys` package signs and verifies; creating a key is 32 random bytes encoded as a seed
(`nkeys` has no generator of its own).
"""

from __future__ import annotations

import base64
import binascii
import enum
import os

import nacl.exceptions
import nacl.signing
import nkeys

__all__ = ["KeyKind", "kind_of", "new_seed", "public_key", "sign", "verify"]


class KeyKind(enum.IntEnum):
    OPERATOR = nkeys.PREFIX_BYTE_OPERATOR
    ACCOUNT = nkeys.PREFIX_BYTE_ACCOUNT
    USER = nkeys.PREFIX_BYTE_USER


_KIND_BY_LETTER = {"O": KeyKind.OPERATOR, "A": KeyKind.ACCOUNT, "U": KeyKind.USER}


def new_seed(kind: KeyKind) -> str:
    seed: bytes = nkeys.encode_seed(os.urandom(32), int(kind))
    return seed.decode()


def public_key(seed: str) -> str:
    key: bytes = nkeys.from_seed(seed.encode()).public_key
    return key.decode()


def kind_of(key: str) -> KeyKind | None:
    """The kind of a public key (its first letter); None for anything else."""
    return _KIND_BY_LETTER.get(key[:1])


def sign(seed: str, data: bytes) -> bytes:
    signature: bytes = nkeys.from_seed(seed.encode()).sign(data)
    return signature


def verify(public: str, data: bytes, signature: bytes) -> bool:
    """Whether `signature` over `data` was made by the seed of `public` (the key's checksum
    is checked too). `nkeys` verifies only with a seed in hand, so nacl does it here."""
    try:
        raw = base64.b32decode(public + "=" * (-len(public) % 8))
    except (binascii.Error, ValueError):
        return False
    if len(raw) != 35 or nkeys.crc16(bytearray(raw[:33])).to_bytes(2, "little") != raw[33:]:
        return False
    try:
        nacl.signing.VerifyKey(raw[1:33]).verify(data, signature)
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True
