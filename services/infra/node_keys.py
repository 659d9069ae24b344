"""Each GPU node's vLLM API key: ``HMAC-SHA256(NODE_API_KEY_SECRET, node id)``. Pure.

The orchestrator hands a node its key at launch (``VLLM_API_KEY``, a secret of the launch, as
the NATS credential is); every gateway derives the same key from the same secret when it talks
to that node. Nothing is distributed, stored or looked up, and a key opens one node only: what
leaks from one machine (its environment, its process list) is no use against another.

The node id is the canonical text of its UUID (``str(uuid.UUID(...))``), as the events and
the ``nodes`` projection carry it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

from services.infra.settings import MAKE_A_TOKEN, Secret, SettingsError, weak_token_reason

__all__ = ["KEY_PREFIX", "NodeKeySecretError", "NodeKeys", "check_secret", "node_api_key"]

KEY_PREFIX = "clnk_"
"""Marks a node key where it shows (a log someone pasted, a secret scanner's rule)."""
_CACHE_LIMIT = 100_000


class NodeKeySecretError(SettingsError):
    """NODE_API_KEY_SECRET is missing or weak; the service must not start."""


def check_secret(secret: str) -> bytes:
    """The secret as HMAC key bytes; NodeKeySecretError when it is weak (empty, a placeholder,
    short: `weak_token_reason`), since a guessable secret is every node's key."""
    reason = weak_token_reason(secret)
    if reason is not None:
        raise NodeKeySecretError(
            f"NODE_API_KEY_SECRET {reason}: gateways and the orchestrator derive every node's "
            f"vLLM API key from it (the same value in both). Make one with: {MAKE_A_TOKEN}")
    return secret.encode()


def _derive(key: bytes, node_id: str) -> str:
    digest = hmac.new(key, node_id.encode(), hashlib.sha256).digest()
    return KEY_PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def node_api_key(secret: str | Secret, node_id: uuid.UUID | str) -> str:
    """The vLLM API key of node `node_id` (raises NodeKeySecretError for a weak secret)."""
    raw = secret.reveal() if isinstance(secret, Secret) else secret
    return _derive(check_secret(raw), str(node_id))


class NodeKeys:
    """The gateway's side: each node's ``Authorization`` header, derived once and kept (an
    HMAC per request would cost microseconds on the hot path for nothing)."""

    __slots__ = ("_headers", "_key")

    def __init__(self, secret: str | Secret) -> None:
        self._key = check_secret(secret.reveal() if isinstance(secret, Secret) else secret)
        self._headers: dict[str, str] = {}

    def key(self, node_id: uuid.UUID | str) -> str:
        return _derive(self._key, str(node_id))

    def authorization(self, node_id: str) -> str:
        """``Bearer <key>`` for node `node_id`."""
        header = self._headers.get(node_id)
        if header is None:
            if len(self._headers) >= _CACHE_LIMIT:
                self._headers.clear()  # rare: nodes come and go slowly
            header = self._headers[node_id] = "Bearer " + self.key(node_id)
        return header

    def __repr__(self) -> str:
        return "NodeKeys(secret='**********')"
