"""Prefix-aware routing (issue 15, `prefix_aware`): send a conversation back to the node that
already holds its prompt's prefix in its KV cache, without asking the nodes anything and
without the gateways talking to each other. Pure.

- **What a request is keyed by** (`route_key`): the first `PREFIX_BYTES` of its prompt
  (chat's messages up to the first user turn, a completion's prompt, the Responses API's
  instructions and input), salted with the tenant (the node's prefix cache is salted with
  the tenant too, so a tenant never routes by, or hits, another's cache). Every later turn of
  a conversation repeats its start, so it keeps its key. A long shared system prompt fills
  the whole key: every conversation on it goes where it is cached (spilling by load); a short
  one leaves room for the first user turn, so conversations spread out. A caller that names
  its session (`user`, or the `X-Session-Id` header) is keyed by that instead: session
  affinity.
- **Where a key goes** (`choose`): rendezvous hashing (highest random weight) over the
  model's routable nodes, so every gateway replica ranks the nodes alike for a key, and a node
  joining or leaving moves only the keys it gains or had. Bounded load: the first node in that
  order whose load is under `(1 + spill) x` the average takes it, so one hot conversation (or a
  tenant's every user on one system prompt) cannot melt a node; a node's load is what this
  gateway has in flight on it plus the requests its last heartbeat said were waiting.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgspec

from services.gateway.nodes import NodeView

PREFIX_BYTES: Final = 4096
"""How much of a prompt's start keys it: about a thousand tokens."""
MAX_SESSION: Final = 256
"""A session id longer than this is keyed by its first MAX_SESSION characters."""
SESSION_HEADER: Final = "X-Session-Id"

_encode = msgspec.json.Encoder().encode


def route_key(endpoint: str, body: Mapping[str, Any], tenant_id: str,
              session: str | None = None) -> bytes | None:
    """What `body` (a parsed request for `endpoint`) is routed by: its session, else the
    start of its conversation, salted with the tenant; None when it has neither (nothing
    to keep together)."""
    user = body.get("user")
    session = session or (user if isinstance(user, str) and user else None)
    if session:
        return _digest(tenant_id, b"session", session[:MAX_SESSION].encode())
    start = _conversation_start(endpoint, body)
    if not start:
        return None
    return _digest(tenant_id, b"prefix", start[:PREFIX_BYTES])


def _conversation_start(endpoint: str, body: Mapping[str, Any]) -> bytes:
    if endpoint == "chat":
        messages = body.get("messages")
        start = b""
        if isinstance(messages, list):
            # Up to the first user turn: what every later turn repeats unchanged.
            for message in messages:
                start += _encode(message)
                if len(start) >= PREFIX_BYTES or (
                        isinstance(message, dict) and message.get("role") == "user"):
                    break
        return start
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch: keyed by its first prompt
        return prompt.encode() if isinstance(prompt, str) else _encode(prompt or "")
    if endpoint == "responses":
        instructions = body.get("instructions")
        first = body.get("input")
        if isinstance(first, list):
            first = first[:1]
        return _encode([instructions, first]) if instructions or first else b""
    return b""


def _digest(tenant_id: str, kind: bytes, data: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(tenant_id.encode())
    h.update(b"\0" + kind + b"\0")
    h.update(data)
    return h.digest()


def rank(key: bytes, node_id: str) -> bytes:
    """A node's weight for `key`: the same in every gateway (no process-seeded hash)."""
    return hashlib.blake2b(key + node_id.encode(), digest_size=8).digest()


def choose(key: bytes, nodes: Sequence[NodeView], in_flight: Mapping[str, int],
           spill: float) -> NodeView:
    """The node for `key` among `nodes` (not empty): the highest-ranked whose load is under
    the bound, `ceil((total + 1) / len(nodes) * (1 + spill))`; the total counts this request,
    so the least-loaded node is always under it."""
    loads = {n.node_id: in_flight.get(n.node_id, 0) + n.waiting for n in nodes}
    bound = math.ceil((sum(loads.values()) + 1) / len(nodes) * (1 + spill))
    for node in sorted(nodes, key=lambda n: rank(key, n.node_id), reverse=True):
        if loads[node.node_id] + 1 <= bound:
            return node
    return min(nodes, key=lambda n: loads[n.node_id])  # (not reached: the bound admits one)
