"""Keys that cannot be ours are refused before any lookup (pure)."""

from __future__ import annotations

import pytest

from services.domain.catalog import generate_api_key, looks_like_api_key
from services.gateway.auth import AuthError, bearer_key


def test_every_generated_key_has_the_shape() -> None:
    for _ in range(100):
        key = generate_api_key()
        assert looks_like_api_key(key) and bearer_key(f"Bearer {key}") == key


@pytest.mark.parametrize("key", [
    "clsk_live_" + "a" * 39, "clsk_live_" + "a" * 41, "clsk_live_" + "a" * 39 + "-",
    "clsk_test_" + "a" * 40, "sk-" + "a" * 48, "clsk_live_" + "é" * 40,
])
def test_anything_else_is_invalid_without_a_lookup(key: str) -> None:
    assert not looks_like_api_key(key)
    with pytest.raises(AuthError) as info:
        bearer_key(f"Bearer {key}")
    assert (info.value.status, info.value.reason) == (401, "invalid")
