"""Each node's vLLM API key, derived from NODE_API_KEY_SECRET and the node's id (pure)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

import pytest

from services.infra.node_keys import (
    KEY_PREFIX,
    NodeKeys,
    NodeKeySecretError,
    check_secret,
    node_api_key,
)
from services.infra.settings import Secret, SettingsError

SECRET = "kR3v9xQ2-mZ7pL0aT5wY8cE1nB4hJ6uF"
NODE_A = uuid.UUID("0190f3a1-7c2e-7d4b-9a1f-1a2b3c4d5e6f")
NODE_B = uuid.UUID("0190f3a1-7c2e-7d4b-9a1f-1a2b3c4d5e70")


def test_the_key_is_hmac_sha256_of_the_node_id() -> None:
    digest = hmac.new(SECRET.encode(), str(NODE_A).encode(), hashlib.sha256).digest()
    expected = KEY_PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert node_api_key(SECRET, NODE_A) == expected
    assert len(expected) == len(KEY_PREFIX) + 43  # 256 bits, no padding
    # The same from a Secret, from the id's text, and from the gateway's side.
    assert node_api_key(Secret(SECRET), str(NODE_A)) == expected
    assert NodeKeys(Secret(SECRET)).key(NODE_A) == expected
    assert NodeKeys(SECRET).authorization(str(NODE_A)) == f"Bearer {expected}"


def test_a_key_opens_one_node_under_one_secret() -> None:
    keys = {node_api_key(SECRET, NODE_A), node_api_key(SECRET, NODE_B),
            node_api_key(SECRET + "x", NODE_A)}
    assert len(keys) == 3


@pytest.mark.parametrize(("secret", "why"), [
    ("", "empty"), ("   ", "empty"), ("REPLACE_ME", "placeholder"),
    ("REPLACE_ME-" + "a1b2c3d4" * 4, "placeholder"), ("short-but-random-9x", "too short"),
    ("ab" * 20, "repeated"),
])
def test_a_weak_secret_is_refused_naming_the_variable(secret: str, why: str) -> None:
    for attempt in (lambda: check_secret(secret), lambda: NodeKeys(secret),
                    lambda: node_api_key(secret, NODE_A)):
        with pytest.raises(NodeKeySecretError, match="NODE_API_KEY_SECRET") as info:
            attempt()
        assert why in str(info.value)
        assert isinstance(info.value, SettingsError)  # the services' mains report it as such
        if secret.strip():
            assert secret not in str(info.value)  # never quoted back


def test_the_gateway_side_keeps_its_headers_and_hides_the_secret() -> None:
    keys = NodeKeys(SECRET)
    first = keys.authorization(str(NODE_A))
    assert keys.authorization(str(NODE_A)) is first  # derived once
    assert SECRET not in repr(keys)
